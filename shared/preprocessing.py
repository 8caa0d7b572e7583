"""Imputation, scaling, one-hot coding and missingness indicators, fitted from aggregate sums.

The same estimator serves the federation and a single site. A site summarises its training
rows into counts and sums (:func:`summarize`); the server adds the summaries of all sites
(:func:`merge_summaries`) and fits on the total (:meth:`TabularPreprocessor.fit_summary`).
Fitting on one site's rows (:meth:`TabularPreprocessor.fit`) is the same computation on one
summary, so a federated fit equals a central fit on the pooled training rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from shared.schema import Feature

Summary = dict[str, list[float]]


class NotFittedError(ValueError, AttributeError):
    """The preprocessor is used before ``fit`` (as scikit-learn's error of the same name)."""


def check_is_fitted(estimator: object, attribute: str) -> None:
    """Raise :class:`NotFittedError` unless ``estimator`` has the fitted ``attribute``.

    scikit-learn's ``check_is_fitted`` does the same; it is not imported here because
    importing scikit-learn costs about 0.6 s, and a deployed site starts a fresh process
    for every message: the training rounds must not pay for it.
    """
    if not hasattr(estimator, attribute):
        raise NotFittedError(
            f"this {type(estimator).__name__} is not fitted yet: call fit (training rows) or "
            "fit_summary (aggregate sums) before using it"
        )

# Relative variance (to the second moment) below which a feature counts as constant.
_CONSTANT_RTOL = 1e-10


def summary_keys(features: Sequence[Feature]) -> list[str]:
    """Names of the summary entries for ``features``, in a fixed order.

    Every entry is a list of numbers (counts and sums), so a summary travels as a Flower
    ``MetricRecord`` and two summaries add entry by entry.
    """
    keys = ["rows"]
    for f in features:
        if f.kind == "categorical":
            keys += [f"{f.name}.counts", f"{f.name}.missing"]
        else:
            keys += [f"{f.name}.count", f"{f.name}.sum", f"{f.name}.sumsq", f"{f.name}.missing"]
    return keys


def summarize(X: pd.DataFrame, features: Sequence[Feature]) -> Summary:
    """Summarise rows into counts and sums; no value of any single row survives.

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
        ``rows``; per numeric or binary feature: ``count``, ``sum``, ``sumsq``, ``missing``;
        per categorical feature: ``counts`` per category and ``missing``.
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
            out[f"{f.name}.count"] = [float(len(seen))]
            out[f"{f.name}.sum"] = [float(seen.sum())]
            out[f"{f.name}.sumsq"] = [float(np.square(seen).sum())]
            out[f"{f.name}.missing"] = [missing]
    return out


def merge_summaries(summaries: Sequence[Summary]) -> Summary:
    """Add site summaries entry by entry (all must have the same keys and lengths)."""
    if not summaries:
        raise ValueError("no summaries to merge: no site answered the stats phase")
    keys = list(summaries[0])
    total: Summary = {k: [0.0] * len(summaries[0][k]) for k in keys}
    for i, s in enumerate(summaries):
        if list(s) != keys or any(len(s[k]) != len(total[k]) for k in keys):
            raise ValueError(f"summary #{i} does not match the others' keys or lengths")
        for k in keys:
            total[k] = [a + b for a, b in zip(total[k], s[k], strict=True)]
    return total


class TabularPreprocessor:
    """Standardise numbers, one-hot code categories, impute and flag missing values.

    Follows scikit-learn's estimator conventions (settings in ``__init__``, learned state with a
    trailing underscore set by ``fit``, ``check_is_fitted`` before use, feature names recorded
    at fit and checked at transform) without importing scikit-learn (see
    :func:`check_is_fitted`).

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
        Per non-categorical feature, the standard deviation (1 where undefined or zero).
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
            if count > 0:
                mean = summary[f"{f.name}.sum"][0] / count
                second = summary[f"{f.name}.sumsq"][0] / count
                var = max(second - mean * mean, 0.0)
                # sumsq/n - mean^2 cancels: a constant feature leaves a rounding residue of a
                # few 1e-16 of the second moment, which must not become a tiny scale.
                if var <= _CONSTANT_RTOL * second:
                    var = 0.0
            else:
                mean, var = 0.0, 0.0
            std = math.sqrt(var)
            means.append(mean)
            scales.append(std if std > 1e-12 else 1.0)
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
