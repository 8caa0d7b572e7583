"""Newton training over in-process sites: the pooled optimum in a few rounds, loss never up."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MetricRecord

from client.client_app import app as client_app
from client.site import read_manifest
from server.federation import run_federation
from server.progress import Progress
from shared import protocol
from shared.settings import RunSettings
from simulations.generator import generate
from simulations.inprocess import InProcessGrid, manifest_contexts
from simulations.pooled import pooled_reference


def _grid(tmp_path: Path, n_sites: int = 4) -> tuple[InProcessGrid, Path]:
    manifest_path = generate(tmp_path / "data", n_sites=n_sites, seed=11)
    manifest = read_manifest(manifest_path)
    return InProcessGrid(manifest_contexts(manifest, tmp_path, {}), client_app), manifest_path


def _settings(**overrides: Any) -> RunSettings:
    values: dict[str, Any] = {"num_server_rounds": 20, "min_sites": 2, "node_wait_timeout": 1.0,
                              "strategy": "newton"}
    return RunSettings(**{**values, **overrides})


def _run(grid: InProcessGrid, out: Path, settings: RunSettings) -> dict[str, Any]:
    return run_federation(grid, settings, Progress(out), {})


def test_newton_reaches_the_pooled_model_and_stops(tmp_path: Path) -> None:
    """Converged in a few rounds; every site's source model scores as the central fit does."""
    grid, manifest = _grid(tmp_path)
    settings = _settings()
    report = _run(grid, tmp_path / "out", settings)
    (converged,) = report["converged_rounds"]
    assert converged is not None and converged <= 8
    assert [r["round"] for r in report["rounds"]] == list(range(1, converged + 1))
    accepted = [r["loss"] for r in report["rounds"] if r["step_accepted"]]
    assert all(b <= a for a, b in itertools.pairwise(accepted))
    pooled, skipped = pooled_reference(read_manifest(manifest), settings)
    assert not skipped
    for name, site in report["sites"].items():
        federated = site["metrics"]["source"]["log_loss"]
        assert abs(federated - pooled[name][0]["pooled.log_loss"]) < 1e-5, name


def test_auto_trains_the_logistic_model_with_newton() -> None:
    """The default strategy resolves to newton for logreg and to fedavg for the MLP."""
    assert RunSettings().training == "newton"
    assert RunSettings(model="mlp").training == "fedavg"
    assert RunSettings(strategy="fedprox").training == "fedprox"


def test_a_lost_site_leaves_newton_with_the_others(tmp_path: Path) -> None:
    """A site silent from round 2: it is reported lost; the rest converge, loss never up."""
    grid, _ = _grid(tmp_path)

    def silent(msg: Message, ctx: Context) -> Message:
        config = msg.content.config_records[protocol.CONFIG]
        if msg.metadata.message_type == protocol.TRAIN and int(str(config["server-round"])) >= 2:
            grid.offline.add(102)
            return None  # type: ignore[return-value]
        return client_app(msg, ctx)

    grid.handlers[102] = silent
    report = _run(grid, tmp_path / "out", _settings(reply_timeout=2.0))
    lost = report["sites"]["hospital-b"]["lost"]
    assert [entry["round"] for entry in lost] == [2]
    assert report["converged_rounds"][0] is not None
    # From round 2 on the same three sites answer, so their total loss is comparable.
    accepted = [r["loss"] for r in report["rounds"][1:] if r["step_accepted"]]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(accepted))


def test_a_step_that_raises_the_loss_is_refused_and_halved(tmp_path: Path) -> None:
    """A site reporting a higher loss in round 2: that point is rejected, half the step tried."""
    grid, _ = _grid(tmp_path)

    def inflating(msg: Message, ctx: Context) -> Message:
        reply = client_app(msg, ctx)
        config = msg.content.config_records[protocol.CONFIG]
        if msg.metadata.message_type == protocol.TRAIN and int(str(config["server-round"])) == 2:
            metrics = dict(reply.content.metric_records[protocol.METRICS])
            metrics["loss-sum"] = float(metrics["loss-sum"]) * 100  # type: ignore[arg-type]
            reply.content[protocol.METRICS] = MetricRecord(metrics)
        return reply

    grid.handlers[101] = inflating
    report = _run(grid, tmp_path / "out", _settings(num_server_rounds=4))
    rounds = report["rounds"]
    assert [r["step_accepted"] for r in rounds[:3]] == [True, False, True]
    assert abs(rounds[2]["step"] - rounds[0]["step"] / 2) > 0  # a new step from round 3's point
    assert rounds[2]["loss"] < rounds[0]["loss"]
