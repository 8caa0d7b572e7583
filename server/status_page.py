"""The run's status page: what ``fedadapt status OUT`` serves (``shared.status_server``)."""

from __future__ import annotations

from http.server import ThreadingHTTPServer
from pathlib import Path

from server.status import run_status
from shared.status_server import make_server

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedadapt status</title>
<style>
body{font-family:sans-serif;margin:1.5em;max-width:70em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border-bottom:1px solid #ddd;padding:.2em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
.state{font-weight:bold} img{max-width:100%}
</style></head><body>
<h1>fedadapt: <span id="state" class="state">loading</span></h1>
<p id="where"></p>
<h2>Sites</h2>
<table id="sites"><thead><tr><th>site</th><th>node</th><th>last seen</th><th>phase</th>
<th>round</th><th>replies</th><th>bytes</th><th>errors</th><th>refused by rule</th>
<th>epsilon</th></tr></thead><tbody></tbody></table>
<h2>Training loss</h2><svg id="loss" width="600" height="160"></svg>
<div id="report"></div>
<script>
function cell(row, text) { const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "\\u2014" : text; row.appendChild(td); }
function draw(losses) {
  const svg = document.getElementById("loss"); svg.innerHTML = "";
  const pts = losses.filter(p => p.loss !== null);
  if (pts.length < 2) { return; }
  const lo = Math.min(...pts.map(p => p.loss)), hi = Math.max(...pts.map(p => p.loss));
  const n = Math.max(...pts.map(p => p.round));
  const xy = pts.map(p => [20 + 560 * (p.round - 1) / Math.max(1, n - 1),
                           140 - 120 * (p.loss - lo) / Math.max(1e-12, hi - lo)]);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", xy.map(p => p.join(",")).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#1f77b4");
  svg.appendChild(line);
  const label = (x, y, text) => { const t = document.createElementNS(
    "http://www.w3.org/2000/svg", "text"); t.setAttribute("x", x); t.setAttribute("y", y);
    t.setAttribute("font-size", "11"); t.textContent = text; svg.appendChild(t); };
  label(22, 14, "loss " + hi.toFixed(4)); label(22, 156, "loss " + lo.toFixed(4));
  label(520, 156, "round " + n);
}
async function refresh() {
  let s;
  try { s = await (await fetch("status.json", {cache: "no-store"})).json(); }
  catch (e) { document.getElementById("state").textContent = "unreachable"; return true; }
  document.getElementById("state").textContent = s.state;
  document.getElementById("where").textContent =
    "phase: " + (s.phase || "\\u2014") + (s.round ? ", round " + s.round + " of " + s.rounds : "")
    + (s.error ? " \\u2014 " + s.error : "");
  const body = document.querySelector("#sites tbody"); body.innerHTML = "";
  for (const [name, site] of Object.entries(s.sites)) {
    const row = document.createElement("tr"); row.className = "site";
    cell(row, name); cell(row, site.node);
    cell(row, site.last_seen_s === null ? null : site.last_seen_s + " s ago");
    cell(row, site.phase); cell(row, site.round); cell(row, site.replies);
    cell(row, site.bytes); cell(row, site.errors); cell(row, site.refusals.join(", "));
    cell(row, site.epsilon === null ? null : site.epsilon.toFixed(2)); body.appendChild(row);
  }
  draw(s.losses);
  if (s.report) {
    const div = document.getElementById("report");
    if (!div.dataset.done) {
      div.dataset.done = "1";
      div.innerHTML = "<h2>Report</h2><table id='aucs'><thead><tr><th>site</th><th>local" +
        "</th><th>source</th><th>adapted</th><th>uses</th></tr></thead><tbody></tbody>" +
        "</table><img src='plots/metrics.png' alt='metrics'>" +
        "<img src='plots/loss.png' alt='loss'>";
      const tb = div.querySelector("tbody");
      for (const r of s.report.sites) {
        const row = document.createElement("tr");
        cell(row, r.site);
        for (const m of ["local", "source", "adapted"]) {
          cell(row, r[m] === null || r[m] === undefined ? null : r[m].toFixed(3)); }
        cell(row, r.model); tb.appendChild(row);
      }
    }
  }
  return s.state === "running" || s.state === "not started";
}
async function loop() { if (await refresh()) { setTimeout(loop, 2000); } }
loop();
</script></body></html>
"""


def run_page(out: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The status page of the run in ``out``, not yet serving (``port`` 0: a free one)."""
    folder = out.resolve()
    return make_server(PAGE, lambda: run_status(folder), folder / "plots", host, port)
