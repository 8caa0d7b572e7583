"""Drills on bad site data and on a site's storage, in-process and in Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from drills.base import Engine
from drills.data import label_noise, malformed_data
from drills.storage import correction_tamper, unwritable_site


def test_malformed_data(tmp_path: Path, engine: Engine, no_leftovers: None) -> None:
    """Nine broken files fail with file:line:column, two healthy sites finish, no canary leaks."""
    result = malformed_data(tmp_path, engine=engine)
    assert result.passed, result.observed
    assert result.figure["reported_with_location"] == result.figure["broken_sites"] == 9
    assert result.figure["canary_occurrences"] == 0


# Five runs, two of them over 20 splits (a group partner's AUC needs them): the full run only.
@pytest.mark.full
def test_label_noise(tmp_path: Path, engine: Engine, no_leftovers: None) -> None:
    """One site's flipped labels barely move the others, and its correction does no harm.

    Its feature-group partners may lose the group's benefit, no more.
    """
    result = label_noise(tmp_path, engine=engine)
    assert result.passed, result.observed
    assert result.figure["outside_max_auc_drop"] <= 0.01
    assert result.figure["partners_max_harm"] <= 0.01
    assert result.figure["noisy_adapted_minus_source_auc"] >= 0.0


def test_correction_tamper(tmp_path: Path, engine: Engine, no_leftovers: None) -> None:
    """Every tampered correction is refused with its reason and never partially applied."""
    result = correction_tamper(tmp_path, engine=engine)
    assert result.passed, result.observed
    assert result.figure["refused"] == result.figure["correct_reason"] == 5
    assert result.figure["partially_applied"] == 0


def test_unwritable_site(tmp_path: Path, engine: Engine, no_leftovers: None) -> None:
    """Unwritable and full site folders fail in the stats phase, before any training."""
    result = unwritable_site(tmp_path, engine=engine)
    assert result.passed, result.observed
    assert result.figure["healthy_ok"] >= 2
    if not result.figure["full_disk_tested"]:
        pytest.skip(f"full disk {result.details['full_disk']}")
    assert result.figure["sites_failed_before_training"] == 2
