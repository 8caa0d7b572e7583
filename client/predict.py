"""``fedadapt predict``: score new patients at a site with the source model and its correction."""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.correction_store import load_correction
from client.data import SiteData, read_site_data
from client.source_model_store import load_source_model
from shared.correction import Correction, adapted_logit
from shared.errors import FedadaptError
from shared.files import write_atomically
from shared.metrics import sigmoid
from shared.preprocessing import TabularPreprocessor
from shared.schema import load_schema

log = logging.getLogger(__name__)

COLUMNS = ("line", "risk", "source_risk", "adapted_risk", "correction_applied", "note")


class PredictError(FedadaptError, ValueError):
    """Scoring cannot start (input or output paths); the message says what to do."""


@dataclass
class PredictSummary:
    """What a scoring run did (counts and names only, never a patient value).

    Attributes
    ----------
    rows : int
        Rows scored.
    output : Path
        The file written.
    correction_applied : bool
        Whether the site's correction is an applied one (see ``corrected_rows``).
    corrected_rows : int
        Rows whose ``risk`` includes the correction.
    fallback_rows : dict
        Per reason (``"glucose absent"``), rows scored with the source model instead.
    model : str
        Which run's model scored them (run, repeat, when saved, digest).
    source_model : str
        The model's digest.
    warnings : list of str
        Problems of the input that did not stop scoring (out-of-range values, counted).
    """

    rows: int
    output: Path
    correction_applied: bool
    corrected_rows: int
    model: str
    source_model: str
    fallback_rows: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def predict_file(
    site_dir: str | Path, input_file: str | Path, output: str | Path, run: str | None = None,
    overwrite: bool = False,
) -> PredictSummary:
    """Score every row of ``input_file`` and write one risk per row to ``output`` (CSV).

    The input is validated against the schema exactly like training data (the label column may
    be absent). Each output row has the input's line number, ``risk`` (the one to use),
    ``source_risk``, ``adapted_risk``, whether the correction is in ``risk``, and a ``note``
    naming the site features the correction uses that the row lacks. Such a row is scored
    with the source model (its ``risk`` is ``source_risk``), unless the correction was fitted
    on rows where that feature was missing too (then it knows what "not measured" means
    there, and is applied).

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder (``site-dir``).
    input_file : str or Path
        New patients, in the schema's format.
    output : str or Path
        Where to write the risks (mode 0600: patient-level results).
    run : str, optional
        The run (id, or start of a model digest) whose model to use; the newest by default.
    overwrite : bool
        Replace an existing output file (never the input, never a file of the site folder).

    Returns
    -------
    PredictSummary
        Counts, the model used and the input's warnings.

    Raises
    ------
    PredictError
        If the output path is the input, a folder, under a file, inside the site folder, or
        an existing file (without ``overwrite``).
    ModelStoreError
        If the site has no usable source model.
    CorrectionRefused
        If the site's correction is missing, tampered with, sealed with another key, another
        site's, or fitted on another source model: nothing is scored then.
    DataError
        If the input does not fit the schema (file, line and column named).
    """
    from shared.source_model import build_model, load_arrays, predict_logit

    out = _check_output(Path(input_file), Path(output), Path(site_dir), overwrite)
    stored = load_source_model(site_dir, run)
    state = stored.document
    schema = load_schema(state["schema"])
    if schema.digest() != state["schema-digest"]:
        raise PredictError(
            f"schema {state['schema']!r} changed since the source model was trained; run the "
            "federation again"
        )
    correction = Correction.from_dict(
        load_correction(site_dir, state["site-name"], stored.digest)
    )
    site_features = list(state["site-features"])
    data = read_site_data(input_file, schema, site_features, labelled=False)
    shared = list(schema.shared_features)
    prep = TabularPreprocessor.from_dict(state["preprocessing"], shared)
    # Clipped as the site clipped every input when it fitted the correction on this model.
    bound = float(state.get("input-bound", np.inf))
    x = np.clip(prep.transform(data.features[list(data.shared_columns)]), -bound, bound)
    model = build_model(state["model"], x.shape[1], int(state["hidden-units"]))
    load_arrays(model, stored.arrays)
    source = predict_logit(model, x)
    own = data.features[list(data.site_columns)]
    alpha = correction.alpha(x, own, list(schema.resolve_site_features(site_features)), source)
    notes, fallback = _fallback_notes(correction, data)
    use = np.array([correction.applied and not falls for falls in fallback])
    p_source, p_adapted = sigmoid(source), sigmoid(adapted_logit(source, alpha))
    risk = np.where(use, p_adapted, p_source)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for line, r, ps, pa, used, note in zip(data.line_numbers, risk, p_source, p_adapted, use,
                                           notes, strict=True):
        writer.writerow([int(line), f"{r:.6f}", f"{ps:.6f}", f"{pa:.6f}", int(used), note])
    write_atomically(out, buffer.getvalue().encode("utf-8"), mode=0o600)
    fallbacks: dict[str, int] = {}
    for note, falls in zip(notes, fallback, strict=True):
        if falls and correction.applied:
            fallbacks[note] = fallbacks.get(note, 0) + 1
    log.info("scored %d rows into %s", data.n_rows, out)
    return PredictSummary(
        rows=data.n_rows, output=out, correction_applied=correction.applied,
        corrected_rows=int(use.sum()), model=stored.describe(), source_model=stored.digest,
        fallback_rows=fallbacks, warnings=list(data.warnings),
    )


def _check_output(input_file: Path, output: Path, site_dir: Path, overwrite: bool) -> Path:
    """Refuse an output that would destroy something: the input, the site's files, a file."""
    if output.is_dir():
        raise PredictError(f"--output {output} is a folder: name a file in it, e.g. "
                           f"{output / 'risks.csv'}")
    same = output.resolve() == input_file.resolve() or (
        input_file.exists() and output.exists() and output.samefile(input_file))
    if same:
        raise PredictError(f"--output {output} is the input file: the patients' file is never "
                           "overwritten; name another file")
    if site_dir.is_dir() and output.resolve().is_relative_to(site_dir.resolve()):
        raise PredictError(f"--output {output} is inside the site folder {site_dir}, which "
                           "holds the site's key, corrections and models: write elsewhere")
    if output.exists() and not overwrite:
        raise PredictError(f"--output {output} exists: name a new file, or pass --overwrite "
                           "to replace it")
    for parent in output.resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise PredictError(f"--output {output}: {parent} is a file, not a folder; "
                                   "name a file in a folder")
            break
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def _fallback_notes(correction: Correction, data: SiteData) -> tuple[list[str], list[bool]]:
    """Per row, a note on the site features the correction uses, and whether to fall back.

    A row lacking such a feature is scored with the source model alone ("glucose absent",
    "glucose missing"), unless the correction was fitted on rows where that feature was
    missing too: then it knows what "not measured" means there and is applied, and the note
    says so ("glucose missing, as in training").
    """
    notes: list[list[str]] = [[] for _ in range(data.n_rows)]
    fallback = [False] * data.n_rows
    learned = set((correction.site_preprocessing or {}).get("indicator_features", []))
    if correction.extension is not None:  # a group extension's inputs know "missing" too
        extension = set(correction.extension["preprocessing"].get("indicator_features", []))
        learned = (learned & extension) if correction.site_preprocessing else extension
    for name in _needed_site_features(correction):
        if name not in data.summary or not data.summary[name].present:
            rows: list[int] = list(range(data.n_rows))
            note, falls = f"{name} absent", True
        else:
            values = data.features[name].to_numpy(dtype=float)
            rows = [int(i) for i in np.flatnonzero(np.isnan(values))]
            note, falls = ((f"{name} missing, as in training", False) if name in learned
                           else (f"{name} missing", True))
        for i in rows:
            notes[i].append(note)
            fallback[i] = fallback[i] or falls
    return ["; ".join(n) for n in notes], fallback


def _needed_site_features(correction: Correction) -> list[str]:
    """Site features an applied model's weights depend on.

    Its group extension's, and its correction's (none for an intercept only).
    """
    if not correction.applied:
        return []
    needed = list(correction.extension["features"]) if correction.extension else []
    strength = correction.strength
    if (correction.site_preprocessing and strength is not None and math.isfinite(strength)
            and strength > 0):  # an intercept-only recalibration uses no feature
        needed += [f for f in correction.site_features if f not in needed]
    return needed
