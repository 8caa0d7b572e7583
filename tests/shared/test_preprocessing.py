"""Tests of the federated preprocessing: summaries, merging and the fitted transformer."""

import json

import numpy as np
import pandas as pd
import pytest

from shared.preprocessing import (
    NotFittedError,
    TabularPreprocessor,
    merge_summaries,
    summarize,
    summary_keys,
)
from shared.schema import Feature

FEATURES = [
    Feature("age", "numeric"),
    Feature("weight", "numeric"),
    Feature("sex", "binary"),
    Feature("cp", "categorical", categories=(1.0, 2.0, 3.0, 4.0)),
    Feature("ward", "categorical", categories=("icu", "general")),
]


def _frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Rows with missing values in weight, sex and cp (never in age or ward)."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "age": rng.normal(55.0, 12.0, n),
        "weight": rng.normal(80.0, 15.0, n),
        "sex": rng.integers(0, 2, n).astype(float),
        "cp": rng.integers(0, 4, n).astype(float),
        "ward": rng.integers(0, 2, n).astype(float),
    })
    for col, frac in (("weight", 0.1), ("sex", 0.05), ("cp", 0.08)):
        df.loc[rng.random(n) < frac, col] = np.nan
    return df


def test_federated_fit_equals_central_fit() -> None:
    """Merged summaries of three random row chunks give the same fit as the pooled rows."""
    rows = _frame()
    rng = np.random.default_rng(1)
    order = rng.permutation(len(rows))
    chunks = [rows.iloc[idx] for idx in np.array_split(order, [40, 170])]
    assert sorted(len(c) for c in chunks) == [40, 130, 130]

    fed = TabularPreprocessor(FEATURES).fit_summary(
        merge_summaries([summarize(c, FEATURES) for c in chunks])
    )
    central = TabularPreprocessor(FEATURES).fit(pd.concat(chunks))

    np.testing.assert_allclose(fed.mean_, central.mean_, rtol=1e-12, atol=0)
    np.testing.assert_allclose(fed.scale_, central.scale_, rtol=1e-12, atol=0)
    assert fed.indicator_features_ == central.indicator_features_ == ["weight", "sex", "cp"]
    assert fed.n_samples_seen_ == central.n_samples_seen_ == len(rows)
    np.testing.assert_allclose(fed.transform(rows), central.transform(rows), rtol=0, atol=1e-10)
    # And the fit is the textbook one: observed mean and population standard deviation.
    assert fed.mean_[1] == pytest.approx(rows["weight"].mean(), rel=1e-12)
    assert fed.scale_[1] == pytest.approx(rows["weight"].std(ddof=0), rel=1e-10)


def test_transform_has_no_nan_and_expected_columns() -> None:
    """One-hot per category, indicators only for features missing at fit, no NaN left."""
    rows = _frame()
    prep = TabularPreprocessor(FEATURES).fit(rows)
    out = prep.transform(rows)
    expected = [
        "age", "weight", "sex", "cp=1", "cp=2", "cp=3", "cp=4", "ward=icu", "ward=general",
        "weight:missing", "sex:missing", "cp:missing",
    ]
    assert list(prep.get_feature_names_out()) == expected
    assert out.shape == (len(rows), len(expected))
    assert out.dtype == np.float64
    assert not np.isnan(out).any()
    cols = {name: out[:, i] for i, name in enumerate(expected)}
    # Standardised and mean-imputed numeric columns.
    assert cols["age"].mean() == pytest.approx(0.0, abs=1e-12)
    assert cols["age"].std() == pytest.approx(1.0, rel=1e-12)
    assert np.all(cols["weight"][rows["weight"].isna().to_numpy()] == 0.0)
    # Indicators flag exactly the missing cells; a missing category is an all-zero one-hot.
    np.testing.assert_array_equal(cols["cp:missing"], rows["cp"].isna().to_numpy(dtype=float))
    onehot = out[:, 3:7].sum(axis=1)
    np.testing.assert_array_equal(onehot, 1.0 - cols["cp:missing"])
    np.testing.assert_array_equal(out[:, 7:9].sum(axis=1), np.ones(len(rows)))


def test_indicators_can_be_turned_off() -> None:
    """With indicators=False no ":missing" column is added."""
    prep = TabularPreprocessor(FEATURES, indicators=False).fit(_frame())
    assert prep.indicator_features_ == []
    assert not any(n.endswith(":missing") for n in prep.get_feature_names_out())


def test_absent_column_is_all_missing() -> None:
    """A feature whose column is absent counts as missing in every row (fit and transform)."""
    features = [*FEATURES, Feature("glucose", "numeric", scope="site", required=False)]
    rows = _frame()  # no glucose column
    summary = summarize(rows, features)
    assert summary["glucose.count"] == [0.0]
    assert summary["glucose.missing"] == [float(len(rows))]

    prep = TabularPreprocessor(features).fit(rows)
    assert prep.mean_[-1] == 0.0
    assert prep.scale_[-1] == 1.0
    assert "glucose" in prep.indicator_features_
    out = prep.transform(rows)
    names = list(prep.get_feature_names_out())
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[:, names.index("glucose")], np.zeros(len(rows)))
    np.testing.assert_array_equal(out[:, names.index("glucose:missing")], np.ones(len(rows)))

    # Fitted with the column, transformed without it: imputed, flagged where indicated.
    with_glucose = rows.assign(glucose=np.r_[np.nan, np.linspace(70.0, 140.0, len(rows) - 1)])
    prep = TabularPreprocessor(features).fit(with_glucose)
    out = prep.transform(rows)
    names = list(prep.get_feature_names_out())
    np.testing.assert_array_equal(out[:, names.index("glucose")], np.zeros(len(rows)))
    np.testing.assert_array_equal(out[:, names.index("glucose:missing")], np.ones(len(rows)))


def test_transform_before_fit_raises_not_fitted() -> None:
    """transform, to_dict and get_feature_names_out before fit raise NotFittedError."""
    prep = TabularPreprocessor(FEATURES)
    with pytest.raises(NotFittedError):
        prep.transform(_frame())
    with pytest.raises(NotFittedError):
        prep.to_dict()
    with pytest.raises(NotFittedError):
        prep.get_feature_names_out()


def test_unknown_column_at_transform_says_refit() -> None:
    """A column not seen at fit raises a ValueError naming it and saying to fit again."""
    rows = _frame()
    prep = TabularPreprocessor(FEATURES).fit(rows)
    with pytest.raises(ValueError, match=r"'bogus'.*fit it again"):
        prep.transform(rows.assign(bogus=1.0))


def test_to_dict_from_dict_round_trip() -> None:
    """A JSON round trip of the state rebuilds a preprocessor with identical output."""
    rows = _frame()
    prep = TabularPreprocessor(FEATURES).fit(rows)
    state = json.loads(json.dumps(prep.to_dict(), allow_nan=False))
    again = TabularPreprocessor.from_dict(state, FEATURES)
    np.testing.assert_array_equal(again.transform(rows), prep.transform(rows))
    assert list(again.get_feature_names_out()) == list(prep.get_feature_names_out())
    assert again.n_samples_seen_ == prep.n_samples_seen_
    assert again.to_dict() == prep.to_dict()


def test_from_dict_with_other_features_raises() -> None:
    """Rebuilding with features other than those fitted on raises a ValueError."""
    state = TabularPreprocessor(FEATURES).fit(_frame()).to_dict()
    with pytest.raises(ValueError, match="different schemas"):
        TabularPreprocessor.from_dict(state, FEATURES[:-1])
    with pytest.raises(ValueError, match="different schemas"):
        TabularPreprocessor.from_dict(state, list(reversed(FEATURES)))


@pytest.mark.parametrize("value", [0.0, 0.1, 0.7, 3.3, 70.3, 123.456, 1e5 + 0.1])
def test_zero_variance_feature_gets_scale_one(value: float) -> None:
    """A constant feature gets scale 1 (not a rounding-error scale), centrally and federated."""
    features = [Feature("x", "numeric")]
    rows = pd.DataFrame({"x": np.full(1000, value)})
    central = TabularPreprocessor(features).fit(rows)
    fed = TabularPreprocessor(features).fit_summary(
        merge_summaries([summarize(rows.iloc[:300], features),
                         summarize(rows.iloc[300:], features)])
    )
    for prep in (central, fed):
        assert prep.scale_[0] == 1.0
        assert prep.mean_[0] == pytest.approx(value, rel=1e-12, abs=1e-15)
        out = prep.transform(pd.DataFrame({"x": [value, value + 1.0]}))
        np.testing.assert_allclose(out[:, 0], [0.0, 1.0], atol=1e-9)


def test_summaries_hold_only_counts_and_sums() -> None:
    """A summary has exactly summary_keys, fixed-length lists of numbers, whatever the rows."""
    keys = summary_keys(FEATURES)
    small, large = summarize(_frame(20, seed=2), FEATURES), summarize(_frame(500), FEATURES)
    for s in (small, large):
        assert list(s) == keys
        assert all(isinstance(v, float) for vals in s.values() for v in vals)
    assert {k: len(v) for k, v in small.items()} == {k: len(v) for k, v in large.items()}
    assert len(small["cp.counts"]) == 4
    rows = _frame(20, seed=2)
    assert small["rows"] == [20.0]
    assert small["weight.count"] == [float(rows["weight"].notna().sum())]
    assert small["weight.sum"][0] == pytest.approx(rows["weight"].sum())
    assert small["weight.sumsq"][0] == pytest.approx((rows["weight"] ** 2).sum())
    assert sum(small["cp.counts"]) + small["cp.missing"][0] == 20.0


def test_merging_mismatched_summaries_raises() -> None:
    """Summaries of other features, other category counts or none at all cannot be merged."""
    rows = _frame(50)
    good = summarize(rows, FEATURES)
    with pytest.raises(ValueError, match="does not match"):
        merge_summaries([good, summarize(rows, FEATURES[:2])])
    three_cats = [*FEATURES[:3], Feature("cp", "categorical", categories=(1.0, 2.0, 3.0)),
                  FEATURES[4]]
    rows3 = rows.assign(cp=rows["cp"].clip(upper=2.0))
    with pytest.raises(ValueError, match="does not match"):
        merge_summaries([good, summarize(rows3, three_cats)])
    with pytest.raises(ValueError, match="no summaries"):
        merge_summaries([])
    with pytest.raises(ValueError, match="lacks"):
        TabularPreprocessor(FEATURES).fit_summary(summarize(rows, FEATURES[:2]))
