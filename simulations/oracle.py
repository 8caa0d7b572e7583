"""The best achievable, on the same held-out rows (generated data only): the true model's AUC.

The generator knows each patient's true risk given what the site records. On every split, the
AUC of that risk on the site's held-out rows is what no method could beat on those patients:
the yardstick "how close does each method get" is measured against (the report's ``oracle``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from client.data import read_site_data
from client.site import Manifest
from client.split import split_site
from shared.metrics import binary_metrics, sigmoid
from shared.schema import load_schema
from shared.settings import RunSettings
from simulations.generator import TRUTH_NAME, true_scores

log = logging.getLogger(__name__)


def oracle_reference(
    manifest: Manifest, settings: RunSettings, usable: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Held-out metrics of the true risk at every usable site, one entry per repeat.

    Returns
    -------
    dict
        Per site name, a list (one per repeat) of metric dicts ``oracle.auc``, ...; empty when
        the manifest's folder holds no generator truth (real data).
    """
    truth_path = manifest.path.parent / TRUTH_NAME
    if not truth_path.is_file():
        return {}
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    scores = true_scores(int(truth["n_sites"]), int(truth["seed"]), bool(truth.get("hba1c")))
    schema = load_schema(settings.schema)
    out: dict[str, list[dict[str, Any]]] = {}
    for site in manifest.sites:
        if site.name not in usable or site.name not in scores:
            continue
        data = read_site_data(site.data_file, schema, site.site_features)
        score = scores[site.name][data.line_numbers - 2]  # line 1 is the header
        out[site.name] = []
        for repeat in range(settings.repeats):
            split = split_site(data, protocol=settings.protocol,
                               seed=settings.split_seed(repeat),
                               test_fraction=settings.test_fraction)
            metrics = binary_metrics(data.label[split.test], sigmoid(score[split.test]))
            out[site.name].append({f"oracle.{k}": v for k, v in metrics.items()})
    return out
