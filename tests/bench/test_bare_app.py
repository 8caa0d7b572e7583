"""The bare Flower app (Flower's floor for the benchmark), run in this process: fast."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from bench.bare import BARE_APP_DIR, RESULT_FILE, bare_run_config
from bench.bare_app.bareapp import client_app, server_app
from simulations.inprocess import InProcessGrid


def _defaults() -> dict[str, Any]:
    project = tomllib.loads((BARE_APP_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(project["tool"]["flwr"]["app"]["config"])


def _run(tmp_path: Path, nodes: int, **overrides: Any) -> dict[str, Any]:
    config = {**_defaults(), "out": str(tmp_path), **overrides}
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                           run_config=config) for n in range(101, 101 + nodes)}
    grid = InProcessGrid(contexts, client_app.app)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=config))
    return dict(json.loads((tmp_path / RESULT_FILE).read_text(encoding="utf-8")))


def test_the_components_are_the_app_s_own_modules() -> None:
    project = tomllib.loads((BARE_APP_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "bareapp.server_app:app",
                          "clientapp": "bareapp.client_app:app"}


def test_the_run_config_sets_only_keys_the_app_declares() -> None:
    config = bare_run_config(10, 20, expected_nodes=3)
    assert set(config) <= set(_defaults())
    with pytest.raises(ValueError, match="positive"):
        bare_run_config(0, 20, expected_nodes=3)


def test_rows_are_the_node_s_own_and_reproducible() -> None:
    X, y = client_app.make_rows(7, 100, 20)
    assert X.shape == (100, 20) and y.shape == (100,)
    assert set(np.unique(y)) <= {0.0, 1.0}
    np.testing.assert_array_equal(client_app.make_rows(7, 100, 20)[0], X)
    assert not np.array_equal(client_app.make_rows(8, 100, 20)[0], X)


def test_gradient_steps_lower_the_loss_and_keep_the_shapes() -> None:
    X, y = client_app.make_rows(1, 100, 5)
    weight, bias = np.zeros((1, 5), dtype=np.float32), np.zeros(1, dtype=np.float32)
    w1, b1, first = client_app.gradient_steps(weight, bias, X, y, steps=1, lr=0.5)
    assert first == pytest.approx(math.log(2))  # zero weights: every probability is 1/2
    w, b, later = client_app.gradient_steps(w1, b1, X, y, steps=5, lr=0.5)
    assert later < first
    assert w.shape == (1, 5) and b.shape == (1,) and w.dtype == np.float32


@pytest.mark.usefixtures("task_identity")
def test_fedavg_trains_every_node_each_round_and_writes_the_result(tmp_path: Path) -> None:
    result = _run(tmp_path, nodes=3, **{"num-server-rounds": 3, "expected-nodes": 3,
                                        "n-inputs": 4, "rows": 50})
    assert result["finished"] and result["nodes"] == 3
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["replies"] == 3 and r["errors"] == 0 and r["seconds"] >= 0 for r in rounds)
    losses = [r["train_loss"] for r in rounds]
    assert losses[0] < math.log(2) and losses[-1] < losses[0]
    assert result["train_seconds"] <= result["serverapp_seconds"]


@pytest.mark.usefixtures("task_identity")
def test_the_polling_grid_gives_the_same_replies(tmp_path: Path) -> None:
    plain = _run(tmp_path / "plain", nodes=2, **{"num-server-rounds": 2})
    polled = _run(tmp_path / "polled", nodes=2, **{"num-server-rounds": 2,
                                                   "poll-interval": 0.05})
    assert polled["poll_interval"] == 0.05
    assert [r["train_loss"] for r in polled["rounds"]] == pytest.approx(
        [r["train_loss"] for r in plain["rounds"]])


@pytest.mark.usefixtures("task_identity")
def test_too_few_nodes_stop_the_serverapp_in_bounded_time(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="only 2 of 3 nodes"):
        _run(tmp_path, nodes=2, **{"expected-nodes": 3, "node-wait-timeout": 0.5})
