"""Imputation, scaling, one-hot coding and missingness indicators, fitted from aggregate sums.

The same estimator serves the federation and a single site. A site summarises its training
rows into counts, sums and sums of squared deviations from its own mean (:func:`summarize`);
the server combines the summaries of all sites exactly (:func:`merge_summaries`) and fits on
the total (:meth:`TabularPreprocessor.fit_summary`). Fitting on one site's rows
(:meth:`TabularPreprocessor.fit`) is the same computation on one summary, so a federated fit
equals a central fit on the pooled training rows.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import pandas as pd

from shared.errors import FedadaptError
from shared.schema import Feature

Summary = dict[str, list[float]]


class NotFittedError(FedadaptError, ValueError, AttributeError):
    """The preprocessor is used before ``fit`` (as scikit-learn's error of the same name)."""


def check_is_fitted(estimator: object, attribute: str) -> None:
    """Raise :class:`NotFittedError` unless ``estimator`` has the fitted ``attribute``.

    scikit-learn's ``check_is_fitted`` does the same; it is not imported here because a
    deployed site starts a fresh process for every message, and the training rounds must not
    pay for importing scikit-learn each time.
    """
    if not hasattr(estimator, attribute):
        raise NotFittedError(
            f"this {type(estimator).__name__} is not fitted yet: call fit (training rows) or "
            "fit_summary (aggregate sums) before using it"
        )


class ParamsMixin:
    """``get_params`` and ``set_params`` under scikit-learn's contract.

    They let ``sklearn.base.clone``, grid searches and pipelines use fedadapt's estimators.
    Hand-written rather than inherited from ``sklearn.base.BaseEstimator`` for the reason
    given in :func:`check_is_fitted`: a site's process must not import scikit-learn just to
    build an estimator. The parameters are the named arguments of ``__init__``, stored
    unchanged under the same names (scikit-learn's rule). No parameter of fedadapt's
    estimators is itself an estimator, so ``deep`` changes nothing.
    """

    @classmethod
    def _param_names(cls) -> list[str]:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # skip self
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            raise TypeError(f"{cls.__name__}.__init__ must name every parameter (no *args, "
                            "**kwargs) to follow scikit-learn's conventions")
        return [p.name for p in params]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The estimator's parameters: the arguments of ``__init__`` and their values."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Self:
        """Set parameters by name (nothing is set if any name is unknown); returns self."""
        valid = self._param_names()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"invalid parameter(s) {unknown} for {type(self).__name__}; valid parameters "
                f"are {valid}"
            )
        for name, value in params.items():
            setattr(self, name, value)
        return self


# When a numeric feature counts as constant (scale 1, so its z is 0 rather than a huge number):
# when it has fewer than 2 observed values, or when its standard deviation is below
# _CONSTANT_RTOL * |mean| or below _CONSTANT_ATOL.
# - A truly constant column leaves only a rounding residue: every deviation from the computed
#   mean is 0 or a few units in the last place of the value, so sd <= ~1e-15 * |mean|, and
#   exactly 0 for an all-zero column. 1e-9 is 6 orders of magnitude above that residue, and a
#   real spread below 1e-9 of the mean (9 significant digits agreeing in every row) is beyond
#   the precision of any clinical measurement. A real spread of 1e-8 of the mean (mean 1e8,
#   sd 1) is still scaled.
# - The absolute floor only has to make sd == 0 count as constant when the mean is 0 too; the
#   smallest normal float does that without declaring constant any real spread near a zero
#   mean (values of +-1e-13 are scaled).
_CONSTANT_RTOL = 1e-9
_CONSTANT_ATOL = float(np.finfo(float).tiny)


def summary_keys(features: Sequence[Feature]) -> list[str]:
    """Names of the summary entries for ``features``, in a fixed order.

    Every entry is a list of numbers, so a summary travels as a Flower ``MetricRecord``.
    Summaries combine entry by entry (:func:`merge_summaries`): ``<feature>.m2`` by Chan's
    formula, every other entry by addition.
    """
    keys = ["rows"]
    for f in features:
        if f.kind == "categorical":
            keys += [f"{f.name}.counts", f"{f.name}.missing"]
        else:
            keys += [f"{f.name}.count", f"{f.name}.sum", f"{f.name}.m2", f"{f.name}.missing"]
    return keys


def summarize(X: pd.DataFrame, features: Sequence[Feature]) -> Summary:
    """Summarise rows into counts, sums and spreads: what a site sends in the stats phase.

    Parameters
    ----------
    X : pandas.DataFrame
        Rows to summarise; one float column per feature (categorical: category index),
        NaN where missing. A feature without a column counts as missing in every row.
    features : sequence of Feature
        The features to summarise, in order.

    Returns
    -------
    dict
        ``rows``; per numeric or binary feature: ``count`` (observed values), ``sum``,
        ``m2`` and ``missing``; per categorical feature: ``counts`` per category and
        ``missing``. ``m2`` is the sum of squared deviations of the observed values from
        their own mean ``sum / count`` (0 when ``count < 2``), computed in two passes:
        unlike a sum of squares it does not cancel catastrophically when the spread is tiny
        next to the mean.

    Notes
    -----
    What a summary reveals about single rows: given ``count`` and ``sum``, ``m2`` and the sum
    of squares determine each other (``m2 = sum of squares - sum**2 / count``), so ``m2``
    reveals exactly what a sum of squares would, no more. With ``count == 1``, ``m2`` is 0
    and adds nothing: the value is already ``sum``. With ``count == 2``, ``sum`` and ``m2``
    give the two values (not which row has which), as a sum of squares would. A minimum
    aggregate size per feature is a policy for the caller (not applied here).
    """
    n = len(X)
    out: Summary = {"rows": [float(n)]}
    for f in features:
        col = (
            X[f.name].to_numpy(dtype=float) if f.name in X.columns else np.full(n, np.nan)
        )
        seen = col[~np.isnan(col)]
        missing = float(n - len(seen))
        if f.kind == "categorical":
            counts = np.bincount(seen.astype(int), minlength=len(f.categories))
            out[f"{f.name}.counts"] = [float(c) for c in counts]
            out[f"{f.name}.missing"] = [missing]
        else:
            total = math.fsum(seen.tolist())  # correctly rounded: the best mean a float sends
            out[f"{f.name}.count"] = [float(len(seen))]
            out[f"{f.name}.sum"] = [total]
            out[f"{f.name}.m2"] = [_m2(seen, total)]
            out[f"{f.name}.missing"] = [missing]
    return out


def _m2(seen: np.ndarray, total: float) -> float:
    """Sum of squared deviations of ``seen`` from ``total / len(seen)``, without cancellation.

    Corrected two-pass algorithm (Chan, Golub and LeVeque 1983): the second term removes, to
    first order, the rounding error of the mean, so the result is the spread about the exact
    mean of ``seen``.
    """
    n = len(seen)
    if n < 2:
        return 0.0
    dev = seen - total / n
    return max(float(np.square(dev).sum()) - float(dev.sum()) ** 2 / n, 0.0)


def merge_summaries(summaries: Sequence[Summary]) -> Summary:
    """Combine site summaries into the summary of all their rows, exactly.

    All must have the same keys and lengths. Counts and sums add. The spreads ``<f>.m2`` combine
    by Chan et al.'s parallel formula (as in scikit-learn's ``StandardScaler.partial_fit``)::

        M2 = sum_i M2_i + sum_i n_i (mean_i - mean)**2,  mean_i = sum_i / n_i,
        mean = sum(sum_i) / sum(n_i)

    where sites with ``n_i = 0`` contribute nothing. The result equals the summary of the
    pooled rows up to rounding. The one gap that no merge can close comes from each site's
    mean travelling as a float64 ``sum``, so rounded to ~1e-16 of ``|mean|``; through the
    between-site term it moves the scale by a relative ~1e-16 * |mean| / sd at most when the
    sites' means differ by a few sd, and by about sqrt(rows) times less when they agree
    (``tests/shared/test_preprocessing.py`` checks both against the pooled rows).
    """
    if not summaries:
        raise ValueError("no summaries to merge: no site answered the stats phase")
    keys = list(summaries[0])
    for i, s in enumerate(summaries):
        if list(s) != keys or any(len(s[k]) != len(summaries[0][k]) for k in keys):
            raise ValueError(f"summary #{i} does not match the others' keys or lengths")
    spreads = [k for k in keys if k.endswith(".m2")]
    for k in spreads:
        base = k[: -len(".m2")]
        if f"{base}.count" not in keys or f"{base}.sum" not in keys:
            raise ValueError(f"summary entry {k!r} has no {base}.count and {base}.sum")
    total: Summary = {
        k: [math.fsum(vals) for vals in zip(*(s[k] for s in summaries), strict=True)]
        for k in keys if k not in spreads
    }
    for k in spreads:
        base = k[: -len(".m2")]
        n, mean = total[f"{base}.count"][0], 0.0
        if n > 0:
            mean = total[f"{base}.sum"][0] / n
        between = [
            s[f"{base}.count"][0] * (s[f"{base}.sum"][0] / s[f"{base}.count"][0] - mean) ** 2
            for s in summaries if s[f"{base}.count"][0] > 0
        ]
        total[k] = [math.fsum(s[k][0] for s in summaries) + math.fsum(between)]
    return {k: total[k] for k in keys}


class TabularPreprocessor(ParamsMixin):
    """Standardise numbers, one-hot code categories, impute and flag missing values.

    Follows scikit-learn's estimator conventions (settings in ``__init__``, ``get_params`` /
    ``set_params`` so ``sklearn.base.clone`` works, learned state with a trailing underscore
    set by ``fit``, ``check_is_fitted`` before use, feature names recorded at fit and checked
    at transform) without importing scikit-learn (see :func:`check_is_fitted`).

    Parameters
    ----------
    features : sequence of Feature
        The features to transform, in output order (the schema's order).
    indicators : bool
        Add a 0/1 "was missing" column for every feature with a missing value in the
        fitting rows.

    Attributes
    ----------
    mean_ : numpy.ndarray
        Per non-categorical feature, the mean of the observed values (imputed value).
    scale_ : numpy.ndarray
        Per non-categorical feature, the population standard deviation of the observed
        values; 1 where the feature is constant (fewer than two observed values, or a
        standard deviation below 1e-9 of the mean: see ``_CONSTANT_RTOL``).
    indicator_features_ : list of str
        Features that get a missingness indicator.
    feature_names_in_ : numpy.ndarray
        Names of the input features.
    feature_names_out_ : list of str
        Names of the output columns.
    n_samples_seen_ : int
        Number of rows the fit saw.
    """

    def __init__(self, features: Sequence[Feature] = (), indicators: bool = True) -> None:
        self.features = features
        self.indicators = indicators

    def fit(self, X: pd.DataFrame, y: Any = None) -> TabularPreprocessor:
        """Fit on rows (training rows only)."""
        return self.fit_summary(summarize(X, list(self.features)))

    def fit_summary(self, summary: Summary) -> TabularPreprocessor:
        """Fit from a summary (:func:`summarize`, or :func:`merge_summaries` of many)."""
        features = list(self.features)
        missing_keys = [k for k in summary_keys(features) if k not in summary]
        if missing_keys:
            raise ValueError(f"summary lacks {missing_keys}; was it made for other features?")
        numeric = [f for f in features if f.kind != "categorical"]
        means, scales = [], []
        for f in numeric:
            count = summary[f"{f.name}.count"][0]
            mean = summary[f"{f.name}.sum"][0] / count if count > 0 else 0.0
            std = math.sqrt(max(summary[f"{f.name}.m2"][0], 0.0) / count) if count > 0 else 0.0
            constant = count < 2 or not std >= max(_CONSTANT_RTOL * abs(mean), _CONSTANT_ATOL)
            means.append(mean)
            scales.append(1.0 if constant else std)
        self.mean_ = np.asarray(means, dtype=float)
        self.scale_ = np.asarray(scales, dtype=float)
        self.indicator_features_ = (
            [f.name for f in features if summary[f"{f.name}.missing"][0] > 0]
            if self.indicators else []
        )
        self.feature_names_in_ = np.asarray([f.name for f in features], dtype=object)
        self.feature_names_out_ = self._names_out()
        self.n_samples_seen_ = int(summary["rows"][0])
        return self

    def _names_out(self) -> list[str]:
        names: list[str] = []
        for f in self.features:
            if f.kind == "categorical":
                names += [f"{f.name}={_fmt(c)}" for c in f.categories]
            else:
                names.append(f.name)
        names += [f"{name}:missing" for name in self.indicator_features_]
        return names

    def fit_transform(self, X: pd.DataFrame, y: Any = None) -> np.ndarray:
        """Fit on rows, then transform them."""
        return self.fit(X, y).transform(X)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names of the output columns."""
        check_is_fitted(self, "mean_")
        return np.asarray(self.feature_names_out_, dtype=object)

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        """Transform rows into the model's input matrix (float64, no NaN)."""
        check_is_fitted(self, "mean_")
        unknown = [c for c in X.columns if c not in set(self.feature_names_in_)]
        if unknown:
            raise ValueError(
                f"columns {unknown} were not seen at fit; the schema changed since the "
                "preprocessing was fitted: fit it again"
            )
        n = len(X)
        blocks: list[np.ndarray] = []
        k = 0
        for f in self.features:
            col = X[f.name].to_numpy(dtype=float) if f.name in X.columns else np.full(n, np.nan)
            if f.kind == "categorical":
                onehot = np.zeros((n, len(f.categories)))
                seen = ~np.isnan(col)
                onehot[np.flatnonzero(seen), col[seen].astype(int)] = 1.0
                blocks.append(onehot)
            else:
                z = (col - self.mean_[k]) / self.scale_[k]
                blocks.append(np.nan_to_num(z, nan=0.0)[:, None])  # mean imputation
                k += 1
        for name in self.indicator_features_:
            col = X[name].to_numpy(dtype=float) if name in X.columns else np.full(n, np.nan)
            blocks.append(np.isnan(col).astype(float)[:, None])
        return np.hstack(blocks) if blocks else np.zeros((n, 0))

    def to_dict(self) -> dict[str, Any]:
        """Learned state as plain JSON-able values (sent to sites, stored with a model)."""
        check_is_fitted(self, "mean_")
        return {
            "features": [f.name for f in self.features],
            "indicators": self.indicators,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "indicator_features": list(self.indicator_features_),
            "n_samples_seen": self.n_samples_seen_,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], features: Sequence[Feature]) -> TabularPreprocessor:
        """Rebuild a fitted preprocessor; ``features`` must be the ones it was fitted on."""
        names = [f.name for f in features]
        if state["features"] != names:
            raise ValueError(
                f"preprocessing was fitted on features {state['features']}, not {names}: "
                "server and site use different schemas"
            )
        self = cls(features=features, indicators=bool(state["indicators"]))
        self.mean_ = np.asarray(state["mean"], dtype=float)
        self.scale_ = np.asarray(state["scale"], dtype=float)
        self.indicator_features_ = list(state["indicator_features"])
        self.feature_names_in_ = np.asarray(names, dtype=object)
        self.feature_names_out_ = self._names_out()
        self.n_samples_seen_ = int(state["n_samples_seen"])
        return self


def _fmt(value: float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
