"""The site's copy of the final source model: what ``fedadapt predict`` scores new patients with.

The source model is shared by all sites and is not secret, so it is stored in clear (JSON); its
SHA-256 is recorded beside it and checked on load. The site's private correction is bound to
the same digest, so a modified source model file is refused twice: here, and by the sealed
correction.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from shared.files import write_atomically

log = logging.getLogger(__name__)

FILE_NAME = "source-model.json"
FORMAT = "1"


class ModelStoreError(ValueError):
    """The site has no usable source model; the message says what to do."""


def source_model_path(site_dir: str | Path) -> Path:
    """Where a site keeps its copy of the final source model."""
    return Path(site_dir) / FILE_NAME


def save_source_model(
    site_dir: str | Path, *, digest: str, arrays: ArrayRecord, settings: dict[str, Any]
) -> Path:
    """Keep the source model a site's correction was fitted on (replacing an older one).

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder.
    digest : str
        ``shared.source_model.arrays_digest(arrays)``.
    arrays : ArrayRecord
        The source model's weights.
    settings : dict
        What rebuilds it: ``schema``, ``schema-digest``, ``model``, ``hidden-units``,
        ``preprocessing`` (the fitted state), ``site-name``, ``site-features``.
    """
    state = {
        "format": FORMAT,
        "digest": digest,
        "saved": datetime.now(UTC).isoformat(timespec="seconds"),
        **settings,
        "arrays": {
            k: {"shape": list(arrays[k].shape), "dtype": str(arrays[k].numpy().dtype),
                "values": arrays[k].numpy().ravel().tolist()}
            for k in arrays
        },
    }
    path = source_model_path(site_dir)
    write_atomically(path, json.dumps(state, indent=1).encode("utf-8"), mode=0o600)
    log.info("kept source model %s at %s", digest[:16], path)
    return path


def load_source_model(site_dir: str | Path) -> tuple[dict[str, Any], ArrayRecord]:
    """Load the site's source model; check its digest.

    Raises
    ------
    ModelStoreError
        If the file is missing, unreadable, or its weights do not match its digest.
    """
    from shared.source_model import arrays_digest

    path = source_model_path(site_dir)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        arrays = ArrayRecord({
            k: Array(np.asarray(v["values"], dtype=v["dtype"]).reshape(v["shape"]))
            for k, v in state["arrays"].items()
        })
    except FileNotFoundError:
        raise ModelStoreError(
            f"{path} not found: this site has not taken part in a completed run yet (the "
            "adapt phase writes it)"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise ModelStoreError(f"{path} is damaged ({type(err).__name__}); run the federation "
                              "again to replace it") from None
    if arrays_digest(arrays) != state.get("digest"):
        raise ModelStoreError(
            f"{path}: the weights do not match the recorded digest (the file was modified); "
            "run the federation again to replace it"
        )
    return state, arrays
