"""Secure aggregation's arithmetic both sides agree on: quantisation, masks, the modulus.

The protocol is SecAgg+ (Bell et al. 2020) as Flower implements it for its legacy API
(``flwr.client.mod.secaggplus_mod``, ``flwr.server.workflow.SecAggPlusWorkflow``); fedadapt
runs its stages over the Message API (``client.secagg``, ``server.secagg``) with Flower's own
pieces: key pairs and ECDH + HKDF (``flwr.supercore.primitives.asymmetric``,
``flwr.common.secure_aggregation.crypto.symmetric_encryption``), Shamir's secret sharing and
Fernet encryption of the shares. Two pieces are written here, and why:

- **the masks' generator.** Flower's ``pseudo_rand_gen`` seeds numpy's Mersenne Twister with
  32 bits folded from the seed, so each mask is one of 2**32: a coordinator could try them
  all. Here a mask is the ChaCha20 keystream (``cryptography``) under the whole 32-byte seed,
  read as unsigned 64-bit integers;
- **quantisation.** Flower's casts to 32-bit integers; sums of a hospital's rows need more
  levels. Values are clipped to ``[-clip, clip]`` (the site checks its own fit first),
  rounded to one of ``LEVELS`` levels as signed integers and added modulo 2**64 (numpy's
  unsigned arithmetic wraps there); the total of up to ``MAX_SITES`` sites stays within a
  signed 64-bit integer, so it is exact before it is read back.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# Quantisation levels over [-clip, clip]: one level is clip / 2**51.
LEVELS = 2**52
# Sites whose quantised values (each at most LEVELS / 2 in size) add up within int64.
MAX_SITES = 2**11
SEED_BYTES = 32
MAX_KEY_PAIRS = 256  # most key pairs a site makes at once: one per secure sum of a repeat
_NONCE = bytes(16)  # each seed masks one vector, so a fixed nonce never repeats a keystream


def mask(seed: bytes, size: int) -> np.ndarray:
    """The mask of ``seed``: ``size`` unsigned 64-bit integers of ChaCha20's keystream.

    Parameters
    ----------
    seed : bytes
        32 bytes (a site's own random seed, or a pair's HKDF-derived shared key).
    size : int
        How many values.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, not {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * size)), dtype="<u8").astype(np.uint64)


def quantize(values: np.ndarray, clip: float) -> np.ndarray:
    """Values clipped to ``[-clip, clip]``, as signed levels stored modulo 2**64 (uint64)."""
    x = np.clip(np.asarray(values, dtype=np.float64), -clip, clip)
    return np.rint(x * (LEVELS / (2.0 * clip))).astype(np.int64).view(np.uint64)


def dequantize_sum(total: np.ndarray, clip: float) -> np.ndarray:
    """The float total of quantised vectors whose sum modulo 2**64 is ``total``."""
    signed = np.asarray(total, dtype=np.uint64).view(np.int64)
    return signed.astype(np.float64) * (2.0 * clip / LEVELS)


def error_bound(clip: float, sites: int) -> float:
    """The largest difference between the dequantised total and the exact one (per value).

    Each site's rounding is at most half a level; reading the total back as a float adds
    at most one unit in the last place of the total, bounded here by one more level.
    """
    return (sites + 1) * clip / LEVELS


def threshold_count(fraction: float, size: int) -> int:
    """Shares that rebuild a secret in a neighbourhood of ``size`` sites (itself included).

    ``fraction`` of the neighbourhood, rounded, and never below :func:`least_threshold`.
    """
    return min(size, max(round(fraction * size), least_threshold(size)))


def least_threshold(size: int) -> int:
    """The smallest threshold a site accepts in a neighbourhood of ``size``: two thirds, 2.

    A coordinator that tells different sites different stories of who was lost collects, from
    each site once, either the seed's share or the key's share of every other site. To unmask
    one site it needs ``t`` shares of that site's seed and ``t`` of the key of each site it
    masked with (at least ``t - 1`` of them), while each site that answers names at most
    ``size - t`` sites lost: ``t * (t - 1)`` key shares needed, ``size * (size - t)`` at most
    given. Below about 0.62 of the neighbourhood the second can exceed the first; from two
    thirds on it cannot (``tests/attacks/test_9_secure_sum.py`` plays the attack). The count
    is within one neighbourhood: every site a neighbour of every other, not SecAgg+'s ring.
    """
    return max(2, math.ceil(2 * size / 3 - 1e-9))


def pair_seed_sign(me: int, other: int) -> int:
    """+1 if the site ``me`` adds the pair's mask, -1 if it subtracts it (they cancel)."""
    return 1 if me > other else -1
