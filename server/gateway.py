"""Fleet gateway: the sites' HTTPS entry point, forwarding Flower's Fleet API and nothing else."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from shared.errors import FedadaptError

log = logging.getLogger(__name__)

# The calls a SuperNode makes (flwr 1.42: ``flwr/supernode/fleet_http_client.py``), all
# ``POST /v1/fleet/<name>`` with a protobuf body. Nothing else is ever forwarded.
FLEET_ENDPOINTS = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received",
})
ALLOWED = frozenset({("POST", f"/v1/fleet/{name}") for name in FLEET_ENDPOINTS}
                    | {("GET", "/health")})

MAX_BODY_BYTES = 512 * 1024 * 1024
TIMEOUT = httpx.Timeout(300.0, connect=10.0, pool=30.0)

# Headers that describe one connection, not the request (RFC 9110 7.6.1); ``host`` and
# ``content-length`` are set again for the upstream connection (same body, same length).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length"}

REFUSED = "refused: this address serves only the Flower Fleet API\n"


def refusal(method: str, path: str, raw_path: bytes, query_string: bytes) -> str | None:
    """Why a request may not pass, or ``None`` if it is an allowed Fleet API call.

    Parameters
    ----------
    method : str
        The HTTP method.
    path : str
        The percent-decoded path (ASGI ``path``).
    raw_path : bytes
        The path exactly as the client sent it (ASGI ``raw_path``).
    query_string : bytes
        The query string (Flower's Fleet client never sends one).

    Returns
    -------
    str or None
        A short reason for the client, or ``None`` to forward.
    """
    if (method, path) not in ALLOWED:
        return REFUSED
    if raw_path != path.encode("ascii") or query_string:
        return "refused: encoded paths and query strings are not forwarded\n"
    return None


class FleetGateway:
    """ASGI app: forward allowed Fleet API calls to the SuperLink, refuse everything else.

    Parameters
    ----------
    superlink_address : str
        ``HOST:PORT`` of the SuperLink (reached over HTTPS).
    ca_cert : Path or str or None
        The federation's CA certificate, against which the SuperLink's certificate is verified
        (``None`` only with ``transport``).
    max_body : int
        Largest request body forwarded, in bytes (larger: 413).
    timeout : httpx.Timeout
        Timeouts of the upstream request.
    transport : httpx.AsyncBaseTransport, optional
        Replaces the network (tests).
    """

    def __init__(self, superlink_address: str, ca_cert: Path | str | None, *,
                 max_body: int = MAX_BODY_BYTES, timeout: httpx.Timeout = TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if transport is None:
            if ca_cert is None:
                raise ValueError("the federation's CA certificate is required")
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_cert))
        else:
            verify = True
        self.base_url = f"https://{superlink_address}"
        self.max_body = max_body
        # Requests are built with httpx.Request, not the client, so none of the client's
        # default headers (user-agent, accept-encoding ...) is added; redirects are not followed.
        self.client = httpx.AsyncClient(verify=verify, timeout=timeout, transport=transport,
                                        follow_redirects=False, trust_env=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection: lifespan, HTTP; anything else is closed."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = str(scope["method"]), str(scope["path"])
        raw_path = scope.get("raw_path") or path.encode("utf-8", "replace")
        reason = refusal(method, path, raw_path, scope.get("query_string", b""))
        if reason is not None:
            client = scope.get("client") or ("?", 0)
            # Method and path only (repr: no control characters in the log), never a body.
            log.warning("refused %s %r from %s", method[:16],
                        raw_path[:200].decode("latin-1"), client[0])
            await PlainTextResponse(reason, status_code=403)(scope, receive, send)
            return
        response = await self._forward(Request(scope, receive), method, path)
        await response(scope, receive, send)

    async def _forward(self, request: Request, method: str, path: str) -> Response:
        """Send the request to the SuperLink; its answer, or why there is none."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return PlainTextResponse("request body too large\n", status_code=413)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body:
                    return PlainTextResponse("request body too large\n", status_code=413)
        except ClientDisconnect:
            return PlainTextResponse("client disconnected\n", status_code=400)
        connection_tokens = {t.strip().lower() for t in
                             request.headers.get("connection", "").split(",")}
        headers = [(k, v) for k, v in request.headers.raw
                   if k.decode("latin-1").lower() not in NOT_FORWARDED | connection_tokens]
        upstream_request = httpx.Request(method, self.base_url + path, headers=headers,
                                         content=bytes(body))
        try:
            upstream = await self.client.send(upstream_request, stream=True)
            try:
                # The raw bytes: a compressed answer stays compressed, as the SuperLink sent it.
                content = b"".join([chunk async for chunk in upstream.aiter_raw()])
            finally:
                await upstream.aclose()
        except httpx.TimeoutException:
            log.warning("%s %s: the SuperLink did not answer in time", method, path)
            return PlainTextResponse("the SuperLink did not answer in time\n", status_code=504)
        except httpx.HTTPError as err:
            log.warning("%s %s: the SuperLink is unreachable (%s)", method, path,
                        type(err).__name__)
            return PlainTextResponse("the SuperLink is unreachable\n", status_code=502)
        log.debug("%s %s -> %d", method, path, upstream.status_code)
        response = Response(content, status_code=upstream.status_code)
        response.raw_headers = [
            *((k, v) for k, v in upstream.headers.raw
              if k.decode("latin-1").lower() not in NOT_FORWARDED),
            (b"content-length", str(len(content)).encode("ascii")),
        ]
        return response


def create_gateway_app(superlink_address: str, ca_cert: Path | str | None, *,
                       max_body: int = MAX_BODY_BYTES, timeout: httpx.Timeout = TIMEOUT,
                       transport: httpx.AsyncBaseTransport | None = None) -> FleetGateway:
    """The gateway as an ASGI app (see ``FleetGateway`` for the parameters)."""
    return FleetGateway(superlink_address, ca_cert, max_body=max_body, timeout=timeout,
                        transport=transport)


def run_gateway(listen_host: str, listen_port: int, superlink_address: str,
                ca_cert: Path | str, cert: Path | str, key: Path | str, *,
                max_body: int = MAX_BODY_BYTES) -> None:
    """Serve the gateway over HTTPS until SIGINT or SIGTERM (blocking).

    Parameters
    ----------
    listen_host : str
        Address the sites connect to (e.g. ``0.0.0.0``).
    listen_port : int
        Port the sites connect to.
    superlink_address : str
        ``HOST:PORT`` of the SuperLink, reachable from here only (e.g. ``127.0.0.1:9092``).
    ca_cert : Path or str
        The federation's CA certificate (verifies the SuperLink).
    cert : Path or str
        The gateway's TLS certificate (e.g. the SuperLink's own ``server.pem``): the sites
        verify it against the same CA, under the name they connect to.
    key : Path or str
        Its private key.
    max_body : int
        Largest request body forwarded, in bytes.
    """
    import uvicorn

    app = create_gateway_app(superlink_address, ca_cert, max_body=max_body)
    log.info("Fleet gateway on https://%s:%d -> https://%s (Fleet API and /health only)",
             listen_host, listen_port, superlink_address)
    uvicorn.run(app, host=listen_host, port=listen_port, ssl_certfile=str(cert),
                ssl_keyfile=str(key), lifespan="on", ws="none", access_log=False,
                server_header=False, date_header=False, proxy_headers=False,
                timeout_graceful_shutdown=10, log_level="info")


class GatewayError(FedadaptError, ValueError):
    """The gateway cannot start as asked (an address, a missing file); the message says why."""


def host_port(value: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a host and a port number.

    Raises
    ------
    GatewayError
        Naming ``what`` when ``value`` is not ``HOST:PORT``.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GatewayError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def serve(listen: str, superlink: str, ca_cert: Path, cert: Path, key: Path,
          max_body_mib: int = MAX_BODY_BYTES // 2**20) -> None:
    """Run the gateway until stopped (``fedadapt gateway``).

    Parameters
    ----------
    listen : str
        ``HOST:PORT`` the sites connect to.
    superlink : str
        ``HOST:PORT`` of the SuperLink (its private address).
    ca_cert, cert, key : Path
        The federation's CA, the TLS certificate for the sites and its private key (PEM).
    max_body_mib : int
        Largest request body forwarded, MiB.

    Raises
    ------
    GatewayError
        For an address that is not ``HOST:PORT`` or a file that does not exist.
    """
    host, port = host_port(listen, "--listen")
    up_host, up_port = host_port(superlink, "--superlink")
    for path in (ca_cert, cert, key):
        if not Path(path).is_file():
            raise GatewayError(f"{path} not found: give the files `fedadapt certs` wrote")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every upstream request at INFO: a line per SuperNode poll.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    address = f"[{up_host}]:{up_port}" if ":" in up_host else f"{up_host}:{up_port}"
    run_gateway(host, port, address, Path(ca_cert), Path(cert), Path(key),
                max_body=max_body_mib * 2**20)
