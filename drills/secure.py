"""Drill: sites killed during a secure sum, in a TLS deployment (``secagg-dropout``)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from client.audit_log import audit_path
from deploy.local import Deployment, DeploymentError, deploy_local
from deploy.processes import kill_tree
from drills.base import FINISHED, DrillResult, drill
from shared.settings import RunSettings
from simulations.datasets import sites_for_run

REPLY_TIMEOUT = 20.0
KILL_ROUND = 2


def _masked(site_dir: Path) -> int:
    """How many masked vectors the site has computed (its audit log, written before sending)."""
    path = audit_path(site_dir)
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
               if json.loads(line).get("secagg", {}).get("masked"))


class _Killer:
    """Kill sites as soon as they have computed their masked vector in round ``KILL_ROUND``.

    The site's audit entry is written before the reply leaves: a site killed then has sent
    its keys' shares but (almost always) not its masked vector, so the coordinator must
    remove its masks with the others' shares of its key.
    """

    def __init__(self, out: Path, victims: list[str]) -> None:
        self.out, self.victims = out, victims
        self.killed_at: dict[str, float] = {}
        self.base: dict[str, int] = {}
        self.thread: threading.Thread | None = None

    def hook(self, event: dict[str, Any], dep: Deployment) -> None:
        """After round ``KILL_ROUND - 1``: watch the victims' audit logs, kill on a share."""
        if event.get("event") == "round" and event.get("round") == KILL_ROUND - 1 \
                and self.thread is None:
            self.base = {v: _masked(self.out / "sites" / v) for v in self.victims}
            self.thread = threading.Thread(target=self._watch, args=(dep,), daemon=True)
            self.thread.start()

    def _watch(self, dep: Deployment) -> None:
        deadline = time.monotonic() + 300
        while len(self.killed_at) < len(self.victims) and time.monotonic() < deadline:
            for v in self.victims:
                if v not in self.killed_at and _masked(self.out / "sites" / v) > self.base[v]:
                    kill_tree(dep.processes[v])
                    self.killed_at[v] = time.time()
            time.sleep(0.005)


def _settings(min_sites: int) -> RunSettings:
    # FedAvg runs every planned round (Newton may converge first); the deployment's sites
    # require DP: each adds its own noise before masking.
    return RunSettings(num_server_rounds=4, reply_timeout=REPLY_TIMEOUT, strategy="fedavg",
                       dp="record", secagg=True, min_sites=min_sites, node_wait_timeout=10.0)


@drill("secagg-dropout",
       "secure aggregation, 4 sites: one killed in round 2 after sharing its keys, before its "
       "masked vector left: the round completes with the 3 others' total (its masks removed "
       "with their shares of its key) and so does every later round; two killed (the "
       "threshold is 3): that round aborts with nothing aggregated and the run stops with a "
       "clear message", "processes")
def secagg_dropout(out: Path) -> DrillResult:
    """Two TLS deployments of four sites with secagg: one site killed, then two."""
    if out.exists():
        shutil.rmtree(out)
    one, two = out / "one-killed", out / "two-killed"
    killer = _Killer(one, ["hospital-b"])
    report = deploy_local(sites_for_run("synthetic", one, 4, _settings(3)), one, _settings(3),
                          hook=killer.hook)
    rounds = {r["round"]: r for r in report["rounds"]}
    second = rounds.get(KILL_ROUND, {}).get("secagg", {})
    survivors = sorted(n for n, s in report["sites"].items() if s["status"] in FINISHED)
    # Lost after sharing its keys: its masks removed with the others' shares of its key. If
    # its masked vector got out before the kill, it is in the total (the unmasking needs
    # only the threshold): also an exact sum, which the figure then says.
    lost_ok = second.get("lost_after_keys") == ["hospital-b"] and second.get("sites") == 3
    got_out = not second.get("lost_after_keys") and second.get("sites") == 4
    first_ok = sorted(rounds) == [1, 2, 3, 4] and (lost_ok or got_out) and survivors == [
        "hospital-a", "hospital-c", "hospital-d"]

    killer2 = _Killer(two, ["hospital-b", "hospital-c"])
    message = ""
    try:
        deploy_local(sites_for_run("synthetic", two, 4, _settings(3)), two, _settings(3),
                     hook=killer2.hook, timeout=900)
    except DeploymentError as err:
        message = str(err)
    log = (two / "logs").glob("*.log")
    logged = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in log)
    # At the masked stage if the two died before their vectors left, else at the unmasking.
    aborted = any(f"secure aggregation stopped at its {stage} stage: 2 site(s) answered, "
                  "fewer than the threshold 3; nothing was aggregated" in logged
                  for stage in ("masked", "unmask"))
    second_ok = bool(message) and aborted and "fewer than min-sites = 3" in message
    return DrillResult(
        "secagg-dropout", "",
        f"one killed: rounds {sorted(rounds)} completed; round {KILL_ROUND}'s total of "
        f"{second.get('sites')} sites, lost after keys {second.get('lost_after_keys')}"
        f"{' (its vector left before the kill)' if got_out else ''}; "
        f"two killed: {'aborted, nothing aggregated' if aborted else 'NOT aborted'}, run "
        f"{'stopped: ' + message.split(';')[0][:160] if message else 'did not stop'}",
        first_ok and second_ok,
        {"rounds_completed": len(rounds), "sites_in_round_2_total": second.get("sites"),
         "mean_round_s": report.get("deployment", {}).get("mean_round_latency_s"),
         "two_killed_aborted": aborted},
    )
