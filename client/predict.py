"""``fedadapt predict``: score new patients at a site with the source model and its correction."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from client.data import read_site_data
from client.model_store import load_source_model
from client.store import load_correction
from shared.files import write_atomically
from shared.schema import load_schema

log = logging.getLogger(__name__)

COLUMNS = ("line", "risk", "source_risk", "adapted_risk", "correction_applied")


@dataclass
class PredictSummary:
    """What a scoring run did (counts only)."""

    rows: int
    output: Path
    correction_applied: bool
    source_model: str


def predict_file(
    site_dir: str | Path, input_file: str | Path, output: str | Path
) -> PredictSummary:
    """Score every row of ``input_file`` and write one risk per row to ``output`` (CSV).

    The input is validated against the schema exactly like training data (the label column may
    be absent). Each output row has the input's line number, ``risk`` (the adapted model's,
    the one to use), ``source_risk``, ``adapted_risk`` and whether a correction was applied.

    Raises
    ------
    ModelStoreError
        If the site has no usable source model.
    CorrectionRefused
        If the site's correction is missing, tampered with, sealed with another key, another
        site's, or fitted on another source model: nothing is scored then.
    DataError
        If the input does not fit the schema (file, line and column named).
    """
    from shared.correction import Correction, adapted_logit
    from shared.metrics import sigmoid
    from shared.preprocessing import TabularPreprocessor
    from shared.source_model import build_model, load_arrays, predict_logit

    site_dir = Path(site_dir)
    state, arrays = load_source_model(site_dir)
    schema = load_schema(state["schema"])
    if schema.digest() != state["schema-digest"]:
        raise ValueError(
            f"schema {state['schema']!r} changed since the source model was trained; run the "
            "federation again"
        )
    correction = Correction.from_dict(
        load_correction(site_dir, state["site-name"], state["digest"])
    )
    site_features = list(state["site-features"])
    data = read_site_data(input_file, schema, site_features, labelled=False)
    shared = list(schema.shared_features)
    prep = TabularPreprocessor.from_dict(state["preprocessing"], shared)
    x = prep.transform(data.features[list(data.shared_columns)])
    model = build_model(state["model"], x.shape[1], int(state["hidden-units"]))
    load_arrays(model, arrays)
    source = predict_logit(model, x)
    own = data.features[list(data.site_columns)]
    alpha = correction.alpha(x, own, list(schema.resolve_site_features(site_features)))
    p_source, p_adapted = sigmoid(source), sigmoid(adapted_logit(source, alpha))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for line, ps, pa in zip(data.line_numbers, p_source, p_adapted, strict=True):
        writer.writerow([int(line), f"{pa:.6f}", f"{ps:.6f}", f"{pa:.6f}",
                         int(correction.applied)])
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, buffer.getvalue().encode("utf-8"), mode=0o600)
    log.info("scored %d rows into %s", data.n_rows, out)
    return PredictSummary(rows=data.n_rows, output=out, correction_applied=correction.applied,
                          source_model=state["digest"])
