"""Drill across Linux network namespaces: a site's network cut in the middle of training."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from client.site import read_manifest
from deploy.local import (
    CONNECTION,
    coordinator,
    register_site,
    start_supernode,
    supernode_command,
)
from deploy.netns import in_namespace, leftovers, netns_problem, site_networks
from deploy.processes import submit_run
from drills.base import FINISHED, DrillResult, drill, federation
from drills.processes import _events
from shared.settings import RunSettings

SCENARIO = "netns-dropout"
ROUNDS = 4
REPLY_TIMEOUT = 20.0
# Bounds the adapt and evaluate phases: the cut site stays listed by Flower until its
# heartbeat expires (about a minute), and is waited for until then.
PHASE_TIMEOUT = 180.0


@drill(SCENARIO,
       "3 sites, each in its own network namespace behind a veth pair, reach the coordinator "
       "over TLS at a host address; one site's link is cut as round 2 of 4 starts: the other "
       "two complete every round, the cut site is reported lost (rounds 2-4 missed) after one "
       "reply timeout; no namespace, link or process is left afterwards; skipped where "
       "namespaces cannot be made (not root, no `ip`)", "processes")
def netns_dropout(out: Path) -> DrillResult:
    """Run a TLS deployment of three sites in network namespaces; cut one site's veth pair."""
    problem = netns_problem()
    if problem is not None:
        return DrillResult.skip(SCENARIO, problem)
    if out.exists():
        shutil.rmtree(out)
    manifest = read_manifest(federation(out, n_sites=3, seed=5))
    names = [site.name for site in manifest.sites]
    victim = names[1]
    settings = RunSettings(num_server_rounds=ROUNDS, expected_sites=len(names),
                           reply_timeout=REPLY_TIMEOUT, phase_timeout=PHASE_TIMEOUT,
                           node_wait_timeout=120.0,
                           strategy="fedavg",  # every round runs (Newton may stop early)
                           dp="record")  # the sites' default policy requires it
    run_config = replace(settings, sites_manifest=str(manifest.path),
                         schema=manifest.schema).to_run_config()
    cut_at, isolated = [0.0], [0]
    with site_networks(names) as net, coordinator(out, names, net.host_address) as dep:
        for name in names:
            register_site(dep, name)
        for site in manifest.sites:
            site_dir = out / "sites" / site.name
            start_supernode(dep, site.name, [*net.exec_in(site.name), *supernode_command(
                dep, site.name, data_file=site.data_file, site_dir=site_dir,
                site_features=list(site.site_features))], site_dir)

        def cut_as_round_2_starts(event: dict[str, Any]) -> None:
            if event.get("event") == "round" and event.get("round") == 1 and not cut_at[0]:
                isolated[0] = sum(in_namespace(dep.processes[n].pid, net.sites[n].namespace)
                                  for n in names)
                cut_at[0] = time.time()
                net.cut(victim)

        report = submit_run(dep.env, CONNECTION, run_config, out,
                            on_event=cut_as_round_2_starts, timeout=900)
    left = leftovers(net.prefix)
    ends = _round_ends(out)
    noticed = ends[2] - cut_at[0] if 2 in ends and cut_at[0] else None
    # What the cut cost round 2 beyond a round of the same two sites after it (the reply
    # timeout counts from the others' last reply, so this, not ``noticed``, is about it).
    later = sorted(ends[r] - ends[r - 1] for r in range(3, ROUNDS + 1) if r in ends)
    extra = (ends[2] - ends[1] - later[len(later) // 2]) if later and 1 in ends else None
    lost = report["sites"].get(victim, {})
    missed = (lost.get("lost") or [{}])[0].get("rounds_missed", [])
    rounds = [r["round"] for r in report["rounds"]]
    survivors = sorted(n for n, s in report["sites"].items() if s["status"] in FINISHED)
    passed = (rounds == list(range(1, ROUNDS + 1)) and lost.get("status") == "lost"
              and missed == list(range(2, ROUNDS + 1)) and len(survivors) == len(names) - 1
              and isolated[0] == len(names) and not left and not net.strays)
    return DrillResult(
        SCENARIO, "",
        f"{isolated[0]}/{len(names)} SuperNodes ran in their own namespace and reached the "
        f"gateway at {net.host_address}; rounds {rounds} completed by {', '.join(survivors)}; "
        f"{victim} marked {lost.get('status')} (missed rounds {missed}); noticed "
        + (f"{noticed:.1f} s" if noticed is not None else "never") + " after its link went down"
        + (f" (round 2 took {extra:.1f} s longer than a later round; reply timeout "
           f"{REPLY_TIMEOUT:.0f} s)" if extra is not None else "")
        + f"; left afterwards: {', '.join(left + net.strays) or 'none'}",
        passed,
        {"noticed_after_s": round(noticed, 1) if noticed is not None else None,
         "cut_round_extra_s": round(extra, 1) if extra is not None else None,
         "reply_timeout_s": REPLY_TIMEOUT, "rounds_completed": len(rounds),
         "rounds_missed_by_lost_site": len(missed), "sites_in_own_namespace": isolated[0],
         "left_after_cleanup": len(left), "processes_left_in_namespaces": len(net.strays)},
        {"lost": lost.get("lost"), "error": lost.get("error"),
         "coordinator_address": net.host_address,
         "site_addresses": {n: s.address for n, s in net.sites.items()}},
    )


def _round_ends(out: Path) -> dict[int, float]:
    """When each training round closed (wall clock, from the ServerApp's events)."""
    return {int(e["round"]): float(e["time"]) for e in _events(out) if e.get("event") == "round"}
