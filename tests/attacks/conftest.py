"""The world the curious coordinator attacks: a generated hospital, and one planted patient."""

from __future__ import annotations

import pytest

from drills.curious import World, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A generated hospital's file (400 rows) and a copy with one extreme patient added."""
    return make_world(tmp_path_factory.mktemp("world") / "data")
