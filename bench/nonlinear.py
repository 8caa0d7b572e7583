"""Does a non-linear correction win anywhere? Gradient boosting on top of the source logit.

The ``nonlinear`` part of ``fedadapt bench`` (docs/benchmarks.md); it needs LightGBM, which
fedadapt itself does not depend on (``pip install -e ".[bench]"``). For every site with at least
``MIN_ROWS`` training rows and every seeded split, it adds one candidate to a site's choice:
LightGBM boosted trees whose initial score is the source model's logit (so the trees learn a
correction), fitted on the same inputs as the linear candidates. The candidate goes through
the same rule as the others (cross-validated on the same folds: it must rank at least as well
as the source model, beat its log-loss by more than one paired standard error, and have the
lowest log-loss of those that do). The script reports how often it would be chosen and what
that choice does to the held-out AUC. The source model here is the pooled central model of
each split (``simulations.pooled``), which stands for the federated one (how close the two
are: the ``rounds`` part, docs/benchmarks.md). Nothing is tuned: the tree settings are
LightGBM's usual small-data ones, fixed below.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedStratifiedKFold

from client.adapt import CV_REPEATS, _auc, _row_loss, _site_prep, fit_correction
from client.data import read_site_data
from client.site import Manifest
from client.split import split_site
from shared.correction import correction_inputs
from shared.errors import FedadaptError
from shared.metrics import binary_metrics, sigmoid
from shared.preprocessing import TabularPreprocessor
from shared.schema import load_schema
from shared.settings import RunSettings
from shared.source_model import predict_logit
from simulations.datasets import prepare_data
from simulations.pooled import fit_central

log = logging.getLogger(__name__)

INSTALL = 'pip install -e ".[bench]"'  # the optional extra that brings LightGBM
MIN_ROWS = 200
TREES: dict[str, Any] = {
    "n_estimators": 100, "learning_rate": 0.05, "num_leaves": 4, "min_child_samples": 20,
    "subsample": 0.8, "subsample_freq": 1, "colsample_bytree": 0.8, "verbose": -1,
}


class MissingExtra(FedadaptError, ImportError):
    """A benchmark needs a package fedadapt does not depend on; the message says how to get it."""


def require_lightgbm() -> None:
    """Check, before anything runs, that LightGBM is installed.

    Raises
    ------
    MissingExtra
        Saying how to install it (the ``bench`` extra).
    """
    if importlib.util.find_spec("lightgbm") is None:
        raise MissingExtra(f"the nonlinear part needs LightGBM, which fedadapt does not "
                           f"install by default: {INSTALL} (or pip install lightgbm)")


def _boosting_oof(z: np.ndarray, y: np.ndarray, offset: np.ndarray, seed: int,
                  folds: int) -> np.ndarray:
    """Out-of-fold logits ``[repeat, row]`` of the boosted correction (same folds as the rule)."""
    from lightgbm import LGBMClassifier

    n = len(y)
    k = min(folds, int(min(y.sum(), n - y.sum())))
    oof = np.zeros((CV_REPEATS, n))
    splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=CV_REPEATS, random_state=seed)
    for fold, (tr, te) in enumerate(splitter.split(np.zeros(n), y)):
        model = LGBMClassifier(**TREES, random_state=seed).fit(z[tr], y[tr],
                                                                init_score=offset[tr])
        oof[fold // k, te] = offset[te] + model.predict(z[te], raw_score=True)
    return oof


def _site_split(
    x_tr: np.ndarray, own_tr: pd.DataFrame, off_tr: np.ndarray, y_tr: np.ndarray,
    x_te: np.ndarray, own_te: pd.DataFrame, off_te: np.ndarray, y_te: np.ndarray,
    site_features: list[Any], seed: int,
) -> dict[str, Any]:
    """One site and split: the linear rule's choice, and what adding boosting changes."""
    from lightgbm import LGBMClassifier

    chosen = fit_correction(x_tr, own_tr, off_tr, y_tr, site_features, seed=seed)
    linear_logit = off_te + chosen.alpha(x_te, own_te, site_features, off_te)
    prep = _site_prep(site_features, own_tr)
    z_tr = correction_inputs(x_tr, own_tr, prep)
    oof = _boosting_oof(z_tr, y_tr, off_tr, seed, 5)
    loss = np.mean([_row_loss(y_tr, oof[r]) for r in range(CV_REPEATS)], axis=0)
    diff = _row_loss(y_tr, off_tr) - loss
    gain, se = float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))
    auc = float(np.mean([_auc(y_tr, oof[r]) for r in range(CV_REPEATS)]))
    best_linear = float(chosen.cv.get("cv_log_loss", chosen.cv["cv_log_loss_source"]))
    wins = bool(gain > se and auc >= chosen.cv["cv_auc_source"] and loss.mean() < best_linear)
    final_logit = linear_logit
    if wins:
        model = LGBMClassifier(**TREES, random_state=seed).fit(z_tr, y_tr, init_score=off_tr)
        final_logit = off_te + model.predict(correction_inputs(x_te, own_te, prep),
                                             raw_score=True)
    return {"linear_choice": chosen.choice, "boosting_chosen": wins,
            "cv_gain": gain, "cv_se": se,
            "auc_linear": binary_metrics(y_te, sigmoid(linear_logit))["auc"],
            "auc_with_boosting": binary_metrics(y_te, sigmoid(final_logit))["auc"]}


def run(manifest: Manifest, settings: RunSettings, repeats: int) -> dict[str, Any]:
    """Every site with enough rows, every split: linear rule vs linear rule + boosting."""
    schema = load_schema(manifest.schema)
    shared = list(schema.shared_features)
    names = [f.name for f in shared]
    sites = [(s, read_site_data(s.data_file, schema, s.site_features)) for s in manifest.sites]
    results: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(repeats):
        seed = settings.split_seed(repeat)
        splits = {s.name: split_site(d, protocol=settings.protocol, seed=seed,
                                     test_fraction=settings.test_fraction) for s, d in sites}
        train = pd.concat([d.features[names].iloc[splits[s.name].train] for s, d in sites])
        y = np.concatenate([d.label[splits[s.name].train] for s, d in sites])
        prep = TabularPreprocessor(features=shared).fit(train)
        model = fit_central(prep.transform(train), y, settings, seed=settings.seed + repeat)
        for site, data in sites:
            tr, te = splits[site.name].train, splits[site.name].test
            if len(tr) < MIN_ROWS or min(data.label[tr].sum(), len(tr) - data.label[tr].sum()) < 5:
                continue
            x = prep.transform(data.features[names])
            offset = predict_logit(model, x)
            own = data.features[list(data.site_columns)]
            defs = list(schema.resolve_site_features(list(site.site_features)))
            results.setdefault(site.name, []).append(_site_split(
                x[tr], own.iloc[tr], offset[tr], data.label[tr], x[te], own.iloc[te],
                offset[te], data.label[te], defs, seed))
        log.info("repeat %d done", repeat)
    summary = {}
    for name, rows in results.items():
        both = [(r["auc_linear"], r["auc_with_boosting"]) for r in rows
                if not (math.isnan(r["auc_linear"]) or math.isnan(r["auc_with_boosting"]))]
        summary[name] = {
            "splits": len(rows),
            "boosting_chosen": sum(r["boosting_chosen"] for r in rows),
            "mean_auc_linear": float(np.mean([a for a, _ in both])) if both else None,
            "mean_auc_with_boosting": float(np.mean([b for _, b in both])) if both else None,
        }
    return {"sites": summary, "trees": TREES, "min_rows": MIN_ROWS}


def nonlinear(out: Path, heart: Path | None = None, splits: int = 10,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """The linear rule against the rule with boosting, on the generated world (and heart).

    Parameters
    ----------
    out : Path
        Working folder (the generated data).
    heart : Path, optional
        Folder of the UCI Heart Disease files: their centres too.
    splits : int
        Seeded splits per data set.
    say : callable
        Told one line per site.

    Returns
    -------
    dict
        Per data set (``generated``, ``heart``), what :func:`run` returns.
    """
    require_lightgbm()
    data = {"generated": "synthetic"} | ({"heart": f"heart:{heart}"} if heart else {})
    results = {}
    for label, spec in data.items():
        manifest = prepare_data(spec, out / label, 8, 42)
        results[label] = run(manifest, RunSettings(schema=manifest.schema), splits)
        say(f"{label}, {splits} splits (sites with >= {MIN_ROWS} training rows):")
        for name, s in results[label]["sites"].items():
            say(f"  {name:12s} boosting chosen in {s['boosting_chosen']}/{s['splits']}; "
                f"held-out AUC linear rule {_auc_text(s['mean_auc_linear'])}, with boosting "
                f"{_auc_text(s['mean_auc_with_boosting'])}")
    return results


def _auc_text(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"
