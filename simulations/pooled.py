"""The pooled reference: one central model on every site's training rows (simulation only).

It is what the sites could have had by pooling their records, which fedadapt exists to avoid:
the yardstick the federated source model is measured against. It uses the same rows, splits,
preprocessing (fitted on the pooled training rows) and objective as the federation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from client.data import DataError, SiteData, read_site_data
from client.site import Manifest
from client.split import split_site
from shared import newton
from shared.metrics import binary_metrics, sigmoid
from shared.preprocessing import TabularPreprocessor
from shared.schema import load_schema
from shared.settings import RunSettings
from shared.source_model import build_model, load_arrays, objective, predict_logit

log = logging.getLogger(__name__)


def fit_central(
    x: np.ndarray, y: np.ndarray, settings: RunSettings, seed: int
) -> torch.nn.Module:
    """Fit the source model centrally to convergence on the federation's objective.

    The logistic model by Newton's method (``shared.newton``, the same sums the federation's
    Newton training adds over sites, without torch.optim's slow first import), the MLP by
    L-BFGS.
    """
    model = build_model(settings.model, x.shape[1], settings.hidden_units, seed=seed)
    if settings.model == "logreg":
        theta = np.zeros(x.shape[1] + 1)
        for _ in range(100):
            step = newton.newton_direction(newton.site_sums(x, y, theta), theta,
                                           settings.weight_decay)
            theta = theta + step
            if np.max(np.abs(step)) < 1e-12:
                break
        return load_arrays(model, newton.to_arrays(theta))
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=1000, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(model, xt, yt, settings.weight_decay)
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def pooled_reference(
    manifest: Manifest, settings: RunSettings, usable: Sequence[str] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Held-out metrics of the central model at every usable site, one entry per repeat.

    Parameters
    ----------
    manifest : Manifest
        The simulated sites.
    settings : RunSettings
        The run's settings (splits, model, objective).
    usable : sequence of str, optional
        Sites that completed the federated run; the others (a file that is missing or
        malformed, a site that failed) are left out of the pooled rows too. All by default.

    Returns
    -------
    tuple
        Per site name, a list (one per repeat) of metric dicts with keys ``pooled.auc``, ...;
        and the names of the sites left out.
    """
    schema = load_schema(settings.schema)
    shared = list(schema.shared_features)
    names = [f.name for f in shared]
    sites: list[tuple[str, SiteData]] = []
    skipped: list[str] = []
    for s in manifest.sites:
        if usable is not None and s.name not in usable:
            skipped.append(s.name)
            continue
        try:
            data = read_site_data(s.data_file, schema, s.site_features)
            for repeat in range(settings.repeats):  # a split that fails leaves the site out
                split_site(data, protocol=settings.protocol, seed=settings.split_seed(repeat),
                           test_fraction=settings.test_fraction)
        except (DataError, ValueError) as err:
            log.warning("pooled reference: site %s left out (%s)", s.name, type(err).__name__)
            skipped.append(s.name)
            continue
        sites.append((s.name, data))
    out: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in sites}
    if not sites:
        return out, skipped
    for repeat in range(settings.repeats):
        seed = settings.split_seed(repeat)
        splits = {
            name: split_site(data, protocol=settings.protocol, seed=seed,
                             test_fraction=settings.test_fraction)
            for name, data in sites
        }
        train = pd.concat([data.features[names].iloc[splits[n].train] for n, data in sites])
        y = np.concatenate([data.label[splits[n].train] for n, data in sites])
        prep = TabularPreprocessor(features=shared).fit(train)
        model = fit_central(prep.transform(train), y, settings, seed=settings.seed + repeat)
        for name, data in sites:
            test = splits[name].test
            p = sigmoid(predict_logit(model, prep.transform(data.features[names].iloc[test])))
            metrics = binary_metrics(data.label[test], p)
            out[name].append({f"pooled.{k}": v for k, v in metrics.items()})
        log.info("pooled reference, repeat %d: %d training rows", repeat, len(y))
    return out, skipped
