"""Rounds until the federated source model is as good as the pooled one, per training strategy.

The federation runs in this process (``simulations.inprocess``: the real ServerApp logic and
the real ClientApp, without Flower's transport, whose cost is measured separately), so only
the number of rounds matters here. The model after round ``r`` is the one the sites are sent
in round ``r + 1`` (the run's final model after the last round); its log-loss on every site's
held-out rows, pooled, is compared with that of a central fit on the pooled training rows
(same preprocessing, same objective).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, Context, Message

from client.client_app import app as client_app
from client.data import read_site_data
from client.site import Manifest
from client.split import split_site
from server.federation import run_federation
from server.progress import Progress
from shared import protocol
from shared.groups import GROUP
from shared.metrics import sigmoid
from shared.preprocessing import TabularPreprocessor
from shared.schema import load_schema
from shared.settings import RunSettings
from shared.source_model import build_model, load_arrays, predict_logit
from simulations.inprocess import InProcessGrid, manifest_contexts
from simulations.pooled import fit_central

log = logging.getLogger(__name__)

WITHIN = 0.005  # "as good as pooled": held-out log-loss within this much (docs/benchmarks.md)
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox", "proximal_mu": 0.01},
    "newton": {"strategy": "newton"},
}


class _Recorder:
    """Wrap a node's ClientApp to keep the model each training round was sent, and the final.

    A group extension's rounds (``shared.groups``) are not the source model's: skipped.
    """

    def __init__(self) -> None:
        self.sent: dict[int, ArrayRecord] = {}
        self.final: ArrayRecord | None = None
        self.preprocessing: dict[str, Any] | None = None

    def __call__(self, msg: Message, ctx: Context) -> Message:
        config = msg.content.config_records.get(protocol.CONFIG)
        arrays = msg.content.array_records.get(protocol.ARRAYS)
        if config is not None and arrays is not None and "preprocessing" in config:
            self.preprocessing = json.loads(str(config["preprocessing"]))
            if msg.metadata.message_type == protocol.TRAIN and GROUP not in config:
                rnd = int(str(config["server-round"])) + int(str(config.get("round-offset", 0)))
                self.sent[rnd] = arrays
            elif msg.metadata.message_type == protocol.ADAPT:
                self.final = arrays
        return client_app(msg, ctx)

    def models(self, rounds: int) -> list[ArrayRecord]:
        """The model after each round 1..rounds (a converged run keeps its final model)."""
        assert self.final is not None, "the run ended before the adapt phase"
        return [self.sent.get(r + 1, self.final) for r in range(1, rounds + 1)]


def _held_out(manifest: Manifest, settings: RunSettings) -> tuple[
    pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray
]:
    """Pooled training and held-out rows (shared features) and labels, as the sites split."""
    schema = load_schema(settings.schema)
    names = [f.name for f in schema.shared_features]
    train_x, train_y, test_x, test_y = [], [], [], []
    for site in manifest.sites:
        data = read_site_data(site.data_file, schema, site.site_features)
        split = split_site(data, protocol=settings.protocol, seed=settings.split_seed(0),
                           test_fraction=settings.test_fraction)
        train_x.append(data.features[names].iloc[split.train])
        train_y.append(data.label[split.train])
        test_x.append(data.features[names].iloc[split.test])
        test_y.append(data.label[split.test])
    return (pd.concat(train_x), np.concatenate(train_y), pd.concat(test_x),
            np.concatenate(test_y))


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def rounds_to_pooled(
    manifest: Manifest, out: Path, settings: RunSettings, max_rounds: int = 30
) -> dict[str, Any]:
    """Per strategy: held-out log-loss after each round and the first round within 0.005.

    Parameters
    ----------
    manifest : Manifest
        The sites.
    out : Path
        Working folder (site folders, progress events).
    settings : RunSettings
        The run's other settings (schema, seed, model, weight decay, ...).
    max_rounds : int
        Rounds each strategy is given.

    Returns
    -------
    dict
        ``pooled_log_loss``, and per strategy ``rounds`` (int, or None when never within),
        ``log_loss`` (one per round) and ``converged_round``.
    """
    schema = load_schema(settings.schema)
    train_x, train_y, test_x, test_y = _held_out(manifest, settings)
    result: dict[str, Any] = {"within": WITHIN, "max_rounds": max_rounds, "strategies": {}}
    pooled: float | None = None
    for name, overrides in STRATEGIES.items():
        run = replace(settings, num_server_rounds=max_rounds, node_wait_timeout=5.0,
                      **overrides)
        contexts = manifest_contexts(manifest, out / name, run.to_run_config())
        recorder = _Recorder()
        grid = InProcessGrid(contexts, client_app, handlers={min(contexts): recorder})
        report = run_federation(grid, run, Progress(out / name), {"bench": name})
        assert recorder.preprocessing is not None
        prep = TabularPreprocessor.from_dict(recorder.preprocessing,
                                             list(schema.shared_features))
        xt = prep.transform(test_x)
        if pooled is None:
            central = fit_central(prep.transform(train_x), train_y, run, seed=run.seed)
            pooled = _log_loss(test_y, sigmoid(predict_logit(central, xt)))
        losses = []
        for arrays in recorder.models(max_rounds):
            model = build_model(run.model, xt.shape[1], run.hidden_units)
            load_arrays(model, arrays)
            losses.append(_log_loss(test_y, sigmoid(predict_logit(model, xt))))
        reached = next((r + 1 for r, v in enumerate(losses) if v <= pooled + WITHIN), None)
        result["strategies"][name] = {
            "rounds": reached, "log_loss": losses,
            "converged_round": report["converged_rounds"][0],
            "final_gap": losses[-1] - pooled,
        }
        log.info("%s: within %.3f of pooled after %s round(s)", name, WITHIN, reached)
    result["pooled_log_loss"] = pooled
    return result
