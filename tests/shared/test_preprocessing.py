"""Tests of the federated preprocessing: summaries, merging and the fitted transformer."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from shared.preprocessing import (
    NotFittedError,
    Summary,
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


@pytest.mark.parametrize(
    "value", [0.0, 0.1, 0.7, 3.3, -3.3, 70.3, 123.456, 1e5 + 0.1, 7e8, 7e8 + 0.1, 1e-7]
)
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
    weight = rows["weight"].dropna()
    assert small["weight.m2"][0] == pytest.approx(((weight - weight.mean()) ** 2).sum())
    assert not any(k.endswith(".sumsq") for k in keys)
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


# ------------------------------------------------- exact, stable merging of spreads (m2)


def _assert_same_fit(
    sites: list[pd.DataFrame], features: list[Feature], rtol: float = 1e-12
) -> tuple[TabularPreprocessor, TabularPreprocessor]:
    """Merged site summaries fit as the pooled rows do; returns (federated, central)."""
    merged = merge_summaries([summarize(s, features) for s in sites])
    pooled_rows = pd.concat(sites, ignore_index=True)
    pooled = summarize(pooled_rows, features)
    assert list(merged) == list(pooled) == summary_keys(features)
    for f in features:
        for part in ("count", "missing"):
            assert merged[f"{f.name}.{part}"] == pooled[f"{f.name}.{part}"]
    fed = TabularPreprocessor(features).fit_summary(merged)
    central = TabularPreprocessor(features).fit(pooled_rows)
    np.testing.assert_allclose(fed.mean_, central.mean_, rtol=rtol, atol=0)
    np.testing.assert_allclose(fed.scale_, central.scale_, rtol=rtol, atol=0)
    assert fed.indicator_features_ == central.indicator_features_
    return fed, central


def test_small_spread_around_large_mean_is_scaled() -> None:
    """Mean 1e8, sd 100 is not constant: scale ~100 centrally and federated (not 1)."""
    features = [Feature("x", "numeric")]
    rng = np.random.default_rng(3)
    rows = pd.DataFrame({"x": rng.normal(1e8, 100.0, 30_000)})
    sites = [rows.iloc[:4_000], rows.iloc[4_000:19_000], rows.iloc[19_000:]]
    fed, central = _assert_same_fit(sites, features)
    for prep in (fed, central):
        assert prep.scale_[0] == pytest.approx(rows["x"].std(ddof=0), rel=1e-12)
        assert prep.mean_[0] == pytest.approx(rows["x"].mean(), rel=1e-15)
        z = prep.transform(rows)[:, 0]
        assert z.std() == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize(("mean", "sd", "shift"), [
    (1e8, 100.0, 0.0), (55.0, 12.0, 3.0), (0.0, 1e-13, 3.0), (1e-6, 1e-9, 3.0), (-3e4, 7.0, 3.0),
])
def test_merged_m2_equals_pooled_m2(mean: float, sd: float, shift: float) -> None:
    """Chan's merge of per-site m2 equals the m2 of the pooled rows (means, scales ~1e-12)."""
    features = [Feature("x", "numeric")]
    rng = np.random.default_rng(7)
    rows = pd.DataFrame({"x": rng.normal(mean, sd, 20_000)})
    rows.loc[:4_999, "x"] += shift * sd  # sites with other means: the between-site term
    sites = [rows.iloc[:5_000], rows.iloc[5_000:5_001], rows.iloc[5_001:]]
    merged = merge_summaries([summarize(s, features) for s in sites])
    pooled = summarize(rows, features)
    assert merged["x.m2"][0] == pytest.approx(pooled["x.m2"][0], rel=2e-12)
    assert merged["x.sum"][0] == pytest.approx(pooled["x.sum"][0], rel=1e-15, abs=1e-300)
    fed, _ = _assert_same_fit(sites, features)
    assert fed.scale_[0] == pytest.approx(rows["x"].std(ddof=0), rel=1e-12)


def test_merge_error_bound_for_tiny_spread_and_different_site_means() -> None:
    """Mean 1e8, sd 100, site means 3 sd apart: scales agree within 1e-16 * mean / sd.

    Each site's mean travels as a float64 sum, rounded to ~1e-16 of the mean; with the sites'
    means far apart in units of sd, that rounding enters the between-site term (see
    merge_summaries). It is the only gap between federated and central, and it is bounded.
    """
    features = [Feature("x", "numeric")]
    rng = np.random.default_rng(8)
    rows = pd.DataFrame({"x": rng.normal(1e8, 100.0, 6_000)})
    rows.loc[:1_999, "x"] += 300.0
    sites = [rows.iloc[:2_000], rows.iloc[2_000:]]
    fed, _ = _assert_same_fit(sites, features, rtol=1e-16 * 1e8 / 100.0)
    assert fed.scale_[0] == pytest.approx(rows["x"].std(ddof=0), rel=1e-10)


def test_sites_with_zero_one_or_no_observed_values_merge_exactly() -> None:
    """An empty site, a site with 1 observed value (m2 0) and a site lacking a column merge."""
    features = [Feature("a", "numeric"), Feature("b", "numeric"), Feature("s", "binary")]
    rng = np.random.default_rng(11)

    def rows(n: int) -> pd.DataFrame:
        return pd.DataFrame({"a": rng.normal(1e6, 100.0, n), "b": rng.normal(5.0, 2.0, n),
                             "s": rng.integers(0, 2, n).astype(float)})

    one_a = rows(40)
    one_a.loc[1:, "a"] = np.nan  # a single observed value of a
    no_b = rows(25).drop(columns="b")  # b absent at this site
    all_missing = rows(30).assign(s=np.nan)  # s present but never observed
    empty = rows(0)
    sites = [rows(500), one_a, no_b, all_missing, empty, rows(1), rows(300)]

    s_one, s_no_b, s_missing, s_empty = (summarize(s, features)
                                         for s in (one_a, no_b, all_missing, empty))
    assert (s_one["a.count"], s_one["a.m2"]) == ([1.0], [0.0])
    assert (s_no_b["b.count"], s_no_b["b.sum"], s_no_b["b.m2"]) == ([0.0], [0.0], [0.0])
    assert s_no_b["b.missing"] == [25.0]
    assert (s_missing["s.count"], s_missing["s.m2"], s_missing["s.missing"]) == (
        [0.0], [0.0], [30.0])
    assert all(v == [0.0] for v in s_empty.values())
    assert all(math.isfinite(v) for s in (s_one, s_no_b, s_missing, s_empty)
               for vals in s.values() for v in vals)

    fed, _ = _assert_same_fit(sites, features)
    pooled = pd.concat(sites, ignore_index=True)
    assert fed.scale_[0] == pytest.approx(pooled["a"].std(ddof=0), rel=1e-12)
    assert fed.scale_[1] == pytest.approx(pooled["b"].std(ddof=0), rel=1e-12)
    assert fed.indicator_features_ == ["a", "b", "s"]


def test_merge_is_chans_formula() -> None:
    """M2 = sum M2_i + sum n_i (mean_i - mean)^2, with mean = sum(sum_i) / sum(n_i)."""
    a: Summary = {"rows": [3.0], "x.count": [2.0], "x.sum": [4.0], "x.m2": [2.0],
                  "x.missing": [1.0]}
    b: Summary = {"rows": [4.0], "x.count": [4.0], "x.sum": [20.0], "x.m2": [8.0],
                  "x.missing": [0.0]}
    none: Summary = {"rows": [5.0], "x.count": [0.0], "x.sum": [0.0], "x.m2": [0.0],
                     "x.missing": [5.0]}
    merged = merge_summaries([a, b, none])
    # means 2 and 5, overall 4: 2 + 8 + 2 * (2 - 4)^2 + 4 * (5 - 4)^2 = 22
    assert merged == {"rows": [12.0], "x.count": [6.0], "x.sum": [24.0], "x.m2": [22.0],
                      "x.missing": [6.0]}
    values = np.array([1.0, 3.0, 3.0, 5.0, 5.0, 7.0])  # rows with those very summaries
    assert merged["x.m2"][0] == pytest.approx(float(((values - values.mean()) ** 2).sum()))


@pytest.mark.parametrize("values", [[5.0], [5.0, np.nan], [2.5, 2.5], [], [np.nan, np.nan]])
def test_fewer_than_two_distinct_values_is_constant(values: list[float]) -> None:
    """A feature with fewer than two observations (or one value) gets scale 1."""
    features = [Feature("x", "numeric")]
    prep = TabularPreprocessor(features).fit(pd.DataFrame({"x": values}, dtype=float))
    assert prep.scale_[0] == 1.0


def test_relative_spread_above_threshold_is_scaled() -> None:
    """A spread of 1e-8 of the mean is data (scaled); a rounding residue is not."""
    features = [Feature("x", "numeric")]
    rows = pd.DataFrame({"x": 7e8 + np.tile([-7.0, 7.0], 500)})  # sd 7 = 1e-8 of the mean
    prep = TabularPreprocessor(features).fit(rows)
    assert prep.scale_[0] == pytest.approx(7.0, rel=1e-12)


# ------------------------------------------------- scikit-learn's parameter conventions


def test_preprocessor_clone_unfitted_and_fitted() -> None:
    """sklearn.base.clone gives an unfitted copy with equal params that fits identically."""
    rows = _frame()
    for est in (TabularPreprocessor(FEATURES, indicators=False),
                TabularPreprocessor(FEATURES, indicators=False).fit(rows)):
        copy = clone(est)
        assert type(copy) is TabularPreprocessor and copy is not est
        assert copy.get_params() == est.get_params() == {
            "features": FEATURES, "indicators": False}
        assert not hasattr(copy, "mean_")
        with pytest.raises(NotFittedError):
            copy.transform(rows)
        np.testing.assert_array_equal(
            copy.fit(rows).transform(rows),
            TabularPreprocessor(FEATURES, indicators=False).fit(rows).transform(rows),
        )
    fitted = TabularPreprocessor(FEATURES).fit(rows)
    np.testing.assert_array_equal(clone(fitted).fit(rows).transform(rows), fitted.transform(rows))
    assert clone(TabularPreprocessor()).get_params() == {"features": (), "indicators": True}


def test_preprocessor_get_and_set_params() -> None:
    """get_params holds exactly the __init__ parameters; set_params returns self, checks names."""
    prep = TabularPreprocessor(FEATURES)
    assert prep.get_params(deep=True) == prep.get_params(deep=False) == {
        "features": FEATURES, "indicators": True}
    assert prep.set_params(indicators=False) is prep
    assert prep.indicators is False
    assert prep.set_params() is prep
    with pytest.raises(ValueError, match=r"'bogus'.*TabularPreprocessor.*'indicators'"):
        prep.set_params(indicators=True, bogus=1)
    assert prep.indicators is False  # nothing set when a name is wrong
