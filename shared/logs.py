"""Logging for fedadapt's own packages in processes Flower starts (ServerApp, ClientApp)."""

from __future__ import annotations

import logging

from shared.errors import FedadaptError

PACKAGES = ("shared", "client", "server", "executor", "deploy", "simulations", "bench",
            "drills")
FORMAT = "%(asctime)s fedadapt %(levelname)s %(name)s: %(message)s"


class OwnErrorsInOneLine(logging.Filter):
    """Drop the traceback Flower logs with a fedadapt error: an intended stop, said in one line.

    Flower logs any exception of a ServerApp or ClientApp run with its traceback (and exits
    with its code, 201 or 800). fedadapt's own errors (:class:`shared.errors.FedadaptError`:
    too few sites, every site refused, an app bundle not approved) are intended stops whose
    message says what to do: the record keeps Flower's words and gains the message, without
    the stack. Any other exception keeps its traceback: that one is a bug.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a record carrying a fedadapt error; let every record through."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, FedadaptError):
            record.msg = f"{record.getMessage()}: {exc}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_own_errors() -> None:
    """Install :class:`OwnErrorsInOneLine` on Flower's logger (once per process)."""
    flwr = logging.getLogger("flwr")
    if not any(isinstance(f, OwnErrorsInOneLine) for f in flwr.filters):
        flwr.addFilter(OwnErrorsInOneLine())


def configure(level: int = logging.INFO) -> None:
    """Show fedadapt's log lines, leaving other libraries' loggers alone.

    Does nothing when the process already configured logging (tests, a host application),
    but for dropping the traceback Flower logs with a fedadapt error (:func:`quiet_own_errors`).
    """
    quiet_own_errors()
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(level)
