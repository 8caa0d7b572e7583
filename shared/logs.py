"""Logging for fedadapt's own packages in processes Flower starts (ServerApp, ClientApp)."""

from __future__ import annotations

import logging

PACKAGES = ("shared", "client", "server", "executor", "deploy", "simulations", "bench",
            "drills")
FORMAT = "%(asctime)s fedadapt %(levelname)s %(name)s: %(message)s"


def configure(level: int = logging.INFO) -> None:
    """Show fedadapt's log lines, leaving other libraries' loggers alone.

    Does nothing when the process already configured logging (tests, a host application).
    """
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(level)
