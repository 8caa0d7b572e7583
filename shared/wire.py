"""A message's size as Flower sends it: one measure for the site's audit and the coordinator's."""

from __future__ import annotations

from typing import Any


def wire_bytes(obj: Any) -> int:
    """Bytes of a message as Flower serialises it for the wire: the object and its children.

    Parameters
    ----------
    obj : flwr.app.Message or any of Flower's inflatable objects
        A message (error replies too: their body holds the error), a RecordDict, a record.

    Returns
    -------
    int
        The length of ``obj.deflate()`` plus that of every child object, recursively.
    """
    children = getattr(obj, "children", None) or {}
    return len(obj.deflate()) + sum(wire_bytes(c) for c in children.values())
