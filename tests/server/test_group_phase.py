"""The group phase over in-process sites: the extension is the pooled fit of the group's rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from client.client_app import app as client_app
from client.data import read_site_data
from client.policy import NO_POLICY
from client.site import read_manifest
from client.split import split_site
from server import federation
from server.federation import run_federation
from server.progress import Progress
from shared import newton
from shared.groups import Extension, inputs
from shared.preprocessing import TabularPreprocessor
from shared.schema import load_schema
from shared.settings import RunSettings
from simulations.generator import generate
from simulations.inprocess import InProcessGrid, manifest_contexts


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any
         ) -> tuple[dict[str, Any], dict[str, Any], RunSettings, Path]:
    """Four generated sites (glucose at two of them), with the group phase's inputs kept."""
    manifest = generate(tmp_path / "data", n_sites=4, seed=11)
    grid = InProcessGrid(manifest_contexts(read_manifest(manifest), tmp_path, {}), client_app)
    seen: dict[str, Any] = {}
    real = federation.group_phase

    def spy(rep: Any, prep: TabularPreprocessor, source: Any) -> list[Extension]:
        seen.update(prep=prep, source=source, extensions=real(rep, prep, source))
        return list(seen["extensions"])

    monkeypatch.setattr(federation, "group_phase", spy)
    settings = RunSettings(**{"num_server_rounds": 20, "min_sites": 2, "node_wait_timeout": 1.0,
                              "group_rounds": 30, "newton_tolerance": 1e-9, **overrides})
    report = run_federation(grid, settings, Progress(tmp_path / "out"), {})
    return report, seen, settings, manifest


def _mean_loss(z: np.ndarray, y: np.ndarray, offset: np.ndarray, theta: np.ndarray) -> float:
    eta = offset + z @ theta[:-1] + theta[-1]
    return float(np.mean(np.logaddexp(0.0, eta) - y * eta))


def test_group_extension_is_the_pooled_fit_of_the_group_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Newton over the group's two sites reaches the central fit of their pooled rows.

    Same source logit as offset, same objective: mean log-loss within 1e-4.
    """
    report, seen, settings, manifest = _run(tmp_path, monkeypatch)
    (ext,) = seen["extensions"]
    assert ext.features == ("glucose",) and ext.members == 2
    group = report["groups"]["glucose"]
    assert group["members"] == ["hospital-a", "hospital-c"] and group["trained"] == 1
    assert set(group["chosen_by"]) <= set(group["members"])  # only members may choose it
    assert group["rounds"] >= 2 and set(group["effects"]) == {"glucose", "glucose:missing"}

    schema = load_schema(settings.schema)
    shared = [f.name for f in schema.shared_features]
    defs = schema.resolve_site_features(["glucose"])
    theta_source = newton.parameters(seen["source"])
    parts = []
    for site in read_manifest(manifest).sites:
        if site.name not in group["members"]:
            continue
        data = read_site_data(site.data_file, schema, site.site_features)
        train = split_site(data, protocol=settings.protocol, seed=settings.split_seed(0),
                           test_fraction=settings.test_fraction).train
        parts.append((data.features.iloc[train], data.label[train]))
    rows = pd.concat([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts]).astype(float)
    bound = NO_POLICY.input_bound
    x = np.clip(seen["prep"].transform(rows[shared]), -bound, bound)
    offset = x @ theta_source[:-1] + theta_source[-1]
    # The group's preprocessing from its merged sums is the one fitted on its pooled rows.
    pooled_prep = TabularPreprocessor(features=list(defs)).fit(rows[["glucose"]])
    np.testing.assert_allclose(ext.preprocessor(defs).mean_, pooled_prep.mean_, rtol=1e-9)
    np.testing.assert_allclose(ext.preprocessor(defs).scale_, pooled_prep.scale_, rtol=1e-9)
    z = inputs(x, rows, pooled_prep, bound)

    def objective(theta: np.ndarray) -> float:
        return _mean_loss(z, y, offset, theta) + 0.5 * settings.weight_decay * float(
            theta[:-1] @ theta[:-1])

    pooled = minimize(objective, np.zeros(z.shape[1] + 1), method="BFGS",
                      options={"gtol": 1e-10, "maxiter": 10_000}).x
    federated = _mean_loss(z, y, offset, ext.theta)
    assert abs(federated - _mean_loss(z, y, offset, pooled)) < 1e-4
    assert federated < _mean_loss(z, y, offset, np.zeros_like(ext.theta)) - 0.01  # it learned


def test_no_groups_when_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """min-group-sites = 0: no group phase, no group candidate anywhere."""
    report, seen, _, _ = _run(tmp_path, monkeypatch, min_group_sites=0, num_server_rounds=5)
    assert seen["extensions"] == [] and report["groups"] == {}
    choices = [c for s in report["sites"].values() for c in s["model"].get("choices", {})]
    assert choices and not any(c.startswith("group") for c in choices)
    # Under either DP mode no group trains (its noisy rounds are worth nothing).
    assert not RunSettings(dp="record").groups and not RunSettings(dp="client").groups
    assert RunSettings().groups and not RunSettings(min_group_sites=0).groups


def test_a_site_naming_a_feature_without_its_sums_is_left_out_of_the_group(
        tmp_path: Path) -> None:
    """Glucose at a, c, e, h; h's stats reply lacks glucose's sums: the group is a, c, e.

    h still takes part, with the other candidates.
    """
    from flwr.app import Context, Message, MetricRecord

    from shared import protocol

    manifest = generate(tmp_path / "data", n_sites=8, seed=11)
    contexts = manifest_contexts(read_manifest(manifest), tmp_path, {})
    grid = InProcessGrid(contexts, client_app)
    node_h = next(n for n, c in contexts.items() if c.node_config["site-name"] == "hospital-h")

    def no_glucose_sums(msg: Message, ctx: Context) -> Message:
        reply = client_app(msg, ctx)
        if msg.metadata.message_type == protocol.STATS and reply.has_content():
            metrics = reply.content.metric_records[protocol.METRICS]
            reply.content.metric_records[protocol.METRICS] = MetricRecord(
                {k: v for k, v in metrics.items() if not k.startswith("glucose.")})
        return reply

    grid.handlers[node_h] = no_glucose_sums
    settings = RunSettings(num_server_rounds=5, min_sites=2, node_wait_timeout=1.0)
    report = run_federation(grid, settings, Progress(tmp_path / "out"), {})
    group = report["groups"]["glucose"]
    assert group["members"] == ["hospital-a", "hospital-c", "hospital-e"]
    assert report["sites"]["hospital-h"]["status"] == "ok"
