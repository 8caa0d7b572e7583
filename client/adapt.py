"""Fitting a site's private correction: strength chosen by cross-validation on training rows only.

Candidates, from simplest to strongest: no correction, an intercept-only recalibration
(``C = 0``), and penalised corrections of increasing strength ``C``. Each is scored by
repeated K-fold cross-validation inside the site's training rows (stratified; the site-local
preprocessing is refitted in every fold), giving every training row an out-of-fold log-loss.
A candidate is eligible only if its cross-validated AUC is at least the source model's (an
intercept shift keeps the ranking, so it always is). The choice follows the one-standard-error
rule on paired per-row losses: the simplest eligible candidate whose mean log-loss is within
one standard error of the best one's. A correction is thus applied only where the site's own
data show it helps, and "no correction" is kept otherwise. The held-out rows are never seen.

Feature corrections need at least ``MIN_CLASS_ROWS`` training rows of each class (the usual
"ten events per variable" caution: with fewer, a cross-validated AUC rests on a handful of
patients and cannot vouch for a correction). Below that only the recalibration is tried; with
fewer than two rows of a class it is cross-validated by plain K-fold on log-loss: AUC cannot
be validated, but the site's prevalence can.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold

from shared.correction import Correction, OffsetLogisticRegression, correction_inputs
from shared.preprocessing import TabularPreprocessor
from shared.schema import Feature

log = logging.getLogger(__name__)

STRENGTHS = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
CV_REPEATS = 3
MIN_CLASS_ROWS = 10


def fit_correction(
    x_shared: np.ndarray,
    site_rows: pd.DataFrame,
    offset: np.ndarray,
    y: np.ndarray,
    site_features: Sequence[Feature],
    *,
    folds: int = 5,
    seed: int = 0,
    strengths: Sequence[float] = STRENGTHS,
) -> Correction:
    """Choose and fit the correction on a site's training rows.

    Parameters
    ----------
    x_shared : numpy.ndarray
        The source model's inputs for the training rows.
    site_rows : pandas.DataFrame
        The training rows' site-only feature columns (may have no columns).
    offset : numpy.ndarray
        The frozen source model's logits for the training rows.
    y : numpy.ndarray
        Labels of the training rows.
    site_features : sequence of Feature
        Definitions of ``site_rows``' columns.
    folds : int
        Folds of the cross-validation (reduced when a class has fewer rows).
    seed : int
        Seed of the fold assignment.
    strengths : sequence of float
        Candidate values of ``C``.

    Returns
    -------
    Correction
        ``applied=False`` when no candidate beats the source model in cross-validation or
        when a class has fewer than two training rows.
    """
    names = [f.name for f in site_features]
    y = np.asarray(y, dtype=int)
    n = len(y)
    minority = int(min(y.sum(), n - y.sum()))
    if minority >= 2:
        k = min(folds, minority)
        splitter: Any = RepeatedStratifiedKFold(n_splits=k, n_repeats=CV_REPEATS,
                                                random_state=seed)
        candidates = [c for c in strengths if c == 0.0 or minority >= MIN_CLASS_ROWS]
    else:
        k = min(folds, n)
        splitter = RepeatedKFold(n_splits=k, n_repeats=CV_REPEATS, random_state=seed)
        candidates = [0.0]
    if k < 2:
        return Correction.none(names, reason=f"only {n} training row(s)")

    # oof[r, j, i]: out-of-fold corrected logit of row i, CV repeat r, candidate j.
    oof = np.zeros((CV_REPEATS, len(candidates), n))
    for fold, (tr, te) in enumerate(splitter.split(np.zeros(n), y)):
        prep = _site_prep(site_features, site_rows.iloc[tr])
        z_tr = correction_inputs(x_shared[tr], site_rows.iloc[tr], prep)
        z_te = correction_inputs(x_shared[te], site_rows.iloc[te], prep)
        for j, c in enumerate(candidates):
            model = OffsetLogisticRegression(C=c).fit(z_tr, y[tr], offset[tr])
            oof[fold // k, j, te] = model.decision_function(z_te, offset[te])

    # Per-row losses, "no correction" first: row 0 is the source model itself.
    losses = np.vstack([_row_loss(y, offset)] + [
        np.mean([_row_loss(y, oof[r, j]) for r in range(CV_REPEATS)], axis=0)
        for j in range(len(candidates))
    ])
    # With fewer than two rows of a class, out-of-fold AUC (pooled over folds fitted apart)
    # means nothing: report it as undefined.
    aucs = [_auc(y, offset)] + [
        float(np.mean([_auc(y, oof[r, j]) for r in range(CV_REPEATS)])) if minority >= 2
        else math.nan
        for j in range(len(candidates))
    ]
    eligible = [0] + [
        j + 1 for j, c in enumerate(candidates)
        if c == 0.0 or (not math.isnan(aucs[j + 1]) and aucs[j + 1] >= aucs[0])
    ]
    means = losses.mean(axis=1)
    best = min(eligible, key=lambda j: means[j])
    chosen = next(
        j for j in eligible  # simplest first
        if _within_one_se(losses[j], losses[best])
    )
    cv_info = {
        "cv_log_loss_source": float(means[0]), "cv_auc_source": aucs[0], "folds": float(k),
        "cv_log_loss": float(means[chosen]), "cv_auc": aucs[chosen],
    }
    if chosen == 0:
        log.info("correction not applied: no candidate clearly beat the source model in CV")
        return Correction.none(names, cv_info,
                               reason="no candidate clearly beat the source model in CV")

    c = candidates[chosen - 1]
    prep = _site_prep(site_features, site_rows)
    z = correction_inputs(x_shared, site_rows, prep)
    model = OffsetLogisticRegression(C=c).fit(z, y, offset)
    shared_names = [f"shared:{i}" for i in range(x_shared.shape[1])]
    site_names = list(prep.feature_names_out_) if prep is not None else []
    log.info("correction applied: C=%s over %d inputs", c, z.shape[1])
    return Correction(
        applied=True,
        strength=float(c),
        site_features=names,
        site_preprocessing=prep.to_dict() if prep is not None else None,
        intercept=model.intercept_,
        coef=[float(v) for v in model.coef_],
        feature_names=shared_names + site_names,
        cv=cv_info,
    )


def _within_one_se(candidate: np.ndarray, best: np.ndarray) -> bool:
    """Whether ``candidate``'s mean loss is within one paired standard error of ``best``'s."""
    diff = candidate - best
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()) <= se


def _site_prep(
    site_features: Sequence[Feature], rows: pd.DataFrame
) -> TabularPreprocessor | None:
    if not site_features:
        return None
    return TabularPreprocessor(features=list(site_features)).fit(rows)


def _row_loss(y: np.ndarray, logit: np.ndarray) -> np.ndarray:
    """Per-row log-loss of logits (stable, no clipping needed)."""
    return np.logaddexp(0.0, logit) - y * logit


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else math.nan
