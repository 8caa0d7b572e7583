"""Tests of the weights' JSON form and digests."""

import math

import torch

from shared.arrays import arrays_digest, arrays_from_json, arrays_to_json, json_digest
from shared.source_model import build_model, to_arrays


def _param(model: torch.nn.Module, name: str) -> torch.Tensor:
    return dict(model.named_parameters())[name]


def test_arrays_digest_is_stable_and_sensitive() -> None:
    """The digest is the same for equal weights and changes when one weight changes."""
    a, b = build_model("mlp", 4, 5, seed=7), build_model("mlp", 4, 5, seed=7)
    digest = arrays_digest(to_arrays(a))
    assert len(digest) == 64
    assert arrays_digest(to_arrays(a)) == digest
    assert arrays_digest(to_arrays(b)) == digest
    with torch.no_grad():
        _param(b, "net.2.weight")[0, 3] += 1e-12
    assert arrays_digest(to_arrays(b)) != digest
    assert arrays_digest(to_arrays(build_model("mlp", 4, 5, seed=8))) != digest



def test_arrays_round_trip_through_json_exactly() -> None:
    """JSON form and back gives the same weights, bit for bit (same digest)."""
    arrays = to_arrays(build_model("mlp", 3, 4, seed=1))
    back = arrays_from_json(arrays_to_json(arrays))
    assert arrays_digest(back) == arrays_digest(arrays)


def test_json_digest_ignores_key_order_but_not_values() -> None:
    """The canonical form sorts keys; any changed value changes the digest."""
    assert json_digest({"a": 1, "b": [1.5]}) == json_digest({"b": [1.5], "a": 1})
    assert json_digest({"a": 1, "b": [1.5]}) != json_digest({"a": 1, "b": [1.5000001]})
    assert not math.isnan(len(json_digest({})))
