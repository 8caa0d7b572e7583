"""A read-only local status page: one HTML page, its status as JSON, and PNG plots.

``fedadapt status`` serves a run's page (``server.status_page``) or a site's
(``client.site_status``) with it. Python's own HTTP server (nothing to install), bound to
loopback by default. Three paths only: ``/`` (the page, which asks for the status every few
seconds while it is live), ``/status.json`` (the status function's dict) and
``/plots/NAME.png`` (PNG files of one folder, if given); anything else is 404. Nothing is
written, nothing is run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PLOT = re.compile(r"/plots/([a-z_]+\.png)")


def make_server(page: str, status: Callable[[], dict[str, Any]], plots: Path | None = None,
                host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A page server, not yet serving (``port`` 0: a free one).

    Parameters
    ----------
    page : str
        The HTML page.
    status : callable
        Builds the status dict, afresh for every request.
    plots : Path, optional
        The folder whose ``NAME.png`` files are served under ``/plots/``.
    """
    folder = plots.resolve() if plots is not None else None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/":
                self._send(page.encode("utf-8"), "text/html; charset=utf-8")
            elif path == "/status.json":
                self._send(json.dumps(status(), allow_nan=False).encode("utf-8"),
                           "application/json")
            elif folder is not None and (plot := _PLOT.fullmatch(path)) and (
                    folder / plot.group(1)).is_file():
                self._send((folder / plot.group(1)).read_bytes(), "image/png")
            else:
                self.send_error(HTTPStatus.NOT_FOUND)

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("status page: %s", format % args)

    return ThreadingHTTPServer((host, port), Handler)
