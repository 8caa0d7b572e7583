"""A site's final model and its use: ``logit_site = logit_source + alpha_site(x_shared, x_site)``.

Every model a site may choose is one linear form over the same inputs ``z`` (the source model's
inputs, then the site's own features): ``logit = s * logit_source + b + z . w``. The source
model is ``s = 1, b = 0, w = 0``; a recalibration ``s = 1`` with ``b`` only; a correction
``s = 1`` with ``b`` and ``w`` shrunk towards the source model; the site's local-only model
``s = 0``; a blend of the two ``0 < s < 1``. So ``alpha_site = (s - 1) * logit_source + b + z .
w``, and the composition stays ``logit_source + alpha_site``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from shared.preprocessing import ParamsMixin, TabularPreprocessor, check_is_fitted
from shared.schema import Feature


class OffsetLogisticRegression(ParamsMixin):
    """L2-penalised logistic regression on top of a fixed per-row offset.

    Minimises ``sum_i logloss(y_i, offset_i + b + z_i . w) + ||w||^2 / (2 C) + b^2 / (2 s^2)``
    (scikit-learn's convention for ``C``). ``C = 0`` fits the intercept only: a recalibration
    of the offset to the site's prevalence. The intercept's weak prior (``s = 2`` on the
    log-odds scale, worth a fraction of one patient) keeps it finite when every training row
    has the same label, and is negligible otherwise.

    Written by hand because scikit-learn's ``LogisticRegression`` has no offset term, and the
    offset (the frozen source model's logit) must enter with a coefficient fixed at one. Follows
    scikit-learn's conventions: ``get_params`` / ``set_params`` (so ``sklearn.base.clone``
    works), parameters validated at ``fit``, fitted state with a trailing underscore.

    Parameters
    ----------
    C : float
        Inverse penalty strength (larger = stronger correction), finite and >= 0;
        0 = intercept only. Checked at ``fit`` (a ``ValueError`` otherwise).
    max_iter : int
        L-BFGS iterations.
    intercept_sd : float
        Prior standard deviation ``s`` of the intercept shift.

    Attributes
    ----------
    coef_ : numpy.ndarray
        Weights of the correction features.
    intercept_ : float
        Intercept added to the offset.
    n_features_in_ : int
        Number of correction features.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 500, intercept_sd: float = 2.0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.intercept_sd = intercept_sd

    def fit(
        self, Z: np.ndarray, y: np.ndarray, offset: np.ndarray,
        coef_init: np.ndarray | None = None, intercept_init: float | None = None,
    ) -> OffsetLogisticRegression:
        """Fit on training rows ``Z`` (correction features), labels ``y`` and the offset.

        L-BFGS starts at ``coef_init`` and ``intercept_init`` when given (a warm start, as
        scikit-learn's ``SGDClassifier.fit`` names them), at zero otherwise. The optimum is
        the same; only the iterations to reach it (within L-BFGS's tolerance) change.
        """
        C = _check_strength(self.C)
        Z = np.asarray(Z, dtype=float)
        y = np.asarray(y, dtype=float)
        offset = np.asarray(offset, dtype=float)
        d = Z.shape[1]
        use_w = C > 0
        ridge = 1.0 / C if use_w else 0.0
        prior_b = 1.0 / self.intercept_sd**2

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            b = theta[0]
            w = theta[1:] if use_w else np.zeros(d)
            eta = offset + b + Z @ w
            # log(1 + exp(eta)) - y * eta, computed stably
            loss = float(np.sum(np.logaddexp(0.0, eta) - y * eta)) + 0.5 * prior_b * b * b
            r = _sigmoid(eta) - y
            grad_b = r.sum() + prior_b * b
            if not use_w:
                return loss, np.array([grad_b])
            loss += 0.5 * ridge * float(w @ w)
            grad_w = Z.T @ r + ridge * w
            return loss, np.concatenate([[grad_b], grad_w])

        theta0 = np.zeros(1 + (d if use_w else 0))
        if intercept_init is not None:
            theta0[0] = float(intercept_init)
        if use_w and coef_init is not None:
            theta0[1:] = np.asarray(coef_init, dtype=float).reshape(d)
        res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter})
        self.intercept_ = float(res.x[0])
        self.coef_ = res.x[1:] if use_w else np.zeros(d)
        self.n_features_in_ = d
        return self

    def decision_function(self, Z: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Corrected logits: ``offset + intercept + Z . coef``."""
        check_is_fitted(self, "coef_")
        Z = np.asarray(Z, dtype=float)
        if Z.shape[1] != self.n_features_in_:
            raise ValueError(
                f"correction expects {self.n_features_in_} features, got {Z.shape[1]}"
            )
        return np.asarray(offset, dtype=float) + self.intercept_ + Z @ self.coef_


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """``shared.metrics.sigmoid`` of a float array, bit for bit, about five times faster.

    The same operations on every element (``1 / (1 + exp(-z))`` where ``z >= 0``, ``exp(z) /
    (1 + exp(z))`` elsewhere, NaN and infinities alike), without gathering the two halves
    through boolean masks: the fit's gradient needs it once per L-BFGS step.
    """
    e = np.exp(-np.abs(z))
    out = np.where(z >= 0, 1.0, e)
    out /= 1.0 + e
    return out


def _check_strength(C: Any) -> float:
    """``C`` as a float, or a ValueError saying what it must be."""
    value = float(C) if isinstance(C, numbers.Real) and not isinstance(C, bool) else math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"C must be a finite number >= 0 (0 = intercept only), got {C!r}")
    return value


@dataclass
class Correction:
    """A site's chosen final model, everything needed to apply it to new rows.

    Attributes
    ----------
    applied : bool
        False when cross-validation found no benefit: the site uses the source model as is.
    strength : float or None
        The chosen candidate's ``C`` (0 = intercept only); None when not applied.
    site_features : list of str
        Site-only features the correction uses.
    site_preprocessing : dict or None
        State of the site-local preprocessing of the site features.
    intercept : float
        Intercept of the correction.
    coef : list of float
        Weights of ``[shared inputs, site inputs]``.
    feature_names : list of str
        Names of those weights' inputs.
    cv : dict
        Cross-validated scores on the training rows that justified the choice.
    reason : str
        Why this model was chosen, in words (with the cross-validated numbers).
    source_weight : float
        ``s``: 1 for the source model and its corrections, 0 for the local-only model, in
        between for a blend.
    choice : str
        The chosen candidate (``source``, ``recalibration``, ``correction C=0.3``,
        ``local C=1``, ``blend 1/2 source``).
    evidence : list of dict
        Every candidate's cross-validated scores (``candidate``, ``cv_log_loss``, ``cv_auc``,
        ``gain`` over the source model and its paired standard error ``se``).
    extension : dict or None
        The feature group's extension the model builds on (``shared.groups.Extension``'s
        state and the ``input_bound`` its inputs are clipped to), or None.
    """

    applied: bool
    strength: float | None
    site_features: list[str]
    site_preprocessing: dict[str, Any] | None
    intercept: float
    coef: list[float]
    feature_names: list[str]
    cv: dict[str, float]
    reason: str = ""
    source_weight: float = 1.0
    choice: str = "source"
    evidence: list[dict[str, Any]] = field(default_factory=list)
    extension: dict[str, Any] | None = None

    @classmethod
    def none(
        cls, site_features: list[str], cv: dict[str, float] | None = None, reason: str = ""
    ) -> Correction:
        """The "no correction" decision, with the reason."""
        return cls(False, None, list(site_features), None, 0.0, [], [], dict(cv or {}), reason)

    def alpha(
        self, x_shared: np.ndarray, site_rows: pd.DataFrame, site_feature_defs: list[Feature],
        source_logit: np.ndarray,
    ) -> np.ndarray:
        """``alpha_site`` for rows: ``(s - 1) * logit_source + b + z . w`` (+ the group's part).

        Parameters
        ----------
        x_shared : numpy.ndarray
            The source model's inputs of the rows.
        site_rows : pandas.DataFrame
            The rows' site-only feature columns.
        site_feature_defs : list of Feature
            Their definitions.
        source_logit : numpy.ndarray
            The source model's logits of the rows.
        """
        n = len(x_shared)
        if not self.applied:
            return np.zeros(n)
        z = correction_inputs(x_shared, site_rows, self.site_prep(site_feature_defs))
        if z.shape[1] != len(self.coef):
            raise ValueError(
                f"correction has {len(self.coef)} weights but the rows give {z.shape[1]} inputs"
            )
        alpha = ((self.source_weight - 1.0) * np.asarray(source_logit, dtype=float)
                 + self.intercept + z @ np.asarray(self.coef, dtype=float))
        if self.extension is not None:
            from shared.groups import Extension

            ext = Extension.from_dict(self.extension)
            defs = {f.name: f for f in site_feature_defs}
            alpha = alpha + ext.logit(x_shared, site_rows, [defs[n] for n in ext.features],
                                      float(self.extension.get("input_bound", np.inf)))
        return alpha

    def site_prep(self, site_feature_defs: list[Feature]) -> TabularPreprocessor | None:
        """The fitted site-local preprocessing, or None without site features."""
        if not self.site_preprocessing:
            return None
        return TabularPreprocessor.from_dict(self.site_preprocessing, site_feature_defs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (what is sealed in the site's encrypted file)."""
        return {
            "applied": self.applied, "strength": self.strength,
            "site_features": self.site_features, "site_preprocessing": self.site_preprocessing,
            "intercept": self.intercept, "coef": list(self.coef),
            "feature_names": self.feature_names,
            # An undefined score (AUC with one class) is stored as null, not NaN.
            "cv": {k: (v if math.isfinite(v) else None) for k, v in self.cv.items()},
            "reason": self.reason,
            "source_weight": self.source_weight, "choice": self.choice,
            "extension": self.extension,
            "evidence": [{k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                          for k, v in e.items()} for e in self.evidence],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Correction:
        """Rebuild from :meth:`to_dict`."""
        return cls(
            applied=bool(state["applied"]), strength=state["strength"],
            site_features=list(state["site_features"]),
            site_preprocessing=state["site_preprocessing"],
            intercept=float(state["intercept"]), coef=[float(c) for c in state["coef"]],
            feature_names=list(state["feature_names"]),
            cv={k: (math.nan if v is None else float(v)) for k, v in state["cv"].items()},
            reason=str(state.get("reason", "")),
            source_weight=float(state.get("source_weight", 1.0)),
            choice=str(state.get("choice", "correction" if state["applied"] else "source")),
            evidence=list(state.get("evidence", [])),
            extension=state.get("extension"),
        )


def correction_inputs(
    x_shared: np.ndarray, site_rows: pd.DataFrame, site_prep: TabularPreprocessor | None
) -> np.ndarray:
    """Inputs of the correction: the source model's inputs, then the site features'."""
    if site_prep is None:
        return np.asarray(x_shared, dtype=float)
    return np.hstack([x_shared, site_prep.transform(site_rows)])


def adapted_logit(source_logit: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The composition at the heart of fedadapt: ``logit_source + alpha_site``."""
    return np.asarray(source_logit, dtype=float) + np.asarray(alpha, dtype=float)
