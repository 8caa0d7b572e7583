"""``fedadapt bench``: rounds to the pooled model, cost beside bare Flower, scale, a big site.

Every figure is measured in the one run, side by side, and written to ``OUT/bench.json``
(stable keys, docs in the README's "Benchmarks") with plots in ``OUT/plots/``:

- ``rounds_to_pooled.<data>.<strategy>``: rounds until the federated source model's held-out
  log-loss is within 0.005 of the pooled model's (None: never, in the rounds given);
- ``overhead.simulate_vs_bare`` / ``overhead.deploy_vs_bare``: wall-time ratios of fedadapt
  to the bare Flower app at the same nodes and rounds;
- ``scale.<sites>``: wall and per-round time, peak memory of every process, lost sites, the
  bare app beside it;
- ``correction_fit.<rows>``, ``predict_rows_per_s``: one big site's private work;
- ``bytes_per_round``: what a site sends per training round against the model's own size.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.report import to_jsonable
from shared.settings import RunSettings
from simulations.bench_rounds import rounds_to_pooled
from simulations.bench_scale import N_INPUTS, deploy_vs_bare, simulate_vs_bare
from simulations.datasets import prepare_data

log = logging.getLogger(__name__)

PARTS = ("rounds", "overhead", "scale", "site", "bytes")
TARGETS = {
    "newton_rounds": 5, "simulate_vs_bare": 1.3, "scale_vs_bare": 1.3, "scale_gib": 4.0,
    "scale_wall_s": 300.0, "fit_s": 20.0, "fit_gib": 2.0, "bytes_extra": 4096,
    "bytes_ratio": 1.1,
}

Say = Callable[[str], None]


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


def _rounds(out: Path, heart: Path | None, say: Say) -> dict[str, Any]:
    result: dict[str, Any] = {}
    sources = [("generated", "synthetic")] + ([("heart", f"heart:{heart}")] if heart else [])
    for label, spec in sources:
        say(f"rounds to the pooled model: {label} data, fedavg / fedprox / newton")
        manifest = prepare_data(spec, out / "data" / label, 8, 42)
        with _quiet_sites():
            result[label] = rounds_to_pooled(manifest, out / "rounds" / label,
                                             RunSettings(schema=manifest.schema))
    return result


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
    return {"site_bytes": site, "model_bytes": model, "ratio": site / model,
            "replies": len(sizes), "limit_bytes": TARGETS["bytes_ratio"] * model
            + TARGETS["bytes_extra"], "within_limit": site <= TARGETS["bytes_ratio"] * model
            + TARGETS["bytes_extra"]}


def run_bench(
    out: Path, *, heart: Path | None = None, parts: Sequence[str] = PARTS,
    scale_sites: Sequence[int] = (10, 100, 1000), scale_rounds: int = 10,
    fit_rows: Sequence[int] = (10_000, 100_000, 1_000_000), say: Say = print,
) -> dict[str, Any]:
    """Measure every part asked for; write ``bench.json`` and plots; return the results.

    Parameters
    ----------
    out : Path
        Output folder.
    heart : Path, optional
        Folder of the UCI Heart Disease files (rounds to pooled on real data too).
    parts : sequence of str
        Which of ``rounds``, ``overhead``, ``scale``, ``site``, ``bytes`` to measure.
    scale_sites : sequence of int
        Numbers of generated sites for the scale part.
    scale_rounds : int
        Training rounds in the scale part.
    fit_rows : sequence of int
        Training rows of the one big site (correction fit and predict).
    say : callable
        Where progress lines go.
    """
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    bench: dict[str, Any] = {"targets": TARGETS, "machine": _machine()}
    work = out / "runs"
    if "rounds" in parts:
        rounds = _rounds(out, heart, say)
        bench["rounds_to_pooled"] = {
            data: {s: r["rounds"] for s, r in res["strategies"].items()}
            for data, res in rounds.items()}
        bench["rounds_detail"] = rounds
        _write(out, bench)
    if "overhead" in parts or "bytes" in parts:
        say("fedadapt simulate (default world) beside the bare Flower app")
        sim = simulate_vs_bare(8, RunSettings().num_server_rounds, work)
        bench["overhead"] = {"simulate_vs_bare": sim["vs_bare"], "simulate": sim}
        bench["bytes_per_round"] = _bytes_per_round(work / "fedadapt-8")
        if "overhead" in parts:
            say("fedadapt deploy-local (3 sites, 5 rounds) beside the bare deployed app")
            dep = deploy_vs_bare(3, 5, work)
            bench["overhead"].update({"deploy_vs_bare": dep["vs_bare"], "deploy": dep})
    if "scale" in parts:
        bench["scale"] = {}
        for n in scale_sites:
            say(f"scale: {n} generated sites x {scale_rounds} rounds, and the bare app")
            bench["scale"][str(n)] = simulate_vs_bare(n, scale_rounds, work / "scale")
            _write(out, bench)
    if "site" in parts:
        from simulations.bench_site import correction_fit, predict_throughput

        bench["correction_fit"] = {}
        for rows in fit_rows:
            say(f"one site with {rows:,} rows and 40 features: correction fit")
            bench["correction_fit"][str(rows)] = correction_fit(rows)
            _write(out, bench)
        say("predict: rows per second")
        bench["predict_rows_per_s"] = predict_throughput(min(max(fit_rows), 100_000))
    bench["wall_s"] = time.monotonic() - t0
    _write(out, bench)
    from simulations.bench_plots import plot_bench

    bench["plots"] = plot_bench(bench, out / "plots")
    _write(out, bench)
    return bench


def _write(out: Path, bench: dict[str, Any]) -> None:
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(to_jsonable(bench), indent=2, allow_nan=False))
    tmp.replace(out / "bench.json")


def _machine() -> dict[str, Any]:
    import os
    import platform

    import flwr

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "flwr": flwr.__version__, "load_average": list(os.getloadavg())}
