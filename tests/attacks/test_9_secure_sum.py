"""Attack 9: a coordinator that bends secure aggregation's stages to unmask one site.

The coordinator drives every stage: it may ask a stage again with other inputs, drop the
shares meant for its target, and tell each site its own story of who was lost, so that some
sites release the target's seed and others the keys of the sites it masked with. The sites
answer by the real stage functions (``client.secagg``); the coordinator's side is played here.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from client import secagg as site
from shared import secagg

CLIP = 1e6
TARGET = 0


def _setup(n: int, threshold: int) -> tuple[list[site.SiteState], dict[int, dict[int, bytes]]]:
    """``n`` sites after the key and share stages (every site a neighbour of every other)."""
    states = [site.SiteState(node=i, sum_id="s") for i in range(n)]
    public = {i: site.keys(s) for i, s in enumerate(states)}
    boxes = {i: site.share(s, public, threshold) for i, s in enumerate(states)}
    return states, boxes


def _attack(states: list[site.SiteState], boxes: dict[int, dict[int, bytes]],
            threshold: int, vector: np.ndarray) -> np.ndarray | None:
    """The target masks with only ``threshold - 1`` partners; then lies about who was lost.

    Returns the target's vector if the coordinator rebuilt it, else None.
    """
    n = len(states)
    partners = list(range(1, threshold))  # the fewest the target accepts to mask with
    incoming = {p: boxes[p][TARGET] for p in partners}
    masked = site.masked(states[TARGET], incoming, vector, CLIP)
    for i in range(1, n):  # the others mask too (their vectors are not the point)
        site.masked(states[i], {j: boxes[j][i] for j in range(n) if j != i}, np.zeros(3), CLIP)
    seed_shares: list[bytes] = []
    key_shares: dict[int, list[bytes]] = {p: [] for p in partners}
    for holder in range(n):
        # As many partners named lost as the holder lets through, the target always active.
        dead = [p for p in partners if p != holder][: n - threshold]
        active = [i for i in range(n) if i not in dead]
        try:
            got = site.unmask(states[holder], active, dead)
        except site.SecAggRefused:
            continue
        seed_shares.append(got[TARGET])
        for p in dead:
            key_shares[p].append(got[p])
    if len(seed_shares) < threshold or any(len(k) < threshold for k in key_shares.values()):
        return None
    total = masked - secagg.mask(combine_shares(seed_shares[:threshold]), len(vector))
    for p in partners:
        key = bytes_to_private_key(combine_shares(key_shares[p][:threshold]))
        pair = generate_shared_key(key, bytes_to_public_key(states[TARGET].pk1))
        pair_mask = secagg.mask(base64.urlsafe_b64decode(pair), len(vector))
        total = total - pair_mask if secagg.pair_seed_sign(TARGET, p) > 0 else total + pair_mask
    return secagg.dequantize_sum(total, CLIP)


def test_lying_about_dropouts_recovers_nothing_at_the_threshold_sites_accept() -> None:
    """Two thirds of the neighbourhood: the coordinator cannot gather the shares it needs.

    Every site is a neighbour of every other and every site is real: a coordinator that
    invents sites (their keys its own) receives shares itself; docs/privacy.md says so.
    """
    vector = np.array([1234.5, -77.25, 3.0])
    for n in (5, 6, 9):
        t = secagg.least_threshold(n)
        states, boxes = _setup(n, t)
        assert _attack(states, boxes, t, vector) is None


def test_the_same_attack_unmasks_a_site_at_a_bare_majority(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: sites that accepted a majority threshold give their target away."""
    majority: Callable[[int], int] = lambda size: size // 2 + 1  # noqa: E731
    monkeypatch.setattr(secagg, "least_threshold", majority)
    vector = np.array([1234.5, -77.25, 3.0])
    states, boxes = _setup(5, 3)
    recovered = _attack(states, boxes, 3, vector)
    assert recovered is not None and np.allclose(recovered, vector, atol=1e-6)


def test_a_site_refuses_a_threshold_below_two_thirds() -> None:
    """The share stage with a majority threshold of six sites (4 is fine, 3 is not)."""
    states = [site.SiteState(node=i, sum_id="s") for i in range(6)]
    public = {i: site.keys(s) for i, s in enumerate(states)}
    with pytest.raises(site.SecAggRefused, match="two thirds"):
        site.share(states[0], public, 3)
    site.share(states[1], public, 4)


def test_asking_a_stage_again_or_naming_the_site_lost_is_refused() -> None:
    """Two masked vectors under one mask would give away their difference: refused."""
    states, boxes = _setup(3, 2)
    incoming = {j: boxes[j][0] for j in (1, 2)}
    site.masked(states[0], incoming, np.array([5.0, 6.0]), CLIP)
    with pytest.raises(site.SecAggRefused, match="asked already"):
        site.masked(states[0], incoming, np.array([5.0, 7.0]), CLIP)
    with pytest.raises(site.SecAggRefused, match="asked already"):
        site.share(states[0], {i: (s.pk1, s.pk2) for i, s in enumerate(states)}, 2)
    with pytest.raises(site.SecAggRefused, match="cannot be lost"):
        site.unmask(states[0], [1, 2], [0])
    site.unmask(states[0], [0, 1, 2], [])
    with pytest.raises(site.SecAggRefused, match="asked already"):
        site.unmask(states[0], [0, 1], [2])


def test_a_coordinator_that_invents_the_neighbours_unmasks_the_site() -> None:
    """The known limit: keys only travel through the coordinator, so it can pose as sites.

    It quotes two key pairs of its own as the target's neighbours; the target shares its
    secrets with them (encrypted for keys the coordinator holds) and masks with them. Only
    the site's own noise (``require-dp``) then protects its sum: docs/privacy.md.
    """
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
    from flwr.common.secure_aggregation.secaggplus_utils import (
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    target = site.SiteState(node=TARGET, sum_id="s")
    pk1, pk2 = site.keys(target)
    fakes = {n: (generate_key_pairs(), generate_key_pairs()) for n in (1, 2)}
    public = {TARGET: (pk1, pk2), **{n: (public_key_to_bytes(a[1]), public_key_to_bytes(b[1]))
                                     for n, (a, b) in fakes.items()}}
    boxes = site.share(target, public, secagg.least_threshold(3))
    seeds, keys = [], []
    for n, (_, (sk2, _)) in fakes.items():
        box_key = generate_shared_key(sk2, bytes_to_public_key(pk2))
        _, _, seed_share, key_share = share_keys_plaintext_separate(decrypt(box_key, boxes[n]))
        seeds.append(seed_share)
        keys.append(key_share)
    sk2_fake = fakes[1][1][0]
    incoming = {1: encrypt(generate_shared_key(sk2_fake, bytes_to_public_key(pk2)),
                           share_keys_plaintext_concat(1, TARGET, b"x" * 16, b"y" * 16))}
    vector = np.array([1234.5, -77.25, 3.0])
    masked = site.masked(target, incoming, vector, CLIP)
    total = masked - secagg.mask(combine_shares(seeds), len(vector))
    pair = generate_shared_key(fakes[1][0][0], bytes_to_public_key(pk1))
    pair_mask = secagg.mask(base64.urlsafe_b64decode(pair), len(vector))
    total = total - pair_mask if secagg.pair_seed_sign(TARGET, 1) > 0 else total + pair_mask
    assert np.allclose(secagg.dequantize_sum(total, CLIP), vector, atol=1e-6)
    assert combine_shares(keys) == target.sk1  # its pairwise key too
