"""A site's side of secure aggregation: its keys, its shares, its masked vector, its unmasking.

The stages of SecAgg+ (``shared.secagg``) as pure functions of the site's state, so that the
ClientApp can keep the state between messages in Flower's ``context.state`` (it never leaves
the site) and tests can drive many sites in one process:

1. :func:`keys`: two fresh key pairs; the public halves are sent.
2. :func:`share`: a fresh mask seed; it and the first secret key are split by Shamir's scheme
   among the site's neighbours, each share encrypted for its neighbour (ECDH of the second
   keys, HKDF, Fernet) and sent through the coordinator, which cannot read them.
3. :func:`masked`: the site's vector quantised, plus the mask of its own seed, plus or minus
   the mask shared with each neighbour whose shares arrived; only this is sent.
4. :func:`unmask`: for each surviving neighbour its seed's share, for each lost one its
   secret key's share (never both for one neighbour: that would unmask its vector).

A site's neighbours are the sites whose public keys the share stage quotes to it (every
other site, or SecAgg+'s ring neighbourhood: ``server.secagg.neighbourhoods``). Each stage is
answered once per secure sum, the threshold must be two thirds of the neighbourhood, and a
site named lost is not asked to unmask: a coordinator that asks twice, or tells different
sites different stories of who was lost, gets refusals (docs/privacy.md says what remains).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from shared import secagg
from shared.errors import FedadaptError


class SecAggRefused(FedadaptError, ValueError):
    """A stage the site will not answer (it would reveal its vector, or it is malformed)."""


@dataclass
class SiteState:
    """What a site keeps between the stages of one secure sum (never sent)."""

    node: int
    sum_id: str = ""
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    seed: bytes = b""
    threshold: int = 0
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    seed_shares: dict[int, bytes] = field(default_factory=dict)
    key_shares: dict[int, bytes] = field(default_factory=dict)
    masked_with: list[int] = field(default_factory=list)
    answered_masked: bool = False
    answered_unmask: bool = False


def to_record(state: SiteState) -> dict[str, Any]:
    """The state as a Flower ConfigRecord's values (kept in ``context.state``, at the site)."""
    nodes = sorted(state.public)
    return {
        "node": state.node, "sum-id": state.sum_id, "sk1": state.sk1, "pk1": state.pk1,
        "sk2": state.sk2, "pk2": state.pk2, "seed": state.seed, "threshold": state.threshold,
        "public-nodes": nodes, "public-pk1": [state.public[n][0] for n in nodes],
        "public-pk2": [state.public[n][1] for n in nodes],
        "share-nodes": sorted(state.seed_shares),
        "seed-shares": [state.seed_shares[n] for n in sorted(state.seed_shares)],
        "key-shares": [state.key_shares[n] for n in sorted(state.seed_shares)],
        "masked-with": list(state.masked_with), "answered-masked": state.answered_masked,
        "answered-unmask": state.answered_unmask,
    }


def from_record(record: Mapping[str, Any]) -> SiteState:
    """The state :func:`to_record` kept."""
    nodes = [int(n) for n in record["public-nodes"]]
    holders = [int(n) for n in record["share-nodes"]]
    return SiteState(
        node=int(record["node"]), sum_id=str(record["sum-id"]), sk1=bytes(record["sk1"]),
        pk1=bytes(record["pk1"]),
        sk2=bytes(record["sk2"]), pk2=bytes(record["pk2"]), seed=bytes(record["seed"]),
        threshold=int(record["threshold"]),
        public={n: (bytes(a), bytes(b)) for n, a, b in zip(
            nodes, record["public-pk1"], record["public-pk2"], strict=True)},
        seed_shares={n: bytes(v) for n, v in zip(holders, record["seed-shares"], strict=True)},
        key_shares={n: bytes(v) for n, v in zip(holders, record["key-shares"], strict=True)},
        masked_with=[int(n) for n in record["masked-with"]],
        answered_masked=bool(record["answered-masked"]),
        answered_unmask=bool(record["answered-unmask"]),
    )


def keys(state: SiteState) -> tuple[bytes, bytes]:
    """Stage 1: two fresh key pairs (pairwise masks, share encryption); their public halves."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state.sk1, state.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
    state.sk2, state.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
    return state.pk1, state.pk2


def share(state: SiteState, public: dict[int, tuple[bytes, bytes]], threshold: int
          ) -> dict[int, bytes]:
    """Stage 2: shares of a fresh seed and of the first secret key, encrypted per neighbour.

    Raises
    ------
    SecAggRefused
        If the site's own keys are misquoted, keys repeat, or there are fewer neighbours
        than the threshold (its vector could then be unmasked from too few shares).
    """
    if public.get(state.node) != (state.pk1, state.pk2):
        raise SecAggRefused("the round quotes this site's public keys wrongly")
    flat = [k for pair in public.values() for k in pair]
    if len(set(flat)) != len(flat):
        raise SecAggRefused("two public keys of the round are the same")
    if state.seed:
        raise SecAggRefused("the share stage was asked already")
    if not secagg.least_threshold(len(public)) <= threshold <= len(public):
        raise SecAggRefused(f"threshold {threshold} must be at least 2 and two thirds of the "
                            f"{len(public)} sites of this site's neighbourhood")
    state.public, state.threshold = dict(public), threshold
    state.seed = os.urandom(secagg.SEED_BYTES)
    order = sorted(public)
    seed_shares = create_shares(state.seed, threshold, len(order))
    key_shares = create_shares(state.sk1, threshold, len(order))
    out = {}
    for node, seed_share, key_share in zip(order, seed_shares, key_shares, strict=True):
        if node == state.node:
            state.seed_shares[node], state.key_shares[node] = seed_share, key_share
            continue
        key = generate_shared_key(bytes_to_private_key(state.sk2),
                                  bytes_to_public_key(public[node][1]))
        out[node] = encrypt(key, share_keys_plaintext_concat(state.node, node, seed_share,
                                                             key_share))
    return out


def masked(state: SiteState, incoming: dict[int, bytes], vector: np.ndarray, clip: float
           ) -> np.ndarray:
    """Stage 3: the site's vector, quantised and masked; the neighbours' shares kept.

    Raises
    ------
    SecAggRefused
        If a value lies outside ``[-clip, clip]`` (it would be clipped without anyone
        knowing), a share is not addressed to this site, too few neighbours remain, or
        the stage is asked twice (two masked vectors under the same masks would give away
        their difference).
    """
    if state.answered_masked or not state.seed:
        raise SecAggRefused("the masked stage was asked already, or before the share stage")
    values = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.max(np.abs(values), initial=0.0) > clip:
        raise SecAggRefused(f"a value of this site's reply lies outside the quantisation "
                            f"range [-{clip:g}, {clip:g}]: the run needs a larger secagg-clip")
    if len(incoming) + 1 < state.threshold:
        raise SecAggRefused("fewer neighbours sent their shares than the threshold")
    for src, ciphertext in incoming.items():
        if src not in state.public or src == state.node:
            raise SecAggRefused("a share comes from a site that is not in the round")
        key = generate_shared_key(bytes_to_private_key(state.sk2),
                                  bytes_to_public_key(state.public[src][1]))
        actual, dst, seed_share, key_share = share_keys_plaintext_separate(
            decrypt(key, ciphertext))
        if actual != src or dst != state.node:
            raise SecAggRefused("a share is not addressed from its sender to this site")
        state.seed_shares[src], state.key_shares[src] = seed_share, key_share
    out = secagg.quantize(values, clip) + secagg.mask(state.seed, len(values))
    for other in sorted(incoming):
        pair = generate_shared_key(bytes_to_private_key(state.sk1),
                                   bytes_to_public_key(state.public[other][0]))
        pair_mask = secagg.mask(_raw(pair), len(values))
        # Of a pair, one site adds the mask and the other subtracts it: the two cancel.
        sign = secagg.pair_seed_sign(state.node, other)
        out = out + pair_mask if sign > 0 else out - pair_mask
    state.masked_with = sorted(incoming)
    state.answered_masked = True
    return out


def unmask(state: SiteState, active: list[int], dead: list[int]) -> dict[int, bytes]:
    """Stage 4: the seed's share of each surviving site, the key's share of each lost one.

    Raises
    ------
    SecAggRefused
        If a site is named both active and lost (both shares would unmask its vector), this
        site is named lost or was never masked, fewer of its neighbourhood survive than the
        threshold, or the stage is asked twice.
    """
    if set(active) & set(dead):
        raise SecAggRefused("a site is named both surviving and lost")
    if not state.answered_masked or state.node in dead or state.node not in active:
        raise SecAggRefused("this site sent its masked vector: it cannot be lost")
    if len(set(active) & set(state.public)) < state.threshold:
        raise SecAggRefused("fewer sites of this site's neighbourhood survive than the "
                            "threshold")
    if state.answered_unmask:
        raise SecAggRefused("the unmasking stage was asked already")
    state.answered_unmask = True
    out = {node: state.seed_shares[node] for node in active if node in state.seed_shares}
    out.update({node: state.key_shares[node] for node in dead if node in state.key_shares})
    return out


def _raw(fernet_key: bytes) -> bytes:
    """The 32 bytes behind Flower's url-safe base64 shared key."""
    import base64

    return base64.urlsafe_b64decode(fernet_key)
