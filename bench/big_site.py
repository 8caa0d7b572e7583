"""One big site's private work: its model choice, its local-only model and ``predict``.

The ``site`` part of ``fedadapt bench`` (docs/benchmarks.md). Each measurement runs in a fresh
Python process (one per size and kind), so that its peak memory is its own: the peak resident
set size (RSS) of that process while the measured call runs, minus its RSS just before the
call (the data it was given; ``bench.memory.PeakRss``). Seconds are the wall time of the
measured call alone (and its CPU time beside it): fit_correction and fit_predict_local with one
BLAS thread, as the ClientApp runs them; predict_file as ``fedadapt predict`` runs it. A
measurement is stopped when its call runs longer than ``time_limit`` seconds or its process
grows beyond ``memory_limit_gib`` (``fedadapt bench --time-limit --memory-limit``).

The site is generated with plain numpy (nothing here is tuned to the method): n_features raw
clinical-like columns, three quarters shared (the source model's) and a quarter the site's own,
correlated through four latent factors, a quarter of each kind binary, some cells missing at
random; labels from a logistic truth over the latent values of both kinds with one term no
linear model captures; the source model (a logistic regression the federation trained on
another population, preprocessed by the federation) transports the shared effects with error
and the wrong base rate: informative, imperfect, and blind to the site's own features.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from bench.memory import GIB, PeakRss
from bench.options import MEMORY_LIMIT_GIB, TIME_LIMIT_S
from deploy.process_guard import die_with_parent
from shared.preprocessing import TabularPreprocessor
from shared.schema import Feature, Schema, parse_schema

log = logging.getLogger(__name__)


FACTORS = 4  # latent factors that correlate the columns
FEDERATION_ROWS = 20_000  # rows of the other population the federation's preprocessing saw
PREDICT_TRAIN_ROWS = 5_000  # training rows of the sealed correction ``predict`` applies
SITE_NAME = "bench-site"
LABEL = "outcome"


# --------------------------------------------------------------------------- the site


@dataclass
class BenchSite:
    """A generated site: raw rows, labels, and the source model that scores them.

    Attributes
    ----------
    schema : Schema
        The data contract of the rows (shared and site-only features).
    rows : pandas.DataFrame
        Raw values, one float column per feature, NaN where missing.
    label : numpy.ndarray
        0/1 outcome per row.
    shared_prep : TabularPreprocessor
        The federation's preprocessing of the shared features (fitted on another population).
    source_weight : numpy.ndarray
        The source logistic regression's weights over ``shared_prep``'s outputs.
    source_bias : float
        Its intercept.
    """

    schema: Schema
    rows: pd.DataFrame
    label: np.ndarray
    shared_prep: TabularPreprocessor
    source_weight: np.ndarray
    source_bias: float

    @property
    def shared_names(self) -> list[str]:
        """The shared feature columns."""
        return [f.name for f in self.schema.shared_features]

    @property
    def site_features(self) -> list[Feature]:
        """The site-only features."""
        return list(self.schema.site_features)

    def inputs(self) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
        """The source model's inputs, the site-only columns and the source model's logits."""
        x = self.shared_prep.transform(self.rows[self.shared_names])
        offset = self.source_bias + x @ self.source_weight
        return x, self.rows[[f.name for f in self.site_features]], offset


def schema_text(n_features: int = 40) -> str:
    """TOML of the benchmark's schema: ``s01...`` shared, ``x01...`` site-only features.

    Parameters
    ----------
    n_features : int
        Features in all; a quarter (at least one) are site-only, every fourth one is binary.

    Returns
    -------
    str
        A schema :func:`shared.schema.parse_schema` reads.
    """
    import tomli_w

    n_site = max(1, n_features // 4)
    n_shared = n_features - n_site
    if n_shared < 1:
        raise ValueError("n_features must be at least 2 (one shared, one site-only)")
    features = []
    for scope, prefix, count in (("shared", "s", n_shared), ("site", "x", n_site)):
        for j in range(count):
            binary = j % 4 == 3
            spec: dict[str, Any] = {"name": f"{prefix}{j + 1:02d}",
                                    "kind": "binary" if binary else "numeric", "scope": scope}
            if not binary:
                spec["range"] = [0, 10_000]
            if scope == "site":
                spec["required"] = False
            features.append(spec)
    return tomli_w.dumps({
        "schema": {"name": "bench", "version": "1",
                   "description": "Generated site of bench.big_site."},
        "file": {"format": "csv", "header": True, "delimiter": ",",
                 "missing_markers": ["", "NA"]},
        "label": {"column": LABEL, "negative_values": [0], "positive_values": [1]},
        "features": features,
    })


def _draw(schema: Schema, n: int, rng: np.random.Generator, shift: float,
          params: dict[str, np.ndarray]) -> tuple[pd.DataFrame, np.ndarray]:
    """Raw rows of a population (``shift``: its latent factors' mean) and latent values."""
    features = list(schema.features)
    d = len(features)
    factors = rng.normal(shift, 1.0, size=(n, FACTORS))
    latent = factors @ params["loadings"] + rng.normal(size=(n, d)) * params["unique"]
    latent /= params["latent_sd"]  # unit variance in the site's population
    columns: dict[str, np.ndarray] = {}
    for j, f in enumerate(features):
        if f.kind == "binary":
            columns[f.name] = (latent[:, j] > params["threshold"][j]).astype(float)
        else:
            columns[f.name] = np.round(params["mean"][j] + params["sd"][j] * latent[:, j], 1)
        rate = params["missing"][j]
        if rate > 0:
            columns[f.name][rng.random(n) < rate] = np.nan
    return pd.DataFrame(columns), latent


def make_site(rows: int, n_features: int = 40, seed: int = 0, draw: int = 0) -> BenchSite:
    """Generate the benchmark site (see ``ABOUT``).

    Parameters
    ----------
    rows : int
        Rows (patients) of the site.
    n_features : int
        Raw features (three quarters shared, a quarter site-only).
    seed : int
        Seed of the world (the truth, the federation and its source model) and of the rows.
        A seed gives the same world at every size: sizes differ only in their rows.
    draw : int
        Which patients of that world: 0 the training rows, another number new patients of the
        same population.

    Returns
    -------
    BenchSite
        Rows, labels, the federation's preprocessing and source model.
    """
    schema = parse_schema(schema_text(n_features), source="bench")
    features = list(schema.features)
    d = len(features)
    shared = np.array([f.scope == "shared" for f in features])
    world_seed, federation_seed, patients_seed = np.random.SeedSequence(seed).spawn(3)
    world = np.random.default_rng(world_seed)
    loadings = world.normal(0.0, 0.6, size=(FACTORS, d))
    unique = np.full(d, 0.8)
    mean = world.uniform(20.0, 150.0, d)
    params = {
        "loadings": loadings, "unique": unique,
        "latent_sd": np.sqrt((loadings**2).sum(axis=0) + unique**2),
        "threshold": world.uniform(0.0, 1.3, d),  # binary prevalences 10-50 %
        # Spreads of 10-25 % of the mean: a value below 0 (out of range, counted) is rare.
        "mean": mean, "sd": world.uniform(0.1, 0.25, d) * mean,
        # A third of the shared columns 2 % missing; the site's own tests 8 % (fewer done).
        "missing": np.where(shared, np.where(np.arange(d) % 3 == 1, 0.02, 0.0), 0.08),
    }
    # The truth: every latent column may matter; half the effects are small.
    beta = world.normal(0.0, 0.35, d) * np.where(world.random(d) < 0.5, 1.0, 0.2)
    intercept = -2.0
    transport_error = world.normal(0.0, 0.15, int(shared.sum()))
    patients = np.random.default_rng(patients_seed.spawn(draw + 1)[draw])
    frame, latent = _draw(schema, rows, patients, 0.0, params)
    logit = intercept + latent @ beta + 0.25 * (latent[:, 0] ** 2 - 1.0)
    label = (patients.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    del latent, logit
    # The federation: another population (factors shifted), preprocessing fitted there.
    other, _ = _draw(schema, FEDERATION_ROWS, np.random.default_rng(federation_seed), 0.2,
                     params)
    shared_features = list(schema.shared_features)
    prep = TabularPreprocessor(shared_features).fit(other[[f.name for f in shared_features]])
    # Its model: the shared effects, transported with error, on the standardised inputs; a
    # base rate 0.5 logits too high; nothing on the missingness indicators.
    weight = np.zeros(len(prep.feature_names_out_))
    weight[:len(shared_features)] = 0.85 * (beta[shared] + transport_error)
    return BenchSite(schema, frame, label, prep, weight, intercept + 0.5)


# --------------------------------------------------------------------------- measuring


def _started() -> None:
    """Tell :func:`measure` that the measured call starts now (its time limit counts from here)."""
    marker = os.environ.get("BENCH_SITE_STARTED")
    if marker:
        Path(marker).touch()


def _fit_worker(rows: int, n_features: int, seed: int) -> dict[str, Any]:
    """In this process: generate the site, time ``fit_correction`` and its peak memory."""
    from client.adapt import fit_correction

    site = make_site(rows, n_features, seed)
    x, own, offset = site.inputs()
    y, features = site.label, site.site_features
    del site
    _started()
    # One BLAS thread, as the ClientApp runs every phase (client.client_app).
    with PeakRss(interval=0.5) as mem, threadpool_limits(limits=1):
        t0, c0 = time.perf_counter(), time.process_time()
        correction = fit_correction(x, own, offset, y, features, folds=5, seed=seed)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "peak_gib": mem.increase_gib,
            "data_gib": mem.start_bytes / GIB, "choice": correction.choice,
            "shared_inputs": x.shape[1], "weights": len(correction.coef),
            "prevalence": float(y.mean()), "cv": correction.cv}


def _local_worker(rows: int, n_features: int, seed: int) -> dict[str, Any]:
    """In this process: time ``fit_predict_local`` (evaluate's local-only model), 30 % held out."""
    from client.local_model import fit_predict_local

    site = make_site(rows, n_features, seed)
    n_test = int(0.3 * rows / 0.7)  # ``rows`` training rows, as in the correction fit
    test = make_site(n_test, n_features, seed, draw=1).rows
    features = [*site.schema.shared_features, *site.schema.site_features]
    train, y = site.rows, site.label
    del site
    _started()
    with PeakRss(interval=0.5) as mem, threadpool_limits(limits=1):
        t0, c0 = time.perf_counter(), time.process_time()
        risk = fit_predict_local(train, y, test, features, folds=5, seed=seed)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "peak_gib": mem.increase_gib,
            "data_gib": mem.start_bytes / GIB, "mean_risk": float(risk.mean())}


def build_predict_site(folder: Path, rows: int, n_features: int = 40, seed: int = 0) -> tuple[
    Path, Path
]:
    """A site folder as a completed run leaves it, and a CSV of ``rows`` new patients.

    The site keeps the source model (``corrections/model-*.json``) and its correction sealed
    under the site's key, fitted by :func:`client.adapt.fit_correction` on
    ``PREDICT_TRAIN_ROWS`` rows: what ``client.jobs.adapt_job`` stores, written with the same
    functions. The patients' file has no label column.

    Parameters
    ----------
    folder : Path
        An empty folder; gets ``site/``, ``schema.toml`` and ``patients.csv``.
    rows : int
        New patients to score.
    n_features : int
        Raw features of the schema.
    seed : int
        Seed of the site.

    Returns
    -------
    tuple of Path
        The site folder and the patients' file.
    """
    import torch

    from client.adapt import fit_correction
    from client.correction_store import save_correction
    from client.source_model_store import model_digest, model_document, save_source_model
    from shared.source_model import build_model, to_arrays

    schema_file = folder / "schema.toml"
    schema_file.write_text(schema_text(n_features), encoding="utf-8")
    train = make_site(PREDICT_TRAIN_ROWS, n_features, seed)
    x, own, offset = train.inputs()
    with threadpool_limits(limits=1):  # as the ClientApp's adapt phase
        correction = fit_correction(x, own, offset, train.label, train.site_features,
                                    seed=seed)
    model = build_model("logreg", x.shape[1])
    state = model.state_dict()  # the logistic regression's own tensors
    state["net.weight"].copy_(torch.as_tensor(train.source_weight)[None, :])
    state["net.bias"].fill_(train.source_bias)
    document = model_document(to_arrays(model), {
        "run-id": 1, "repeat": 0, "site-name": SITE_NAME,
        "site-features": [f.name for f in train.site_features],
        "schema": str(schema_file), "schema-digest": train.schema.digest(),
        "model": "logreg", "hidden-units": 16,
        "preprocessing": train.shared_prep.to_dict(),
    })
    site_dir = folder / "site"
    save_correction(site_dir, SITE_NAME, model_digest(document), correction.to_dict())
    save_source_model(site_dir, document)
    # New patients of the same population, as the site exports them.
    patients = make_site(rows, n_features, seed, draw=1).rows
    binary = [f.name for f in train.schema.features if f.kind == "binary"]
    patients[binary] = patients[binary].astype("Int64")
    path = folder / "patients.csv"
    patients.to_csv(path, index=False, na_rep="", float_format="%.1f")
    return site_dir, path


def _predict_worker(rows: int, n_features: int, seed: int) -> dict[str, Any]:
    """In this process: build the site and its patients' file, time ``predict_file``."""
    import shared.source_model  # noqa: F401  (torch: imported before the clock starts)
    from client.predict import predict_file

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        site_dir, patients = build_predict_site(Path(tmp), rows, n_features, seed)
        input_mib = patients.stat().st_size / 2**20
        _started()
        # As `fedadapt predict` runs it (the command sets no thread limit).
        with PeakRss(interval=0.5) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            summary = predict_file(site_dir, patients, Path(tmp) / "risks.csv")
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if summary.rows != rows:
            raise RuntimeError(f"predict scored {summary.rows} rows of {rows}")
    return {"seconds": seconds, "cpu_s": cpu, "rows_per_s": rows / seconds,
            "peak_gib": mem.increase_gib,
            "input_mib": input_mib, "corrected_rows": summary.corrected_rows}


WORKERS = {"fit": _fit_worker, "local": _local_worker, "predict": _predict_worker}


def measure(kind: str, rows: int, n_features: int = 40, seed: int = 0, *,
            time_limit: float = TIME_LIMIT_S,
            memory_limit_gib: float = MEMORY_LIMIT_GIB) -> dict[str, Any]:
    """Run one measurement in a fresh Python process, within time and memory limits.

    Parameters
    ----------
    kind : {"fit", "local", "predict"}
        ``fit_correction``, ``fit_predict_local`` or ``predict_file``.
    rows : int
        Training rows (fit, local) or rows to score (predict).
    n_features : int
        Raw features of the site.
    seed : int
        Seed of the site.
    time_limit : float
        Seconds the measured call may run before the process is stopped (generating the
        data before it may take as long again).
    memory_limit_gib : float
        RSS of the process beyond which it is stopped (checked 5 times a second).

    Returns
    -------
    dict
        The worker's numbers and ``status`` ``"ok"``; or ``status`` ``"stopped: ..."`` with
        the elapsed ``wall_s`` and the largest RSS seen; or ``"failed: ..."``.
    """
    if kind not in WORKERS:
        raise ValueError(f"unknown measurement {kind!r}; use one of {', '.join(WORKERS)}")
    with tempfile.TemporaryDirectory(prefix="bench-site-") as tmp:
        result, started = Path(tmp) / "result.json", Path(tmp) / "started"
        cmd = [sys.executable, "-m", "bench.big_site", kind, str(rows), str(n_features),
               str(seed), str(result)]
        err = Path(tmp) / "stderr.txt"
        t0 = time.monotonic()
        call_t0: float | None = None
        with err.open("wb") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr,
                                    env={**os.environ, "BENCH_SITE_STARTED": str(started)})
        status = ""
        with PeakRss(proc.pid) as seen:
            while proc.poll() is None:
                now = time.monotonic()
                if call_t0 is None and started.exists():
                    call_t0 = now
                # The limit counts from the measured call; generating the data gets as long
                # again.
                if now - (call_t0 if call_t0 is not None else t0) > time_limit:
                    status = f"stopped: over {time_limit:g} s" + (
                        "" if call_t0 is not None else " generating the data")
                elif seen.peak_gib > memory_limit_gib:
                    status = f"stopped: over {memory_limit_gib:g} GiB"
                if status:
                    proc.kill()  # our own child, by its id
                    proc.wait()
                    break
                time.sleep(0.2)
        wall, largest = time.monotonic() - t0, seen.peak_gib
        if status:
            return {"status": status, "wall_s": wall, "rss_seen_gib": largest,
                    "load_average": os.getloadavg()[0]}
        if proc.returncode != 0 or not result.is_file():
            tail = err.read_text(errors="replace").strip().splitlines()[-1:]
            return {"status": f"failed: exit {proc.returncode}: {' '.join(tail)}",
                    "wall_s": wall}
        return {"status": "ok", **json.loads(result.read_text()), "wall_s": wall,
                "rss_seen_gib": largest, "load_average": os.getloadavg()[0]}


def correction_fit(rows: int, n_features: int = 40, seed: int = 0) -> dict[str, Any]:
    """Time the site's model choice (``client.adapt.fit_correction``) on ``rows`` training rows.

    Runs in a fresh process (see :func:`measure`): ``seconds`` is the wall time of the
    ``fit_correction`` call alone (the whole choice among candidates and the final fit), not
    the data's generation nor the interpreter's start-up.

    Parameters
    ----------
    rows : int
        Training rows of the site.
    n_features : int
        Raw features (three quarters shared, a quarter the site's own).
    seed : int
        Seed of the site and of the folds.

    Returns
    -------
    dict
        ``seconds``, ``peak_gib`` (peak RSS during the call above the RSS before it),
        ``choice`` (the chosen candidate), ``status`` and the rest of the worker's numbers;
        a stopped or failed measurement has no ``seconds``.
    """
    return measure("fit", rows, n_features, seed)


def predict_throughput(rows: int, n_features: int = 40, seed: int = 0) -> float:
    """Rows per second of ``fedadapt predict``'s scoring (``client.predict.predict_file``).

    Times the ``predict_file`` call alone, in a fresh process, on a site folder with a sealed
    correction and a CSV of ``rows`` new patients: reading and validating the file, the source
    model, the correction and writing the risks; not the interpreter's start-up or imports.

    Parameters
    ----------
    rows : int
        New patients in the file.
    n_features : int
        Raw features of the schema.
    seed : int
        Seed of the site.

    Returns
    -------
    float
        Rows scored per second; NaN if the measurement was stopped or failed.
    """
    result = measure("predict", rows, n_features, seed)
    return float(result["rows_per_s"]) if result["status"] == "ok" else math.nan


def _work(kind: str, rows: str, n_features: str, seed: str, result: str) -> None:
    """The measuring process: run one worker, write its numbers to ``result`` (JSON)."""
    die_with_parent()
    logging.basicConfig(level=logging.WARNING)
    out = WORKERS[kind](int(rows), int(n_features), int(seed))
    Path(result).write_text(json.dumps(out, default=float))


if __name__ == "__main__":  # started by measure(): KIND ROWS FEATURES SEED RESULT
    _work(*sys.argv[1:6])
