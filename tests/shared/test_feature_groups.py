"""Feature groups: formed from feature names only; a group's evidence from its loss sums."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.groups import Extension, Group, form_groups, group_prior, inputs
from shared.preprocessing import TabularPreprocessor
from shared.schema import load_schema


def test_a_group_of_one_is_no_group() -> None:
    """A feature only one site measures forms no group, whatever min-sites says."""
    sites = {"a": ["glucose"], "b": [], "c": ["hba1c"]}
    assert form_groups(sites, 2) == []
    assert form_groups(sites, 1) == []
    assert form_groups(sites, 0) == []


def test_a_site_with_two_features_is_in_two_groups() -> None:
    """Glucose at a, b, c and hba1c at c, d: c belongs to both groups."""
    sites = {"a": ["glucose"], "b": ["glucose"], "c": ["glucose", "hba1c"], "d": ["hba1c"]}
    groups = form_groups(sites, 2, order=["glucose", "hba1c"])
    assert groups == [Group(("glucose",), ("a", "b", "c")), Group(("hba1c",), ("c", "d"))]
    assert [g.name for g in groups if "c" in g.members] == ["glucose", "hba1c"]


def test_features_measured_by_the_same_sites_form_one_group() -> None:
    """Two features always measured together are one group of both, in the schema's order."""
    sites = {"a": ["hba1c", "glucose"], "b": ["glucose", "hba1c"], "c": []}
    (group,) = form_groups(sites, 2, order=["glucose", "hba1c"])
    assert group == Group(("glucose", "hba1c"), ("a", "b"))
    assert group.name == "glucose+hba1c"


def test_min_group_sites_is_respected() -> None:
    """A group needs min-group-sites members."""
    sites = {"a": ["glucose"], "b": ["glucose"], "c": ["hba1c"], "d": ["hba1c"],
             "e": ["hba1c"]}
    assert [g.name for g in form_groups(sites, 3)] == ["hba1c"]
    assert [g.name for g in form_groups(sites, 2)] == ["glucose", "hba1c"]


def test_group_prior_is_the_mean_gain_less_the_fits_optimism() -> None:
    """Members' mean gain, each counted once, less the fit's optimism; the gains' spread."""
    initial = {1: (70.0, 100), 2: (140.0, 200)}
    final = {1: (60.0, 100), 2: (130.0, 200)}
    gain, sd = group_prior(initial, final, parameters=4)
    assert gain == pytest.approx((0.1 + 0.05) / 2 - 2.0 / 300)  # each member counted once
    assert sd == pytest.approx(np.std([0.1, 0.05], ddof=1))
    assert group_prior({1: (70.0, 100)}, {1: (60.0, 100)}, 4) == (None, None)


def test_extension_round_trip_and_logit() -> None:
    """An extension survives its JSON state; its logit is [x_shared, group inputs] . w + b."""
    schema = load_schema("synthetic")
    defs = schema.resolve_site_features(["glucose"])
    rows = pd.DataFrame({"glucose": [90.0, 150.0, np.nan, 110.0]})
    prep = TabularPreprocessor(features=list(defs)).fit(rows)
    x = np.array([[0.5, -1.0], [0.0, 2.0], [1.0, 1.0], [-0.5, 0.0]])
    theta = np.array([0.1, 0.2, 0.7, 0.3, -0.4])[: x.shape[1] + len(prep.feature_names_out_) + 1]
    ext = Extension(("glucose",), prep.to_dict(), theta, 2, 4, 0.05, 0.02)
    again = Extension.from_dict(ext.to_dict())
    assert again.features == ext.features and again.prior_gain == 0.05
    z = inputs(x, rows, prep)
    np.testing.assert_allclose(again.logit(x, rows, defs), z @ theta[:-1] + theta[-1])
    # The site's input bound clips the group's inputs as it clips the shared ones.
    assert np.abs(inputs(x, rows * 100, prep, bound=1.0)[:, 2:]).max() <= 1.0
