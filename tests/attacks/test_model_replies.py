"""The same tricks on adapt and evaluate: scores computed at crafted weights, never noised."""

from __future__ import annotations

from pathlib import Path

from drills.curious import World, deployed_site, model_replies_probe


def test_under_require_dp_adapt_and_evaluate_replies_never_change(
    world: World, tmp_path: Path
) -> None:
    """A sweep of step models: the protected site's replies are one constant each."""
    protected = model_replies_probe(deployed_site(tmp_path / "site", world.with_target),
                                    world.schema, thresholds=4)
    control = model_replies_probe(deployed_site(tmp_path / "open", world.with_target,
                                                "require-dp = false"), world.schema,
                                  thresholds=4)
    assert protected.successes == 0
    assert control.successes > 0  # without DP, every threshold tells something new
