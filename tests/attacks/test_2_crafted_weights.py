"""Attack 2: step-function weights make each training reply count the rows past a threshold."""

from __future__ import annotations

from pathlib import Path

from drills.curious import (
    World,
    crafted_weights,
    deployed_site,
    membership,
    within_bound,
)


def test_without_dp_a_binary_search_recovers_a_patient_s_age_and_the_default_refuses_it(
    world: World, tmp_path: Path
) -> None:
    """The default policy requires DP: an exact training reply is never sent."""
    control = crafted_weights(deployed_site(tmp_path / "open", world.without,
                                            "require-dp = false"), world.schema)
    protected = crafted_weights(deployed_site(tmp_path / "site", world.without), world.schema)
    assert control.successes == 1  # the oldest training patient's age, to 0.01 years
    assert protected.successes == 0 and "requires record-level differential privacy" in \
        protected.note


def test_under_dp_telling_whether_a_patient_is_there_stays_within_the_epsilon_bound(
    world: World, tmp_path: Path
) -> None:
    """The membership game at epsilon 0.3: no attacker does better than DP allows (0.57).

    The same attacker without DP wins about 85 % of the games (the patient is held out in
    about 30 % of them, and then training says nothing).
    """
    control = membership(world, tmp_path / "open", trials=40, epsilon=None)
    protected = membership(world, tmp_path / "site", trials=100, epsilon=0.3)
    assert control.rate >= 0.7
    assert within_bound(protected)  # at most 0.574 + 3 standard errors
    assert protected.bound is not None and protected.bound < control.rate
