"""A site in a feature group: its two new candidates, the group's evidence, the checked message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.adapt import GROUP_STRENGTHS, PRIOR_SD_FLOOR, GroupOffset, fit_correction, shrink
from client.contract import ContractError, parse
from client.site import SiteSettings
from shared import newton, protocol
from shared.correction import Correction
from shared.groups import GROUPS, Extension
from shared.metrics import sigmoid
from shared.preprocessing import TabularPreprocessor
from shared.schema import Feature, load_schema

GLUCOSE = [Feature("glucose", "numeric", unit="mg/dL", scope="site", required=False)]
SOURCE_BETA = np.array([0.8, -0.5, 0.3])


def _site(n: int, effect: float, seed: int) -> tuple[np.ndarray, pd.DataFrame, np.ndarray,
                                                        np.ndarray]:
    """Shared inputs, glucose, the source logit (blind to glucose) and labels using glucose."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    offset = x @ SOURCE_BETA - 0.5
    glucose = rng.normal(105.0, 15.0, n)
    y = (rng.random(n) < sigmoid(offset + effect * (glucose - 105.0) / 15.0)).astype(int)
    return x, pd.DataFrame({"glucose": glucose}), offset, y


def _group(rows: pd.DataFrame, effect: float, prior: tuple[float | None, float | None]
           = (None, None)) -> tuple[Extension, np.ndarray]:
    """An extension holding ``effect`` per standard deviation of glucose, and its logits."""
    prep = TabularPreprocessor(features=GLUCOSE).fit(pd.DataFrame({"glucose": [90.0, 120.0]}))
    prep.mean_, prep.scale_ = np.array([105.0]), np.array([15.0])
    n_out = len(prep.feature_names_out_)
    theta = np.zeros(3 + n_out + 1)
    theta[3] = effect
    ext = Extension(("glucose",), prep.to_dict(), theta, 4, 900, *prior)
    return ext, ext.logit(np.zeros((len(rows), 3)), rows, GLUCOSE)


def test_a_site_outside_every_group_keeps_its_candidates() -> None:
    """No group: the same choice and evidence as before groups existed."""
    x, rows, offset, y = _site(300, 1.0, seed=1)
    alone = fit_correction(x, rows, offset, y, GLUCOSE, seed=0)
    again = fit_correction(x, rows, offset, y, GLUCOSE, seed=0, groups=())
    assert alone.choice == again.choice and alone.evidence == again.evidence
    assert not any(str(e["candidate"]).startswith("group") for e in alone.evidence)


def test_a_member_scores_both_group_candidates() -> None:
    """The extension alone and with a private correction on top, at each strength."""
    x, rows, offset, y = _site(300, 1.2, seed=2)
    ext, logit = _group(rows, 1.2)
    corr = fit_correction(x, rows, offset, y, GLUCOSE, seed=0,
                          groups=[GroupOffset(ext, logit, 10.0)])
    labels = [e["candidate"] for e in corr.evidence]
    assert "group glucose" in labels
    assert [f"group glucose + correction C={c:g}" for c in GROUP_STRENGTHS] == [
        lbl for lbl in labels if lbl.startswith("group glucose +")]
    # The true effect, learned by the group: a clear gain over the source model here.
    row = next(e for e in corr.evidence if e["candidate"] == "group glucose")
    assert row["gain"] > row["se"] > 0
    assert corr.choice.startswith("group glucose")
    assert corr.extension is not None and corr.extension["features"] == ["glucose"]


def test_the_chosen_extension_is_applied_and_kept() -> None:
    """The final model's alpha holds the extension's logit; it survives the sealed state."""
    x, rows, offset, y = _site(300, 1.2, seed=2)
    ext, logit = _group(rows, 1.2)
    corr = fit_correction(x, rows, offset, y, GLUCOSE, seed=0,
                          groups=[GroupOffset(ext, logit, 10.0)])
    stored = Correction.from_dict(json.loads(json.dumps(corr.to_dict())))
    alpha = stored.alpha(x, rows, GLUCOSE, offset)
    np.testing.assert_allclose(alpha, corr.alpha(x, rows, GLUCOSE, offset))
    if corr.choice == "group glucose":
        np.testing.assert_allclose(alpha, ext.logit(x, rows, GLUCOSE, 10.0))


def test_thin_evidence_leans_on_the_group() -> None:
    """Thin evidence at a site, clear gains at its group's members: the extension is taken.

    Without the group's evidence the site does not take it.
    """
    found = None
    for seed in range(40):  # a seeded small site whose own evidence is thin
        x, rows, offset, y = _site(60, 1.0, seed=100 + seed)
        ext, logit = _group(rows, 1.0)
        alone = fit_correction(x, rows, offset, y, GLUCOSE, seed=0,
                               groups=[GroupOffset(ext, logit, 10.0)])
        row = next(e for e in alone.evidence if e["candidate"] == "group glucose")
        # Its own evidence does not clear the margin, though the extension scores best.
        if (0 < row["gain"] <= row["se"] and row["cv_auc"] >= alone.cv["cv_auc_source"]
                and row["cv_log_loss"] < alone.cv["cv_log_loss"]
                and not alone.choice.startswith("group glucose")):
            found = (x, rows, offset, y, alone)
            break
    assert found is not None
    x, rows, offset, y, alone = found
    ext, logit = _group(rows, 1.0, prior=(0.08, 0.02))
    helped = fit_correction(x, rows, offset, y, GLUCOSE, seed=0,
                            groups=[GroupOffset(ext, logit, 10.0)])
    assert helped.choice.startswith("group glucose")
    row = next(e for e in helped.evidence if e["candidate"] == "group glucose")
    assert row["shrunk_gain"] > row["shrunk_se"] and "group's evidence" in helped.reason


def test_no_claimed_evidence_overrides_a_sites_own_rows() -> None:
    """An extension the site's rows say is worse is refused, whatever prior comes with it."""
    x, rows, offset, y = _site(300, 1.0, seed=3)
    ext, logit = _group(rows, -1.0, prior=(10.0, 1e-9))
    corr = fit_correction(x, rows, offset, y, GLUCOSE, seed=0,
                          groups=[GroupOffset(ext, logit, 10.0)])
    assert corr.choice != "group glucose"


def test_shrink_weighs_by_precision_and_floors_the_groups() -> None:
    """Equal errors give the midpoint; the group's spread never counts below the floor."""
    mean, se = shrink(0.0, 0.02, 0.1, 0.02)
    assert mean == pytest.approx(0.05) and se == pytest.approx(0.02 / np.sqrt(2))
    assert shrink(0.0, 0.01, 1.0, 1e-12) == pytest.approx(shrink(0.0, 0.01, 1.0, PRIOR_SD_FLOOR))


def _adapt_message(groups: list[dict[str, Any]]) -> tuple[Message, SiteSettings]:
    schema = load_schema("synthetic")
    shared = list(schema.shared_features)
    prep = TabularPreprocessor(features=shared).fit(pd.DataFrame(
        {f.name: [1.0, 2.0, 3.0] if f.kind != "categorical" else [0.0, 1.0, 0.0]
         for f in shared}))
    d = len(prep.feature_names_out_)
    arrays = newton.to_arrays(np.zeros(d + 1))
    config: dict[str, Any] = {
              "schema": "synthetic", "schema-digest": schema.digest(), "protocol": "default",
              "split-seed": 1, "test-fraction": 0.3, "repeat": 0, "model": "logreg",
              "hidden-units": 16, "cv-folds": 5, "preprocessing": json.dumps(prep.to_dict()),
              GROUPS: json.dumps(groups)}
    msg = Message(content=RecordDict({protocol.CONFIG: ConfigRecord(config),
                                      protocol.ARRAYS: arrays}),
                  dst_node_id=1, message_type=protocol.ADAPT)
    site = SiteSettings("site-a", Path("/nonexistent.csv"), ("glucose",), Path("/nonexistent"),
                        simulated=True)
    return msg, site


def _state(features: list[str], n_weights: int, **extra: Any) -> dict[str, Any]:
    schema = load_schema("synthetic")
    shared = len(TabularPreprocessor(features=list(schema.shared_features)).fit(pd.DataFrame(
        {f.name: [1.0, 2.0, 3.0] if f.kind != "categorical" else [0.0, 1.0, 0.0]
         for f in schema.shared_features})).feature_names_out_)
    prep = TabularPreprocessor(features=list(schema.resolve_site_features(
        [f for f in features if f == "glucose"] or ["glucose"]))).fit(
        pd.DataFrame({"glucose": [90.0, 120.0, np.nan]}))
    return {"features": features, "preprocessing": prep.to_dict(),
            "theta": [0.0] * (shared + n_weights + 1), **extra}


def test_the_adapt_message_gives_a_site_only_its_groups(task_identity: None) -> None:
    """The site's group is parsed and checked; another group's extension is skipped."""
    mine = _state(["glucose"], 2, prior_gain=0.05, prior_sd=0.02)
    other = {**_state(["glucose"], 2), "features": ["hba1c"]}
    msg, site = _adapt_message([mine, other])
    request = parse("adapt", msg, site, 10.0)
    (ext,) = request.extensions  # type: ignore[attr-defined]
    assert ext.features == ("glucose",) and ext.prior_gain == 0.05


@pytest.mark.parametrize("bad", [
    {"prior_gain": float("nan"), "prior_sd": 0.02},
    {"prior_gain": 0.05, "prior_sd": 0.0},
    {"prior_gain": 0.05},
    {"theta": [0.0, 1.0]},
    {"theta": [1e9] * 20},
])
def test_an_unusable_group_is_refused(bad: dict[str, Any], task_identity: None) -> None:
    """Wrong sizes, non-finite or unbounded numbers: the message is refused, naming groups."""
    state = _state(["glucose"], 2)
    if "theta" in bad and len(bad["theta"]) == 20:
        bad = {"theta": [1e9] * len(state["theta"])}
    msg, site = _adapt_message([{**state, **bad}])
    with pytest.raises(ContractError, match="groups are not usable"):
        parse("adapt", msg, site, 10.0)
