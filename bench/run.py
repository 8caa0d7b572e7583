"""``fedadapt bench``: every benchmark is a part of one run, its figures in one ``bench.json``.

Parts (``bench.options.PARTS``; what each measures and how to read it: docs/benchmarks.md):

- ``rounds``: rounds until the federated source model's held-out log-loss is within 0.005 of
  the pooled model's, per training strategy (``bench.rounds``);
- ``overhead``: ``fedadapt simulate`` and ``deploy-local`` beside the bare Flower app at the
  same nodes and rounds (``bench.scale``);
- ``scale``: many generated sites: wall and round time, peak memory, lost sites, the bare app
  beside them;
- ``site``: one big site's private work: model choice, local-only model, ``predict``
  (``bench.big_site``);
- ``bytes``: what a site sends per training round against the model's own size;
- ``choice``: the targets of each site's model choice (``bench.choice``);
- ``deploy``: the same run deployed and simulated (``bench.deployed``);
- ``privacy``: utility against privacy per epsilon (``bench.privacy``; also ``privacy.md``);
- ``nonlinear``: boosted trees as one more correction candidate (``bench.nonlinear``; needs
  the ``bench`` extra);
- ``secagg``: a secure sum at 4 to 1,000 sites, a deployed round with and without secure
  aggregation (``bench.secure``);
- ``bare``: the bare Flower app alone (``bench.bare``).

Every part's figures go under its own keys of ``OUT/bench.json`` as soon as it is done; plots
go to ``OUT/plots/``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.options import BenchOptions
from bench.scale import N_INPUTS
from server.report import to_jsonable
from shared.files import write_atomically
from shared.settings import RunSettings

log = logging.getLogger(__name__)

TARGETS = {
    "newton_rounds": 5, "simulate_vs_bare": 1.3, "scale_vs_bare": 1.3, "scale_gib": 4.0,
    "scale_wall_s": 300.0, "fit_s": 20.0, "fit_gib": 2.0, "bytes_extra": 4096,
    "bytes_ratio": 1.1,
}
# The site part's keys of bench.json, and what each measurement is, for people.
SITE_KEYS = {"fit": "correction_fit", "local": "local_fit", "predict": "predict"}
SITE_WHAT = {"fit": "the model choice (correction fit)", "local": "the local-only model",
             "predict": "predict"}

Say = Callable[[str], None]
Part = Callable[[dict[str, Any], Path, BenchOptions, Say], None]


@contextmanager
def _quiet_sites() -> Iterator[None]:
    """The in-process sites' and coordinator's log lines would bury the progress lines."""
    loggers = [logging.getLogger(n) for n in ("client", "server", "shared", "flwr")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _rounds(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    from bench.rounds import rounds_to_pooled
    from simulations.datasets import prepare_data

    result: dict[str, Any] = {}
    sources = [("generated", "synthetic")] + ([("heart", f"heart:{o.heart}")] if o.heart else [])
    for label, spec in sources:
        say(f"rounds to the pooled model: {label} data, fedavg / fedprox / newton")
        manifest = prepare_data(spec, out / "data" / label, 8, 42)
        result[label] = rounds_to_pooled(manifest, out / "rounds" / label,
                                         RunSettings(schema=manifest.schema))
    bench["rounds_to_pooled"] = {
        data: {s: r["rounds"] for s, r in res["strategies"].items()}
        for data, res in result.items()}
    bench["rounds_detail"] = result


def _bytes_per_round(run_dir: Path) -> dict[str, Any]:
    """Median bytes of a site's training reply against the source model's bytes (float64)."""
    path = run_dir / "replies.jsonl"
    sizes = []
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("type") == "train" and "bytes" in entry:
                sizes.append(int(entry["bytes"]))
    model = (N_INPUTS + 1) * 8
    if not sizes:
        return {"site_bytes": None, "model_bytes": model, "ratio": None, "replies": 0}
    sizes.sort()
    site = sizes[len(sizes) // 2]
    limit = TARGETS["bytes_ratio"] * model + TARGETS["bytes_extra"]
    return {"site_bytes": site, "model_bytes": model, "ratio": site / model,
            "replies": len(sizes), "limit_bytes": limit, "within_limit": site <= limit}


def _overhead(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    """The overhead part, and the bytes part (which reads the same default run's replies)."""
    from bench.scale import deploy_vs_bare, simulate_vs_bare

    work = out / "runs"
    say("fedadapt simulate (default world) beside the bare Flower app")
    sim = simulate_vs_bare(8, RunSettings().num_server_rounds, work)
    bench["overhead"] = {"simulate_vs_bare": sim["vs_bare"], "simulate": sim}
    bench["bytes_per_round"] = _bytes_per_round(work / "fedadapt-8")
    if "overhead" in o.parts:
        say("fedadapt deploy-local (3 sites, 5 rounds) beside the bare deployed app")
        dep = deploy_vs_bare(3, 5, work)
        bench["overhead"].update({"deploy_vs_bare": dep["vs_bare"], "deploy": dep})


def _scale(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    from bench.scale import simulate_vs_bare

    bench["scale"] = {}
    for n in o.scale_sites:
        say(f"scale: {n} generated sites x {o.scale_rounds} rounds, and the bare app")
        bench["scale"][str(n)] = simulate_vs_bare(n, o.scale_rounds, out / "runs" / "scale")
        _write(out, bench)


def _site(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    from bench.big_site import measure

    for kind in o.site_measures:
        results = bench[SITE_KEYS[kind]] = {}
        for rows in o.sizes(kind):
            say(f"one site with {rows:,} rows and {o.site_features} features: "
                f"{SITE_WHAT[kind]}")
            results[str(rows)] = measure(kind, rows, o.site_features, o.site_seed,
                                         time_limit=o.time_limit,
                                         memory_limit_gib=o.memory_limit)
            _write(out, bench)
    if "predict" in o.site_measures:  # at the largest size measured to the end
        done = {int(n): r for n, r in bench["predict"].items() if r["status"] == "ok"}
        bench["predict_rows_per_s"] = done[max(done)]["rows_per_s"] if done else None


def _choice(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    from bench.choice import model_choice

    say("the model choice's targets: the default run, the rule on generated (and heart) data")
    bench["choice"] = model_choice(out / "choice", o.heart, o.choice_splits,
                                   o.choice_generated_splits, say)


def _deploy(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    from bench.deployed import deploy_vs_simulation

    say(f"fedadapt deploy-local and simulate, {o.deploy_sites} sites each")
    bench["deploy"] = deploy_vs_simulation(out / "deploy", o.deploy_sites)


def _privacy(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    from bench.privacy import markdown, utility_vs_privacy

    levels = ", ".join(f"{e:g}" for e in o.epsilons)
    say(f"utility against privacy: {o.data}, {o.splits} splits, no DP and epsilon {levels} "
        "(one whole run per split and level)")
    bench["privacy"] = result = utility_vs_privacy(
        o.data, out / "privacy", o.settings, splits=o.splits, epsilons=o.epsilons,
        stats_dp=o.stats_dp, progress=say)
    write_atomically(out / "privacy.md", markdown(result).encode())


def _nonlinear(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    from bench.nonlinear import nonlinear

    say("a non-linear correction (boosted trees) as one more candidate of the rule")
    bench["nonlinear"] = nonlinear(out / "nonlinear", o.heart, o.nonlinear_splits, say)


def _secagg(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    from bench.secure import VALUES, deployed_rounds, secure_sum_cost

    result: dict[str, Any] = {"sums": {}}
    bench["secagg"] = result
    for n in o.secagg_sites:
        ring = 0 if n - 1 <= o.secagg_ring else o.secagg_ring
        say(f"secure aggregation: one secure sum of {VALUES} values at {n} sites "
            f"({ring or n - 1} neighbours each), in this process")
        result["sums"][str(n)] = secure_sum_cost(n, ring)
        _write(out, bench)
    if o.secagg_deployed:
        say("secure aggregation: a deployed run (4 sites, TLS) with and without it")
        result["deployed"] = deployed_rounds(out / "secagg")


def _bare(bench: dict[str, Any], out: Path, o: BenchOptions, say: Say) -> None:
    from bench.bare import run_bare_deployed, run_bare_simulation

    how = "deployed (TLS)" if o.bare_deployed else "simulated"
    say(f"the bare Flower app, {how}: {o.bare_nodes} nodes x {o.bare_rounds} rounds")
    if o.bare_deployed:
        bench["bare"] = run_bare_deployed(
            o.bare_nodes, o.bare_rounds, o.bare_inputs, out / "bare", rows=o.bare_rows,
            poll_interval=o.bare_poll_interval, gateway=o.bare_gateway, timeout=o.bare_timeout)
    else:
        bench["bare"] = run_bare_simulation(
            o.bare_nodes, o.bare_rounds, o.bare_inputs, out / "bare", rows=o.bare_rows,
            poll_interval=o.bare_poll_interval, timeout=o.bare_timeout)


# In the order they run; the bytes part is measured with the overhead part's default run.
RUNNERS: dict[str, Part] = {
    "rounds": _rounds, "overhead": _overhead, "scale": _scale, "site": _site,
    "choice": _choice, "deploy": _deploy, "privacy": _privacy, "nonlinear": _nonlinear,
    "secagg": _secagg, "bare": _bare,
}


def run_bench(out: Path, options: BenchOptions | None = None, *,
              say: Say = print) -> dict[str, Any]:
    """Measure every part asked for; write ``bench.json`` and plots; return the figures.

    Parameters
    ----------
    out : Path
        Output folder (``bench.json``, ``plots/``, each part's working folder).
    options : BenchOptions, optional
        The parts and their settings (by default ``fedadapt bench``'s).
    say : callable
        Where progress lines go.

    Raises
    ------
    ValueError
        If the options cannot run (:meth:`BenchOptions.problems`), before anything runs.
    bench.nonlinear.MissingExtra
        If the nonlinear part is asked for without LightGBM, before anything runs.
    """
    o = options or BenchOptions()
    problems = o.problems()
    if problems:
        raise ValueError("; ".join(problems))
    if "nonlinear" in o.parts:
        from bench.nonlinear import require_lightgbm

        require_lightgbm()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    bench: dict[str, Any] = {"parts": list(o.parts), "targets": TARGETS, "machine": _machine()}
    for name, part in RUNNERS.items():
        if name in o.parts or (name == "overhead" and "bytes" in o.parts):
            with _quiet_sites():
                part(bench, out, o, say)
            _write(out, bench)
    bench["wall_s"] = time.monotonic() - t0
    from bench.plots import plot_bench

    bench["plots"] = plot_bench(bench, out / "plots")
    _write(out, bench)
    return bench


def _write(out: Path, bench: dict[str, Any]) -> None:
    write_atomically(out / "bench.json",
                     json.dumps(to_jsonable(bench), indent=2, allow_nan=False).encode())


def _machine() -> dict[str, Any]:
    import os
    import platform
    from datetime import UTC, datetime

    import flwr
    import numpy

    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "flwr": flwr.__version__,
            "numpy": numpy.__version__, "load_average": list(os.getloadavg())}
