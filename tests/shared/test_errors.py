"""One error root: every exception class fedadapt defines derives from FedadaptError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from shared.errors import FedadaptError

PACKAGES = ("shared", "client", "server", "executor", "deploy", "simulations", "bench", "drills",
            "fedadapt")
# Modules that do something when imported (the command itself, the bare app's own package).
SKIPPED = {"fedadapt.__main__"}


def _exception_classes() -> list[type[BaseException]]:
    """Every exception class defined in the packages' modules (not the ones they import)."""
    found: list[type[BaseException]] = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if info.name in SKIPPED:
                continue
            module = importlib.import_module(info.name)
            found += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                      if issubclass(obj, BaseException) and obj.__module__ == info.name]
    return found


def test_the_walk_finds_the_errors_of_every_package() -> None:
    """The walk sees classes in each package (so the test below is not vacuous)."""
    modules = {cls.__module__.partition(".")[0] for cls in _exception_classes()}
    assert {"shared", "client", "server", "executor", "deploy", "drills"} <= modules


@pytest.mark.parametrize("cls", _exception_classes(), ids=lambda c: c.__qualname__)
def test_every_exception_class_derives_from_the_root(cls: type[BaseException]) -> None:
    """Its message is fedadapt's own: it may be printed as one line and sent after scrubbing.

    Nothing else decides that: ``client.egress`` sends the message of any FedadaptError and
    ``fedadapt.console`` ends a command with it.
    """
    assert issubclass(cls, FedadaptError), (
        f"{cls.__module__}.{cls.__qualname__} must derive from shared.errors.FedadaptError "
        "(keep its other base: class X(FedadaptError, ValueError))")
