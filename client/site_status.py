"""A site's status page: its policy in words, its audit log (and the chain's verdict), its ledger.

What ``fedadapt status --site-dir DIR`` serves (``shared.status_server``) to the site's
engineer, on the site's machine: only what the site's own folder holds about what it sent
(keys, sizes, statuses, epsilon), never a patient value.
"""

from __future__ import annotations

from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from client.audit_log import read_audit, verify_chain
from client.ledger import LedgerRefused, read
from client.policy import Policy, read_policy
from shared.status_server import make_server

RECENT = 30  # the audit entries shown, newest first


def site_status(site_dir: Path, policy: Path | None = None) -> dict[str, Any]:
    """What the site's folder says about what it sent.

    Returns
    -------
    dict
        ``site_dir``; ``policy`` (lines in words, or the error reading it); ``chain`` (``ok``,
        ``entries``, the first broken ``line`` and ``reason``); ``runs`` (per run: replies,
        bytes, errors); ``recent`` (the newest audit rows); ``ledger`` (per run: rounds and
        epsilon, the total; or why it is refused).
    """
    file = policy if policy is not None else site_dir / "policy.toml"
    try:
        rules: Policy | None = read_policy(file) if file.is_file() else None
        words = rules.describe() if rules is not None else ["no policy file: defaults apply"]
    except Exception as err:  # shown, not fatal: the page is for finding such problems
        words = [f"the policy cannot be read: {err}"]
    audit = read_audit(site_dir)
    chain = verify_chain(audit.path)
    try:
        ledger: dict[str, Any] = read(site_dir)
        ledger_view: dict[str, Any] = {"runs": ledger.get("runs", {}), "error": None}
    except LedgerRefused as err:
        ledger_view = {"runs": {}, "error": str(err)}
    header = ("time", "run", "phase", "round", "keys", "arrays", "bytes", "status")
    return {
        "site_dir": str(site_dir),
        "policy": words,
        "chain": {"ok": chain.ok, "entries": chain.entries, "line": chain.line,
                  "reason": chain.reason},
        "runs": audit.totals(),
        "recent": [dict(zip(header, row, strict=False)) for row in audit.rows()[-RECENT:][::-1]],
        "ledger": ledger_view,
    }


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedadapt site status</title>
<style>
body{font-family:sans-serif;margin:1.5em;max-width:70em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border-bottom:1px solid #ddd;padding:.2em .6em;text-align:left}
.bad{color:#b22222;font-weight:bold} .good{color:#1a6e1a;font-weight:bold}
</style></head><body>
<h1>fedadapt site: <span id="dir"></span></h1>
<h2>Audit log</h2><p id="chain"></p>
<table id="runs"><thead><tr><th>run</th><th>replies</th><th>bytes</th><th>errors</th>
</tr></thead><tbody></tbody></table>
<h3>Newest entries</h3>
<table id="recent"><thead><tr><th>time</th><th>run</th><th>phase</th><th>round</th>
<th>bytes</th><th>status</th></tr></thead><tbody></tbody></table>
<h2>Privacy ledger</h2><p id="ledger-error"></p>
<table id="ledger"><thead><tr><th>run</th><th>record</th></tr></thead><tbody></tbody></table>
<h2>Policy</h2><ul id="policy"></ul>
<script>
function row(body, cells) { const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement("td");
    td.textContent = c === null || c === undefined ? "\\u2014" : c; tr.appendChild(td); }
  body.appendChild(tr); }
async function refresh() {
  const s = await (await fetch("status.json", {cache: "no-store"})).json();
  document.getElementById("dir").textContent = s.site_dir;
  const chain = document.getElementById("chain");
  chain.className = s.chain.ok ? "good" : "bad";
  chain.textContent = s.chain.ok ? "hash chain intact: " + s.chain.entries + " entries"
    : "hash chain BROKEN at line " + s.chain.line + ": " + s.chain.reason;
  const runs = document.querySelector("#runs tbody"); runs.innerHTML = "";
  for (const [run, t] of Object.entries(s.runs)) { row(runs, [run, t.replies, t.bytes, t.errors]); }
  const recent = document.querySelector("#recent tbody"); recent.innerHTML = "";
  for (const r of s.recent) { row(recent, [r.time, r.run, r.phase, r.round, r.bytes, r.status]); }
  document.getElementById("ledger-error").textContent = s.ledger.error || "";
  const ledger = document.querySelector("#ledger tbody"); ledger.innerHTML = "";
  for (const [run, r] of Object.entries(s.ledger.runs)) { row(ledger, [run, JSON.stringify(r)]); }
  const pol = document.getElementById("policy"); pol.innerHTML = "";
  for (const line of s.policy) { const li = document.createElement("li");
    li.textContent = line; pol.appendChild(li); }
}
refresh(); setInterval(refresh, 5000);
</script></body></html>
"""


def site_page(site_dir: Path, policy: Path | None = None, host: str = "127.0.0.1",
              port: int = 0) -> ThreadingHTTPServer:
    """The status page of the site in ``site_dir``, not yet serving (``port`` 0: a free one)."""
    folder = site_dir.resolve()
    return make_server(PAGE, lambda: site_status(folder, policy), None, host, port)
