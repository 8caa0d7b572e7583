"""A site's final model, chosen by cross-validation on its training rows only.

The candidates, all of the form ``logit = s * logit_source + b + z . w`` over the same inputs
``z`` (the source model's inputs, then the site's own features; see ``shared.correction``):

- the source model itself (``s = 1``, nothing fitted);
- a recalibration: the source model plus an intercept (its ranking unchanged);
- corrections of increasing strength ``C``: the source model plus a penalised logistic
  regression on ``z`` (shrunk towards the source model);
- the site's local-only model at each ``C`` (``s = 0``: shrunk towards a constant);
- blends of the source model and the best local-only model (``s`` = 3/4, 1/2, 1/4).

Each is scored by repeated stratified K-fold cross-validation inside the training rows (the
site-local preprocessing refitted in every fold), which gives every training row an out-of-
fold log-loss per candidate. The rule:

1. a candidate that uses features (all but the source model and the recalibration) needs at
   least ``MIN_CLASS_ROWS`` training rows of each class;
2. it must not rank worse than the source model: cross-validated AUC at least the source's
   (a recalibration keeps the ranking);
3. it must beat the source model's cross-validated log-loss by more than one paired standard
   error (paired over the training rows): a departure from the shared model needs the site's
   own evidence;
4. among those, the lowest cross-validated log-loss wins; with none, the source model.

Log-loss is the criterion because it is a proper score: it rewards calibrated risks, which is
what clinicians act on, not only their ranking. The held-out rows are never seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold

from shared.correction import Correction, OffsetLogisticRegression, correction_inputs
from shared.preprocessing import TabularPreprocessor
from shared.schema import Feature

log = logging.getLogger(__name__)

CORRECTION_STRENGTHS = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
LOCAL_STRENGTHS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
BLEND_WEIGHTS = (0.75, 0.5, 0.25)  # the source model's share
CV_REPEATS = 3
MIN_CLASS_ROWS = 5
# The local-only model's intercept is the site's whole base rate, not a shift: a weak prior.
LOCAL_INTERCEPT_SD = 10.0


@dataclass(frozen=True)
class Candidate:
    """One model a site may choose: its family and parameter."""

    family: str  # source | recalibration | correction | local | blend
    C: float = 0.0
    weight: float = 1.0  # the source model's share (blends)

    @property
    def label(self) -> str:
        """How the report names it."""
        if self.family in ("source", "recalibration"):
            return self.family
        if self.family == "blend":
            return f"blend {_fraction(self.weight)} source + local C={self.C:g}"
        return f"{self.family} C={self.C:g}"

    @property
    def uses_features(self) -> bool:
        """Whether it fits weights on the site's features."""
        return self.family not in ("source", "recalibration")


def fit_correction(
    x_shared: np.ndarray,
    site_rows: pd.DataFrame,
    offset: np.ndarray,
    y: np.ndarray,
    site_features: Sequence[Feature],
    *,
    folds: int = 5,
    seed: int = 0,
    strengths: Sequence[float] = CORRECTION_STRENGTHS,
    local_strengths: Sequence[float] = LOCAL_STRENGTHS,
    blends: Sequence[float] = BLEND_WEIGHTS,
) -> Correction:
    """Choose and fit the site's final model on its training rows (see the module's rule).

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
    strengths, local_strengths : sequence of float
        Candidate values of ``C`` for corrections (0: the recalibration) and local models.
    blends : sequence of float
        The source model's shares in the blends.

    Returns
    -------
    Correction
        The chosen model, its cross-validated evidence and the reason; ``applied=False`` when
        the source model stays.
    """
    names = [f.name for f in site_features]
    y = np.asarray(y, dtype=int)
    n = len(y)
    minority = int(min(y.sum(), n - y.sum()))
    features_ok = minority >= MIN_CLASS_ROWS
    if minority >= 2:
        k = min(folds, minority)
        splitter: Any = RepeatedStratifiedKFold(n_splits=k, n_repeats=CV_REPEATS,
                                                random_state=seed)
    else:
        k = min(folds, n)
        splitter = RepeatedKFold(n_splits=k, n_repeats=CV_REPEATS, random_state=seed)
    if k < 2:
        return Correction.none(names, reason=f"only {n} training row(s): the source model")
    candidates = [Candidate("recalibration")]
    if features_ok:
        candidates += [Candidate("correction", c) for c in strengths if c > 0]
        candidates += [Candidate("local", c) for c in local_strengths]

    oof = _out_of_fold(candidates, splitter, k, x_shared, site_rows, offset, y, site_features)
    losses = {c: np.mean([_row_loss(y, oof[c][r]) for r in range(CV_REPEATS)], axis=0)
              for c in candidates}
    if features_ok and blends:
        best_local = min((c for c in candidates if c.family == "local"),
                         key=lambda c: float(losses[c].mean()))
        for w in blends:
            blend = Candidate("blend", best_local.C, w)
            oof[blend] = w * offset[None, :] + (1 - w) * oof[best_local]
            losses[blend] = np.mean([_row_loss(y, oof[blend][r]) for r in range(CV_REPEATS)],
                                    axis=0)
            candidates.append(blend)

    source_loss = _row_loss(y, offset)
    source_auc = _auc(y, offset)
    evidence: list[dict[str, Any]] = [{"candidate": "source",
                                       "cv_log_loss": float(source_loss.mean()),
                 "cv_auc": source_auc, "gain": 0.0, "se": 0.0}]
    eligible = []
    for c in candidates:
        # With fewer than two rows of a class, an out-of-fold AUC means nothing.
        auc = (float(np.mean([_auc(y, oof[c][r]) for r in range(CV_REPEATS)]))
               if minority >= 2 else math.nan)
        diff = source_loss - losses[c]
        gain = float(diff.mean())
        se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
        evidence.append({"candidate": c.label, "cv_log_loss": float(losses[c].mean()),
                         "cv_auc": auc, "gain": gain, "se": se})
        ranks_ok = c.family == "recalibration" or (
            not math.isnan(auc) and not math.isnan(source_auc) and auc >= source_auc)
        if ranks_ok and gain > se:
            eligible.append(c)
    cv_info = {"cv_log_loss_source": float(source_loss.mean()), "cv_auc_source": source_auc,
               "folds": float(k), "candidates": float(len(candidates))}
    local_scores = [e for e in evidence if str(e["candidate"]).startswith("local ")]
    if local_scores:
        best = min(local_scores, key=lambda e: float(e["cv_log_loss"]))
        cv_info.update(cv_log_loss_local=float(best["cv_log_loss"]),
                       cv_auc_local=float(best["cv_auc"]))
    if not eligible:
        reason = ("no candidate beat the source model's cross-validated log-loss "
                  f"({cv_info['cv_log_loss_source']:.4f}) by more than one standard error"
                  + ("" if features_ok else f"; with {minority} training row(s) of the smaller "
                     f"class (fewer than {MIN_CLASS_ROWS}) only a recalibration was tried"))
        log.info("source model kept: %s", reason)
        kept = Correction.none(names, {**cv_info, "cv_log_loss": cv_info["cv_log_loss_source"],
                                       "cv_auc": source_auc, "cv_log_loss_se": 0.0},
                               reason=reason)
        return _with_evidence(kept, evidence)
    chosen = min(eligible, key=lambda c: float(losses[c].mean()))
    row = next(e for e in evidence if e["candidate"] == chosen.label)
    cv_info.update(cv_log_loss=float(row["cv_log_loss"]), cv_auc=float(row["cv_auc"]),
                   cv_log_loss_se=float(row["se"]))
    reason = (f"{chosen.label}: cross-validated log-loss {row['cv_log_loss']:.4f} against the "
              f"source model's {cv_info['cv_log_loss_source']:.4f} (gain {row['gain']:.4f}, "
              f"more than its standard error {row['se']:.4f}), the lowest of "
              f"{len(eligible)} candidate(s) that beat the source model clearly")
    log.info("chose %s", reason)
    model = _fit_final(chosen, x_shared, site_rows, offset, y, site_features)
    model.cv = cv_info
    model.reason = reason
    return _with_evidence(model, evidence)


def _with_evidence(model: Correction, evidence: list[dict[str, Any]]) -> Correction:
    model.evidence = evidence
    return model


def _out_of_fold(
    candidates: Sequence[Candidate], splitter: Any, k: int, x_shared: np.ndarray,
    site_rows: pd.DataFrame, offset: np.ndarray, y: np.ndarray,
    site_features: Sequence[Feature],
) -> dict[Candidate, np.ndarray]:
    """Out-of-fold logits ``[repeat, row]`` of every fitted candidate."""
    n = len(y)
    oof = {c: np.zeros((CV_REPEATS, n)) for c in candidates}
    zeros = np.zeros(n)
    for fold, (tr, te) in enumerate(splitter.split(np.zeros(n), y)):
        prep = _site_prep(site_features, site_rows.iloc[tr])
        z_tr = correction_inputs(x_shared[tr], site_rows.iloc[tr], prep)
        z_te = correction_inputs(x_shared[te], site_rows.iloc[te], prep)
        for c in candidates:
            model, base = _model(c), (zeros if c.family == "local" else offset)
            model.fit(z_tr, y[tr], base[tr])
            oof[c][fold // k, te] = model.decision_function(z_te, base[te])
    return oof


def _model(c: Candidate) -> OffsetLogisticRegression:
    if c.family == "recalibration":
        return OffsetLogisticRegression(C=0.0)
    if c.family == "local":
        return OffsetLogisticRegression(C=c.C, intercept_sd=LOCAL_INTERCEPT_SD)
    return OffsetLogisticRegression(C=c.C)


def _fit_final(
    chosen: Candidate, x_shared: np.ndarray, site_rows: pd.DataFrame, offset: np.ndarray,
    y: np.ndarray, site_features: Sequence[Feature],
) -> Correction:
    """Fit the chosen candidate on all training rows."""
    prep = _site_prep(site_features, site_rows)
    z = correction_inputs(x_shared, site_rows, prep)
    local = chosen.family in ("local", "blend")
    fitted = _model(Candidate("local", chosen.C) if local else chosen)
    fitted.fit(z, y, np.zeros(len(y)) if local else offset)
    share = chosen.weight if chosen.family == "blend" else (0.0 if local else 1.0)
    scale = 1.0 - share if local else 1.0
    site_names = list(prep.feature_names_out_) if prep is not None else []
    return Correction(
        applied=True,
        strength=float(chosen.C),
        site_features=[f.name for f in site_features],
        site_preprocessing=prep.to_dict() if prep is not None else None,
        intercept=scale * float(fitted.intercept_),
        coef=[scale * float(v) for v in fitted.coef_],
        feature_names=[f"shared:{i}" for i in range(x_shared.shape[1])] + site_names,
        cv={},
        source_weight=share,
        choice=chosen.label,
    )


def _fraction(weight: float) -> str:
    return {0.75: "3/4", 0.5: "1/2", 0.25: "1/4"}.get(weight, f"{weight:g}")


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
