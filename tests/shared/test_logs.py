"""Logging: fedadapt's own errors in one line where Flower would print their traceback."""

from __future__ import annotations

import io
import logging

from shared.errors import FedadaptError
from shared.logs import OwnErrorsInOneLine


def _logged(err: Exception) -> str:
    """What Flower's logger writes for ``err``, raised and caught as Flower does."""
    out = io.StringIO()
    logger = logging.getLogger("flwr-test-own-errors")
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    logger.addFilter(OwnErrorsInOneLine())
    logger.propagate = False
    try:
        raise err
    except Exception as caught:
        logger.error("%s raised an exception", "ServerApp", exc_info=caught)
    logger.removeHandler(handler)
    return out.getvalue()


def test_an_intended_stop_is_one_line_and_a_bug_keeps_its_traceback() -> None:
    """RunFailed-like errors: Flower's words and the message; a ValueError: the stack."""
    own = _logged(FedadaptError("every site refused the app bundle: approve it"))
    assert own == ("ServerApp raised an exception: every site refused the app bundle: "
                   "approve it\n")
    bug = _logged(ValueError("boom"))
    assert "Traceback" in bug and "ValueError: boom" in bug
