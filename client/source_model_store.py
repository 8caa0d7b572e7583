"""The site's copies of the source models it adapted to: what ``fedadapt predict`` scores with.

Every run (every repeat) whose adapt phase completes leaves one file,
``corrections/model-<digest16>.json``, beside the sealed correction fitted on it,
``corrections/correction-<digest16>.enc``. The file holds the whole model as the site uses it:
weights, the federated preprocessing (means, scales, indicators), the schema's name and digest,
the model's kind and size, the site, and the run id. Its ``digest`` is the SHA-256 of all of
that (:func:`model_digest`), and the correction is sealed bound to the same digest. An edited
file is therefore refused twice: its content no longer matches its digest, and a recomputed
digest no longer matches the sealed correction's. The source model is shared by all sites and
is not secret, so it is stored in clear; a later run adds files and never replaces an earlier
run's model without a trace.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from shared.arrays import arrays_from_json, arrays_to_json, json_digest
from shared.errors import FedadaptError
from shared.files import ensure_private_dir, write_atomically

log = logging.getLogger(__name__)

KIND = "fedadapt-source-model"
FORMAT = "2"
FOLDER = "corrections"  # beside the corrections fitted on each model
PREFIX = "model-"
# Written by the fedadapt versions before models were kept per run (weights-only digest).
LEGACY_FILE = "source-model.json"
# Keys of the document that are not part of the model itself.
_UNBOUND = ("digest", "saved")


class ModelStoreError(FedadaptError, ValueError):
    """The site has no usable source model; the message says what to do."""


@dataclass(frozen=True)
class StoredModel:
    """One source model kept at a site.

    Attributes
    ----------
    path : Path
        Its file.
    document : dict
        Everything in the file (see :func:`model_document`), with ``digest`` and ``saved``.
    arrays : ArrayRecord
        The weights.
    """

    path: Path
    document: dict[str, Any]
    arrays: ArrayRecord

    @property
    def digest(self) -> str:
        """SHA-256 of the whole model (what its correction is bound to)."""
        return str(self.document["digest"])

    @property
    def run_id(self) -> int:
        """The Flower run that trained it."""
        return int(self.document["run-id"])

    def describe(self) -> str:
        """One line for people: run, repeat, when it was saved, digest."""
        d = self.document
        return (f"run {d['run-id']} (repeat {int(d.get('repeat', 0)) + 1}), saved {d['saved']}, "
                f"model {self.digest[:16]}")


def model_document(arrays: ArrayRecord, settings: dict[str, Any]) -> dict[str, Any]:
    """The model as a site keeps it: weights plus everything needed to use them.

    Parameters
    ----------
    arrays : ArrayRecord
        The source model's weights.
    settings : dict
        ``run-id``, ``repeat``, ``site-name``, ``site-features``, ``schema``,
        ``schema-digest``, ``model``, ``hidden-units`` and ``preprocessing`` (the fitted state).

    Returns
    -------
    dict
        JSON-able; :func:`model_digest` of it names the model.
    """
    return {"kind": KIND, "format": FORMAT, **settings, "arrays": arrays_to_json(arrays)}


def model_digest(document: dict[str, Any]) -> str:
    """SHA-256 of a model document, its digest and save time excluded."""
    return json_digest({k: v for k, v in document.items() if k not in _UNBOUND})


def model_path(site_dir: str | Path, digest: str) -> Path:
    """Where the model with ``digest`` is kept."""
    return Path(site_dir) / FOLDER / f"{PREFIX}{digest[:16]}.json"


def save_source_model(site_dir: str | Path, document: dict[str, Any]) -> Path:
    """Keep a source model (one file per model; an existing file of it is replaced).

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder.
    document : dict
        :func:`model_document` of the model.

    Returns
    -------
    Path
        The file written.
    """
    digest = model_digest(document)
    state = {**document, "digest": digest,
             "saved": datetime.now(UTC).isoformat(timespec="seconds")}
    path = model_path(site_dir, digest)
    ensure_private_dir(path.parent)
    write_atomically(path, json.dumps(state, indent=1).encode("utf-8"), mode=0o600)
    log.info("kept source model %s of run %s at %s", digest[:16], document.get("run-id"), path)
    return path


def list_models(site_dir: str | Path) -> list[Path]:
    """The model files a site keeps, newest first (by modification time)."""
    folder = Path(site_dir) / FOLDER
    files = list(folder.glob(f"{PREFIX}*.json")) if folder.is_dir() else []
    return sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def load_source_model(site_dir: str | Path, run: str | None = None) -> StoredModel:
    """Load a source model the site kept and check that nothing in it was changed.

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder.
    run : str, optional
        A run id, or the start of a model digest; by default the newest model.

    Returns
    -------
    StoredModel
        The model, its file and its weights.

    Raises
    ------
    ModelStoreError
        If the folder has no model (or none of that run), a file is damaged, or its content
        does not match its digest (it was edited).
    """
    site_dir = Path(site_dir)
    if site_dir.exists() and not site_dir.is_dir():
        raise ModelStoreError(f"{site_dir} is a file, not a site folder: pass the folder named "
                              "site-dir in the SuperNode's --node-config")
    files = list_models(site_dir)
    if not files:
        legacy = site_dir / LEGACY_FILE
        hint = (f" ({legacy} was written by an older fedadapt and is not used: its digest "
                "covers only the weights)" if legacy.exists() else "")
        raise ModelStoreError(
            f"{site_dir} holds no source model: this site has not taken part in a completed "
            f"run yet (the adapt phase writes one){hint}"
        )
    models = [_read(p) for p in files] if run is not None else [_read(files[0])]
    if run is not None:
        models = [m for m in models if str(m.run_id) == run or m.digest.startswith(run)]
        if not models:
            raise ModelStoreError(
                f"no source model of run {run!r} in {site_dir / FOLDER}; the site keeps "
                + ", ".join(f"run {_read(p).run_id}" for p in files)
            )
    return models[0]


def _read(path: Path) -> StoredModel:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("kind") != KIND:
            raise ValueError("not a fedadapt source model")
        arrays = arrays_from_json(state["arrays"])
        int(state["run-id"])
        str(state["saved"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelStoreError(f"{path} is damaged ({type(err).__name__}); run the federation "
                              "again to replace it") from None
    if model_digest(state) != state.get("digest"):
        raise ModelStoreError(
            f"{path}: its content does not match its digest: the file was modified (weights, "
            "preprocessing or settings); do not use it, run the federation again"
        )
    return StoredModel(path, state, arrays)
