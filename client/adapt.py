"""A site's final model, chosen by cross-validation on its training rows only.

The candidates, all of the form ``logit = s * logit_source + b + z . w`` over the same inputs
``z`` (the source model's inputs, then the site's own features; see ``shared.correction``):

- the source model itself (``s = 1``, nothing fitted);
- a recalibration: the source model plus an intercept (its ranking unchanged);
- corrections of increasing strength ``C``: the source model plus a penalised logistic
  regression on ``z`` (shrunk towards the source model);
- the site's local-only model at each ``C`` (``s = 0``: shrunk towards a constant);
- blends of the source model and the best local-only model (``s`` = 3/4, 1/2, 1/4);
- at a member of a feature group (``shared.groups``): the group extension, trained by the
  group's sites together (nothing fitted here), and the group extension plus a private
  correction on top of it (``GROUP_STRENGTHS``).

Each is scored by repeated stratified K-fold cross-validation inside the training rows (the
site-local preprocessing refitted in every fold), which gives every training row an out-of-
fold log-loss per candidate. The rule:

1. a candidate that uses features (all but the source model and the recalibration) needs at
   least ``MIN_CLASS_ROWS`` training rows of each class;
2. it must not rank worse than the source model: cross-validated AUC at least the source's
   (a recalibration keeps the ranking);
3. it must beat the source model's cross-validated log-loss by a margin of paired standard
   errors (paired over the training rows), ``EVIDENCE_Z``: a departure from the shared model
   needs the site's own evidence, and more of it where the best of many fits to the same
   rows is taken. A group extension alone may add its group's evidence (``shared.groups``:
   the members' mean gain over the source model and its spread between them, from loss sums
   they sent in its training): the site's gain is shrunk towards the group's mean, weighted
   by the inverse squares of its standard error and of the spread (at least
   ``PRIOR_SD_FLOOR``), and the shrunk gain must clear the margin, while the site's own gain
   must be positive. A site whose own evidence is thin then leans on the group's; a site
   whose rows say the extension is no better is never pulled over, whatever evidence the
   coordinator claims;
4. among those, the lowest cross-validated log-loss wins; with none, the source model.

Log-loss is the criterion because it is a proper score: it rewards calibrated risks, which is
what clinicians act on, not only their ranking. The held-out rows are never seen.

A site with more than ``SELECTION_ROWS`` training rows applies the same rule to a stratified
subsample of its training rows (see :func:`selection_rows`) and fits the chosen model on all of
them; a smaller site is cross-validated on all its rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold

from client.batch_fit import fit_many
from shared.correction import Correction, OffsetLogisticRegression, correction_inputs
from shared.groups import Extension
from shared.metrics import rank_auc
from shared.preprocessing import TabularPreprocessor
from shared.schema import Feature

log = logging.getLogger(__name__)

CORRECTION_STRENGTHS = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
LOCAL_STRENGTHS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
BLEND_WEIGHTS = (0.75, 0.5, 0.25)  # the source model's share
# A private correction on top of a group extension: the extension already holds the group's
# effects, so a few strengths suffice.
GROUP_STRENGTHS = (0.01, 0.1, 1.0)
# The group's evidence never weighs more than a gain measured to this standard error: a
# coordinator cannot make a site take its extension on a claimed certainty.
PRIOR_SD_FLOOR = 0.01
# How many paired standard errors a candidate's cross-validated gain must exceed: one for a
# single candidate fitted elsewhere or with one parameter (the group extension, the
# recalibration); more for those fitted on the site's features, where the best of many fits
# to the same rows is chosen (the one-sided 5 % point of a normal).
EVIDENCE_Z = {"recalibration": 1.0, "group": 1.0}
EVIDENCE_Z_FITTED = 1.645
CV_REPEATS = 3
MIN_CLASS_ROWS = 5
# The local-only model's intercept is the site's whole base rate, not a shift: a weak prior.
LOCAL_INTERCEPT_SD = 10.0
# A large site chooses on a stratified subsample of its training rows: SELECTION_ROWS rows, or
# more when that many would hold fewer than SELECTION_MIN_CLASS rows of the rarer class (with
# 60 correction inputs, about 17 of them per input). Why: cross-validating every candidate
# costs time in proportion to the rows, while the paired standard error of a candidate's gain
# shrinks only as one over their square root: on SELECTION_ROWS rows it is already small, and
# candidates closer than that are about as good (the big site's figures: docs/benchmarks.md).
# Sites up to SELECTION_ROWS training rows (the clinically usual size) are cross-validated on
# all of them.
SELECTION_ROWS = 20_000
SELECTION_MIN_CLASS = 1_000


@dataclass(frozen=True)
class Candidate:
    """One model a site may choose: its family and parameter."""

    family: str  # source | recalibration | correction | local | blend | group | group-correction
    C: float = 0.0
    weight: float = 1.0  # the source model's share (blends)
    group: str = ""  # the feature group (group families)

    @property
    def label(self) -> str:
        """How the report names it."""
        if self.family in ("source", "recalibration"):
            return self.family
        if self.family == "blend":
            return f"blend {_fraction(self.weight)} source + local C={self.C:g}"
        if self.family == "group":
            return f"group {self.group}"
        if self.family == "group-correction":
            return f"group {self.group} + correction C={self.C:g}"
        return f"{self.family} C={self.C:g}"

    @property
    def uses_features(self) -> bool:
        """Whether it fits weights on the site's features."""
        return self.family not in ("source", "recalibration")


@dataclass(frozen=True)
class GroupOffset:
    """A group extension as one site's training rows see it.

    Attributes
    ----------
    extension : Extension
        The extension the group trained.
    logit : numpy.ndarray
        Its part of the logit for the training rows (the source logit not included).
    bound : float
        The input bound it was computed with (the site's), kept with the chosen model.
    """

    extension: Extension
    logit: np.ndarray
    bound: float


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
    groups: Sequence[GroupOffset] = (),
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
    groups : sequence of GroupOffset
        The extensions of the feature groups the site belongs to (their logits on the
        training rows); each adds two kinds of candidate.

    Returns
    -------
    Correction
        The chosen model, its cross-validated evidence and the reason; ``applied=False`` when
        the source model stays.

    Notes
    -----
    With more than ``SELECTION_ROWS`` training rows the candidates are cross-validated on a
    stratified subsample of them (:func:`selection_rows`; ``cv`` then also holds
    ``selection_rows`` and ``training_rows``, and the reason says so), and the chosen one is
    fitted on all of them.
    """
    names = [f.name for f in site_features]
    y = np.asarray(y, dtype=int)
    n = len(y)
    pick = selection_rows(y, seed)
    by_name = {g.extension.name: g for g in groups}
    if pick is None:
        choice = _choose(x_shared, site_rows, offset, y, site_features, folds, seed,
                         strengths, local_strengths, blends, warm=False, groups=groups)
    else:
        # A large site: the candidates are compared on a stratified subsample of the training
        # rows (``fit_correction`` is only ever given training rows, so no held-out row is
        # seen), then the chosen one is fitted below on all of them. The rule is the same;
        # every score in the evidence is the subsample's. Warm starts (each C from the
        # previous one's weights, the final fit from the folds' mean) only save iterations.
        choice = _choose(x_shared[pick], site_rows.iloc[pick], offset[pick], y[pick],
                         site_features, folds, seed, strengths, local_strengths, blends,
                         warm=True, groups=[GroupOffset(g.extension, g.logit[pick], g.bound)
                                            for g in groups])
        choice.cv.update(selection_rows=float(len(pick)), training_rows=float(n))
        choice.reason += (f" (cross-validated on a stratified subsample of {len(pick)} of the "
                          f"{n} training rows; the model is fitted on all of them)")
    if choice.chosen is None:
        log.info("source model kept: %s", choice.reason)
        return _with_evidence(Correction.none(names, choice.cv, reason=choice.reason),
                              choice.evidence)
    log.info("chose %s", choice.reason)
    model = _fit_final(choice.chosen, x_shared, site_rows, offset, y, site_features,
                       choice.starts.get(choice.chosen), by_name.get(choice.chosen.group))
    model.cv = choice.cv
    model.reason = choice.reason
    return _with_evidence(model, choice.evidence)


def selection_rows(y: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """The training rows a large site chooses its model on; None: all of them.

    Parameters
    ----------
    y : numpy.ndarray
        Labels of the training rows.
    seed : int
        Seed of the draw.

    Returns
    -------
    numpy.ndarray or None
        Sorted row positions of a stratified random subsample (each class keeps its share):
        ``SELECTION_ROWS`` rows, or enough to hold ``SELECTION_MIN_CLASS`` rows of the rarer
        class. None when the site has at most ``SELECTION_ROWS`` training rows, or when the
        subsample would need every row.
    """
    y = np.asarray(y, dtype=int)
    n = len(y)
    if n <= SELECTION_ROWS:
        return None
    rarer = int(min(y.sum(), n - y.sum()))
    size = SELECTION_ROWS if rarer == 0 else max(
        SELECTION_ROWS, math.ceil(SELECTION_MIN_CLASS * n / rarer))
    if size >= n:
        return None
    rng = np.random.default_rng(seed)
    picks = []
    for label in (0, 1):
        rows = np.flatnonzero(y == label)
        picks.append(rng.choice(rows, size=round(size * len(rows) / n), replace=False))
    return np.sort(np.concatenate(picks))


@dataclass
class _Choice:
    """The outcome of the rule: the chosen candidate (None: the source model) and why."""

    chosen: Candidate | None
    cv: dict[str, float]
    reason: str
    evidence: list[dict[str, Any]]
    # Warm starts only: per fitted candidate, its weights ``[b, w]`` averaged over the folds.
    starts: dict[Candidate, np.ndarray] = field(default_factory=dict)


def _choose(
    x_shared: np.ndarray, site_rows: pd.DataFrame, offset: np.ndarray, y: np.ndarray,
    site_features: Sequence[Feature], folds: int, seed: int, strengths: Sequence[float],
    local_strengths: Sequence[float], blends: Sequence[float], warm: bool,
    groups: Sequence[GroupOffset] = (),
) -> _Choice:
    """Apply the module's rule to these rows (all training rows, or a large site's subsample)."""
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
        return _Choice(None, {}, f"only {n} training row(s): the source model", [])
    candidates = [Candidate("recalibration")]
    if features_ok:
        candidates += [Candidate("correction", c) for c in strengths if c > 0]
        candidates += [Candidate("local", c) for c in local_strengths]
        for g in groups:
            name = g.extension.name
            candidates += [Candidate("group", group=name)]
            candidates += [Candidate("group-correction", c, group=name) for c in GROUP_STRENGTHS]
    bases = {g.extension.name: offset + g.logit for g in groups}
    priors = {g.extension.name: (float(g.extension.prior_gain), float(g.extension.prior_sd))
              for g in groups
              if g.extension.prior_gain is not None and g.extension.prior_sd is not None}

    oof, starts = _out_of_fold(candidates, splitter, k, x_shared, site_rows, offset, y,
                               site_features, warm, bases)
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
            if best_local in starts:
                starts[blend] = starts[best_local]

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
        entry: dict[str, Any] = {"candidate": c.label, "cv_log_loss": float(losses[c].mean()),
                                 "cv_auc": auc, "gain": gain, "se": se}
        z = EVIDENCE_Z.get(c.family, EVIDENCE_Z_FITTED)
        clears = gain > z * se
        if not clears and c.family == "group" and c.group in priors and 0 < se < math.inf:
            # Own evidence too thin: the group's may add to it, never against own rows.
            shrunk, shrunk_se = shrink(gain, se, *priors[c.group])
            entry.update(group_gain=priors[c.group][0], group_sd=priors[c.group][1],
                         shrunk_gain=shrunk, shrunk_se=shrunk_se)
            clears = shrunk > z * shrunk_se and gain > 0.0
        evidence.append(entry)
        ranks_ok = c.family == "recalibration" or (
            not math.isnan(auc) and not math.isnan(source_auc) and auc >= source_auc)
        if ranks_ok and clears:
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
        kept = {**cv_info, "cv_log_loss": cv_info["cv_log_loss_source"],
                "cv_auc": source_auc, "cv_log_loss_se": 0.0}
        return _Choice(None, kept, reason, evidence)
    chosen = min(eligible, key=lambda c: float(losses[c].mean()))
    row = next(e for e in evidence if e["candidate"] == chosen.label)
    cv_info.update(cv_log_loss=float(row["cv_log_loss"]), cv_auc=float(row["cv_auc"]),
                   cv_log_loss_se=float(row["se"]))
    if "shrunk_gain" in row:
        why = (f"gain {row['gain']:.4f} ± {row['se']:.4f}; with the group's evidence (mean "
               f"gain {row['group_gain']:.4f}, spread {row['group_sd']:.4f}) "
               f"{row['shrunk_gain']:.4f}, more than its standard error {row['shrunk_se']:.4f}")
    else:
        why = f"gain {row['gain']:.4f}, more than its standard error {row['se']:.4f}"
    reason = (f"{chosen.label}: cross-validated log-loss {row['cv_log_loss']:.4f} against the "
              f"source model's {cv_info['cv_log_loss_source']:.4f} ({why}), the lowest of "
              f"{len(eligible)} candidate(s) that beat the source model clearly")
    return _Choice(chosen, cv_info, reason, evidence, starts)


def shrink(gain: float, se: float, prior_gain: float, prior_sd: float) -> tuple[float, float]:
    """A site's gain shrunk towards its group's: the precision-weighted mean and its error.

    Parameters
    ----------
    gain, se : float
        The site's cross-validated gain over the source model and its standard error (> 0).
    prior_gain, prior_sd : float
        The group's mean gain and the spread of its members' gains (floored at
        ``PRIOR_SD_FLOOR``).

    Returns
    -------
    float, float
        The shrunk gain and its standard error.
    """
    w_site = 1.0 / se ** 2
    w_group = 1.0 / max(prior_sd, PRIOR_SD_FLOOR) ** 2
    total = w_site + w_group
    return (w_site * gain + w_group * prior_gain) / total, 1.0 / math.sqrt(total)


def _with_evidence(model: Correction, evidence: list[dict[str, Any]]) -> Correction:
    model.evidence = evidence
    return model


def _out_of_fold(
    candidates: Sequence[Candidate], splitter: Any, k: int, x_shared: np.ndarray,
    site_rows: pd.DataFrame, offset: np.ndarray, y: np.ndarray,
    site_features: Sequence[Feature], warm: bool = False,
    bases: dict[str, np.ndarray] | None = None,
) -> tuple[dict[Candidate, np.ndarray], dict[Candidate, np.ndarray]]:
    """Out-of-fold logits ``[repeat, row]`` of every fitted candidate, and warm starts.

    In each fold every candidate is fitted at once (``client.batch_fit.fit_many``: the same
    inputs, an offset and a penalty each), starting from the previous fold's weights (the
    optimum is the same; it takes fewer steps). With ``warm`` the second result holds every
    candidate's weights ``[b, w]`` averaged over the folds (empty without ``warm``).
    ``bases`` holds, per feature group, the source logit plus the group extension's: the
    offset of the group candidates (a group extension alone is fitted by the group, not
    here).
    """
    n = len(y)
    oof = {c: np.zeros((CV_REPEATS, n)) for c in candidates}
    fitted = [c for c in candidates if c.family != "group"]
    base = np.stack([np.zeros(n) if c.family == "local" else (bases or {})[c.group] if c.group
                     else offset for c in candidates]) if candidates else np.zeros((0, n))
    rows = {c: i for i, c in enumerate(candidates)}
    idx = np.array([rows[c] for c in fitted], dtype=int)
    strengths = np.array([c.C if c.family != "recalibration" else 0.0 for c in fitted])
    sds = np.array([_model(c).intercept_sd for c in fitted])
    total = np.zeros((len(fitted), 0))
    theta: np.ndarray | None = None
    fits = 0
    for fold, (tr, te) in enumerate(splitter.split(np.zeros(n), y)):
        prep = _site_prep(site_features, site_rows.iloc[tr])
        z_tr = correction_inputs(x_shared[tr], site_rows.iloc[tr], prep)
        z_te = correction_inputs(x_shared[te], site_rows.iloc[te], prep)
        for c in candidates:
            if c.family == "group":
                oof[c][fold // k, te] = base[rows[c], te]
        if not fitted:
            continue
        # A fold may lack a missing-value indicator another fold has: no warm start then.
        same = theta is not None and theta.shape[1] == z_tr.shape[1] + 1
        theta = fit_many(z_tr, y[tr], base[idx][:, tr], strengths, sds,
                         start=theta if same else None)
        logits = base[idx][:, te] + theta[:, :1] + theta[:, 1:] @ z_te.T
        for i, c in enumerate(fitted):
            oof[c][fold // k, te] = logits[i]
        if warm and (fold == 0 or total.shape != theta.shape):
            total, fits = theta.copy(), 1
        elif warm:
            total, fits = total + theta, fits + 1
    if not warm or not fits:
        return oof, {}
    return oof, {c: total[i] / fits for i, c in enumerate(fitted)}


def _model(c: Candidate) -> OffsetLogisticRegression:
    if c.family == "recalibration":
        return OffsetLogisticRegression(C=0.0)
    if c.family == "local":
        return OffsetLogisticRegression(C=c.C, intercept_sd=LOCAL_INTERCEPT_SD)
    return OffsetLogisticRegression(C=c.C)


def _fit_final(
    chosen: Candidate, x_shared: np.ndarray, site_rows: pd.DataFrame, offset: np.ndarray,
    y: np.ndarray, site_features: Sequence[Feature], start: np.ndarray | None = None,
    group: GroupOffset | None = None,
) -> Correction:
    """Fit the chosen candidate on all training rows (L-BFGS from ``start`` ``[b, w]``).

    A group candidate keeps its group's extension (and the bound its inputs were clipped
    to) beside the private part, which is zero for the extension alone.
    """
    prep = _site_prep(site_features, site_rows)
    z = correction_inputs(x_shared, site_rows, prep)
    local = chosen.family in ("local", "blend")
    base = np.zeros(len(y)) if local else offset if group is None else offset + group.logit
    fitted = _model(Candidate("local", chosen.C) if local else chosen)
    if chosen.family == "group":
        theta = np.zeros(z.shape[1] + 1)
    else:  # the estimator's objective, solved as the folds' fits were
        strength = 0.0 if chosen.family == "recalibration" else chosen.C
        theta = fit_many(z, y, base[None, :], np.array([strength]),
                         np.array([fitted.intercept_sd]),
                         start=None if start is None or len(start) != z.shape[1] + 1
                         else start[None, :])[0]
    fitted.intercept_, fitted.coef_ = float(theta[0]), theta[1:]
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
        extension=(None if group is None
                   else {**group.extension.to_dict(), "input_bound": group.bound}),
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
    return rank_auc(y, score)  # NaN with a single class
