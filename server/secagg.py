"""The coordinator's side of secure aggregation: run the four stages, learn only the total.

``secure_sum`` drives the stages of SecAgg+ (``shared.secagg``) through ``ask``, whatever
carries the messages (Flower's grid in a run, direct calls in tests): it forwards the sites'
encrypted shares without being able to read them, adds the masked vectors, and removes the
masks with the shares the survivors return: each survivor's own seed, and for a site lost
after it shared its keys, its pairwise key. What it learns is the sum of the survivors'
vectors, never one site's. With fewer sites than the threshold at any stage it stops with
:class:`SecAggAborted`: never a partial or wrong sum.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from shared import secagg
from shared.errors import FedadaptError

# ask(stage, {node: request}) -> {node: reply}; a node missing from the result is lost.
Ask = Callable[[str, Mapping[int, Any]], Mapping[int, Any]]


class SecAggAborted(FedadaptError, RuntimeError):
    """Too few sites remained for the secure sum: nothing was aggregated."""


@dataclass(frozen=True)
class SecureSum:
    """The outcome of one secure sum.

    Attributes
    ----------
    total : numpy.ndarray
        The dequantised sum of the survivors' vectors.
    survivors : tuple of int
        The sites whose vectors are in it.
    lost : tuple of int
        The sites lost after sharing their keys (their masks removed, their vectors not in).
    error_bound : float
        The largest difference from the exact sum, per value (quantisation).
    """

    total: np.ndarray
    survivors: tuple[int, ...]
    lost: tuple[int, ...]
    error_bound: float


def neighbourhoods(nodes: list[int], neighbours: int = 0) -> dict[int, list[int]]:
    """Each site's neighbours in the secure sum.

    All others when ``neighbours`` is 0 or at least the sites less one; else the
    ``neighbours // 2`` nearest on each side of a ring of the sorted sites (SecAgg+: masks
    and shares only between neighbours, so a site's work grows with ``neighbours``, not with
    the federation).
    """
    order = sorted(nodes)
    n = len(order)
    if not neighbours or neighbours >= n - 1:
        return {node: [m for m in order if m != node] for node in order}
    half = max(1, neighbours // 2)
    return {node: sorted({order[(i + d) % n] for d in range(-half, half + 1) if d})
            for i, node in enumerate(order)}


def secure_sum(ask: Ask, nodes: list[int], threshold: float, clip: float,
               neighbours: int = 0, public: Mapping[int, tuple[bytes, bytes]] | None = None,
               ) -> SecureSum:
    """Sum the sites' vectors without seeing any of them.

    Parameters
    ----------
    ask : callable
        Sends one stage's requests and returns the replies of the sites that answered.
    nodes : list of int
        The sites of the round.
    threshold : float
        Share of each neighbourhood (the site and its neighbours) that must remain at every
        stage and whose shares rebuild a secret (``shared.secagg.threshold_count``).
    clip : float
        The quantisation range every value lies in.
    neighbours : int
        SecAgg+'s neighbourhood size (:func:`neighbourhoods`; 0: every other site). The
        threshold then counts within each neighbourhood.
    public : mapping, optional
        Each site's two public keys for this sum, made earlier (a batch of key pairs, one
        per sum: ``server.secure_rounds``); without it the sum starts with the keys stage.

    Raises
    ------
    SecAggAborted
        With fewer than ``threshold`` sites left at a stage, or shares that do not combine.
    """
    if len(nodes) > secagg.MAX_SITES:
        raise SecAggAborted(f"at most {secagg.MAX_SITES} sites can be summed")
    near = neighbourhoods(nodes, neighbours)
    size = 1 + max((len(v) for v in near.values()), default=0)
    need = secagg.threshold_count(threshold, size)
    public = dict(_enough("keys", public if public is not None
                          else ask("keys", dict.fromkeys(nodes)), need))
    shared = _enough("share", ask("share", {
        n: ({m: public[m] for m in [n, *near[n]] if m in public}, need) for n in public}),
        need)
    incoming = {dst: {src: boxes[dst] for src, boxes in shared.items() if dst in boxes}
                for dst in shared}
    vectors = _enough("masked", ask("masked", incoming), need)
    survivors = sorted(vectors)
    lost = sorted(set(shared) - set(vectors))
    shares = _enough("unmask", ask("unmask", {n: (survivors, lost) for n in survivors}), need)
    sizes = {len(v) for v in vectors.values()}
    if len(sizes) != 1:
        raise SecAggAborted("the masked vectors differ in length")
    (length,) = sizes
    total = np.zeros(length, dtype=np.uint64)
    for node in survivors:
        total = total + np.asarray(vectors[node], dtype=np.uint64)
    for node in survivors:  # each survivor's own mask
        total = total - secagg.mask(_combine(shares, node, need), length)
    for gone in lost:  # the pairwise masks the survivors added for a site lost since
        key = bytes_to_private_key(_combine(shares, gone, need))
        for node in survivors:
            if gone not in incoming[node]:  # not neighbours, or its shares never came
                continue
            pair = generate_shared_key(key, bytes_to_public_key(public[node][0]))
            pair_mask = secagg.mask(base64.urlsafe_b64decode(pair), length)
            if secagg.pair_seed_sign(node, gone) > 0:
                total = total - pair_mask
            else:
                total = total + pair_mask
    return SecureSum(secagg.dequantize_sum(total, clip), tuple(survivors),
                     tuple(lost), secagg.error_bound(clip, len(survivors)))


def _enough(stage: str, replies: Mapping[int, Any], threshold: int) -> dict[int, Any]:
    if len(replies) < threshold:
        raise SecAggAborted(f"secure aggregation stopped at its {stage} stage: {len(replies)} "
                            f"site(s) answered, fewer than the threshold {threshold}; nothing "
                            "was aggregated")
    return dict(replies)


def _combine(shares: Mapping[int, Mapping[int, bytes]], node: int, threshold: int) -> bytes:
    """The secret of ``node`` rebuilt from the survivors' shares of it."""
    held = [reply[node] for reply in shares.values() if node in reply]
    if len(held) < threshold:
        raise SecAggAborted(f"only {len(held)} share(s) of a site's secret came back, fewer "
                            f"than the threshold {threshold}; nothing was aggregated")
    return combine_shares(held[:threshold])
