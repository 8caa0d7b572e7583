"""Secure aggregation's stages between sites and coordinator, in one process."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from client import secagg as site
from server.secagg import SecAggAborted, secure_sum
from shared import secagg

CLIP = 1e4


class Federation:
    """Sites answering the stages by direct calls; ``lose`` drops a site from a stage on."""

    def __init__(self, vectors: dict[int, np.ndarray], lose: Mapping[str, set[int]] | None
                 = None) -> None:
        self.vectors = vectors
        self.states = {n: site.SiteState(n) for n in vectors}
        self.lose = {k: set(v) for k, v in (lose or {}).items()}
        self.gone: set[int] = set()
        self.seen: list[tuple[str, int, Any]] = []  # every reply the coordinator received

    def __call__(self, stage: str, requests: Mapping[int, Any]) -> dict[int, Any]:
        """Each site still in the round answers ``stage``; the replies are recorded."""
        self.gone |= self.lose.get(stage, set())
        out: dict[int, Any] = {}
        for node, request in requests.items():
            if node in self.gone:
                continue
            state = self.states[node]
            if stage == "keys":
                out[node] = site.keys(state)
            elif stage == "share":
                out[node] = site.share(state, *request)
            elif stage == "masked":
                out[node] = site.masked(state, request, self.vectors[node], CLIP)
            else:
                out[node] = site.unmask(state, *request)
            self.seen.append((stage, node, out[node]))
        return out


def _vectors(n: int, size: int = 50, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {100 + i: rng.normal(0.0, 100.0, size) for i in range(n)}


def test_the_total_is_the_plain_sum_and_no_reply_reveals_a_site() -> None:
    """Five sites, one a canary: the total within the stated error, the canary hidden.

    The canary's masked vector says nothing of its values, and its quantised values are in
    no reply.
    """
    vectors = _vectors(5)
    canary = 102
    vectors[canary] = np.arange(50, dtype=np.float64) * 7.0  # a sum known to the test
    fed = Federation(vectors)
    result = secure_sum(fed, sorted(vectors), threshold=0.67, clip=CLIP)
    exact = sum(vectors.values())
    assert np.max(np.abs(result.total - exact)) <= result.error_bound
    assert result.error_bound < 1e-7 and result.survivors == tuple(sorted(vectors))
    masked = next(r for stage, n, r in fed.seen if stage == "masked" and n == canary)
    alone = secagg.dequantize_sum(masked, CLIP)
    assert abs(np.corrcoef(alone, vectors[canary])[0, 1]) < 0.5  # uniform noise, not the sum
    planted = secagg.quantize(vectors[canary], CLIP).tobytes()
    for _, _, reply in fed.seen:
        assert planted not in repr(reply).encode() and planted not in _bytes(reply)


def test_a_site_lost_after_sharing_its_keys_leaves_the_others_exact_sum() -> None:
    """Lost before sending its masked vector: its masks are removed from its shares."""
    vectors = _vectors(6, seed=1)
    fed = Federation(vectors, lose={"masked": {104}})
    result = secure_sum(fed, sorted(vectors), threshold=0.67, clip=CLIP)
    exact = sum(v for n, v in vectors.items() if n != 104)
    assert result.lost == (104,) and 104 not in result.survivors
    assert np.max(np.abs(result.total - exact)) <= result.error_bound


def test_too_few_survivors_abort_with_no_sum() -> None:
    """Below the threshold at any stage: an abort, never a partial sum."""
    vectors = _vectors(4, seed=2)
    with pytest.raises(SecAggAborted, match="masked stage"):
        secure_sum(Federation(vectors, lose={"masked": {100, 101}}), sorted(vectors),
                   threshold=0.67, clip=CLIP)
    with pytest.raises(SecAggAborted, match="unmask stage"):
        secure_sum(Federation(vectors, lose={"unmask": {100, 101}}), sorted(vectors),
                   threshold=0.67, clip=CLIP)


def test_a_site_refuses_what_would_reveal_or_distort_its_vector() -> None:
    """Values beyond the range, a site named both alive and lost, unmasking asked twice."""
    vectors = _vectors(3, seed=3)
    fed = Federation(vectors)
    publics = {n: site.keys(fed.states[n]) for n in vectors}
    boxes = {n: site.share(fed.states[n], publics, 2) for n in vectors}
    state = fed.states[100]
    incoming = {src: b[100] for src, b in boxes.items() if src != 100}
    with pytest.raises(site.SecAggRefused, match="quantisation range"):
        site.masked(state, incoming, np.full(50, 2 * CLIP), CLIP)
    site.masked(state, incoming, vectors[100], CLIP)
    with pytest.raises(site.SecAggRefused, match="both"):
        site.unmask(state, [100, 101], [101])
    site.unmask(state, [100, 101, 102], [])
    with pytest.raises(site.SecAggRefused, match="asked already"):
        site.unmask(state, [100, 101, 102], [])


def test_a_sites_state_survives_its_record_between_messages() -> None:
    """The state goes through Flower's ConfigRecord (context.state) and comes back whole."""
    from flwr.app import ConfigRecord

    vectors = _vectors(3, seed=4)
    fed = Federation(vectors)
    publics = {n: site.keys(fed.states[n]) for n in vectors}
    for n in vectors:
        site.share(fed.states[n], publics, 2)
    state = fed.states[101]
    again = site.from_record(ConfigRecord(site.to_record(state)))
    assert again == state


def test_secaggplus_neighbourhoods_with_losses_still_sum_exactly() -> None:
    """30 sites, 8 neighbours each (SecAgg+), two lost after sharing: the others' sum."""
    from server.secagg import neighbourhoods

    vectors = _vectors(30, size=20, seed=5)
    near = neighbourhoods(sorted(vectors), 8)
    assert all(len(v) == 8 for v in near.values())
    assert all(a in near[b] for a in near for b in near[a])  # symmetric
    fed = Federation(vectors, lose={"masked": {105, 117}})
    result = secure_sum(fed, sorted(vectors), threshold=0.67, clip=CLIP, neighbours=8)
    exact = sum(v for n, v in vectors.items() if n not in (105, 117))
    assert result.lost == (105, 117)
    assert np.max(np.abs(result.total - exact)) <= result.error_bound
    # Each site held shares of its neighbours only.
    assert all(set(s.seed_shares) <= {n, *near[n]} for n, s in fed.states.items())


def test_masks_use_the_whole_seed() -> None:
    """Seeds differing in one byte give unrelated masks (unlike a 32-bit folded seed)."""
    a = secagg.mask(bytes(32), 1000)
    b = secagg.mask(bytes(31) + b"\x01", 1000)
    assert a.dtype == np.uint64 and not np.any(a == b)


def _bytes(reply: Any) -> bytes:
    if isinstance(reply, np.ndarray):
        return reply.tobytes()
    if isinstance(reply, dict):
        return b"".join(_bytes(v) for v in reply.values())
    if isinstance(reply, tuple | list):
        return b"".join(_bytes(v) for v in reply)
    return reply if isinstance(reply, bytes) else b""
