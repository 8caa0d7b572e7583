"""Differential-privacy accounting of both sides: Opacus' RDP accountant, at one set of orders."""

from __future__ import annotations

from collections.abc import Sequence

# RDP orders for calibration and accounting alike, at the sites (record-level DP) and at the
# coordinator (client-level DP): Opacus' defaults (1.1 ... 63) and larger ones, which a few,
# very noisy releases (full-batch steps, a short run's rounds) need for a tight bound.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [
    80, 96, 128, 192, 256, 384, 512, 1024]
# Calibration stops within this distance below the target epsilon (Opacus' tolerance).
EPSILON_TOLERANCE = 0.01

History = Sequence[tuple[float, float, int]]


def epsilon_spent(history: History, delta: float) -> float:
    """Epsilon of a sequence of Gaussian mechanisms, by Opacus' RDP accountant.

    Opacus is imported here, on first use: a run or a site without DP never pays its import.

    Parameters
    ----------
    history : sequence of (float, float, int)
        ``(noise multiplier, sample rate, steps)`` of each part, as Opacus' accountant keeps
        them; one release of every site's update is sample rate 1, one step.
    delta : float
        The delta at which epsilon is stated.

    Returns
    -------
    float
        Epsilon at ``delta``; 0 for an empty history.
    """
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(k)) for s, q, k in history]
    return float(accountant.get_epsilon(delta=delta, alphas=ALPHAS))


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier for which ``steps`` steps at ``sample_rate`` spend ``epsilon``.

    Parameters
    ----------
    epsilon, delta : float
        The budget.
    sample_rate : float
        Probability that a record (or a site) takes part in a step; 1 for every one.
    steps : int
        Steps over the whole budget (all rounds of a run).

    Returns
    -------
    float
        The smallest noise multiplier, within Opacus' tolerance (:data:`EPSILON_TOLERANCE`
        on epsilon), whose :func:`epsilon_spent` is at most ``epsilon``.
    """
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp",
                                      epsilon_tolerance=EPSILON_TOLERANCE, alphas=ALPHAS))
