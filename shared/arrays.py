"""The source model's weights as plain data: their JSON form and the digests that name them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord


def arrays_to_json(arrays: ArrayRecord) -> dict[str, Any]:
    """Weights as JSON-able data (exact: float64 values round-trip through ``repr``).

    Parameters
    ----------
    arrays : ArrayRecord
        The weights.

    Returns
    -------
    dict
        Per array name: ``shape``, ``dtype`` and the flattened ``values``.
    """
    return {k: {"shape": list(arrays[k].shape), "dtype": str(arrays[k].numpy().dtype),
                "values": arrays[k].numpy().ravel().tolist()} for k in arrays}


def arrays_from_json(state: dict[str, Any]) -> ArrayRecord:
    """Inverse of :func:`arrays_to_json`.

    Raises
    ------
    KeyError, TypeError, ValueError
        If ``state`` is not in the form :func:`arrays_to_json` writes.
    """
    return ArrayRecord({k: Array(np.asarray(v["values"], dtype=v["dtype"]).reshape(v["shape"]))
                        for k, v in state.items()})


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the weights.

    Parameters
    ----------
    arrays : ArrayRecord
        The weights.

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    h = hashlib.sha256()
    for name in sorted(arrays.keys()):
        arr = np.ascontiguousarray(arrays[name].numpy())
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def json_digest(document: Any) -> str:
    """SHA-256 of a JSON-able document in canonical form (sorted keys, no spaces).

    Parameters
    ----------
    document : Any
        Plain JSON values (no NaN).

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    blob = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
