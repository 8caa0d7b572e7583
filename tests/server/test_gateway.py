"""The Fleet gateway in-process, with a fake SuperLink: only Fleet API calls pass, unchanged."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from server.gateway import ALLOWED, FLEET_ENDPOINTS, create_gateway_app

UPSTREAM = "superlink.internal:9092"
BODY = b"\x0a\x04\x08\x2a\x10\x01protobuf-bytes\x00\xff"
AUTH = [("flwr-public-key", "cHVibGljLWtleQ=="), ("flwr-timestamp", "2026-12-01T10:00:00+00:00"),
        ("flwr-signature", "c2lnbmF0dXJl")]


class FakeSuperLink:
    """Records every request it gets and answers with fixed headers and body."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        """Record the request; answer 200 with two cookies and a protobuf-like body."""
        self.requests.append(request)
        reply = b"\x08\x07reply-bytes"
        return httpx.Response(
            200, stream=httpx.ByteStream(reply),
            headers=[("content-type", "application/protobuf"), ("x-flower-version", "1.42.0"),
                     ("set-cookie", "a=1"), ("set-cookie", "b=2"), ("connection", "close"),
                     ("content-length", str(len(reply)))])


def _gateway(upstream: FakeSuperLink, **kwargs: Any) -> Any:
    return create_gateway_app(UPSTREAM, None, transport=httpx.MockTransport(upstream), **kwargs)


def _calls(app: Any, *calls: tuple[str, str, bytes, list[tuple[str, str]]]
           ) -> list[httpx.Response]:
    """Send requests through an HTTP client to the ASGI app; the responses, read."""

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="https://gateway:9093") as client:
            return [await client.request(method, path, content=body, headers=headers)
                    for method, path, body, headers in calls]

    return asyncio.run(go())


def _headers(request: httpx.Request) -> list[tuple[str, str]]:
    """A request's headers, lower-cased, without those of its own connection."""
    return [(k.decode().lower(), v.decode()) for k, v in request.headers.raw
            if k.lower() not in (b"host", b"content-length", b"connection")]


def _raw(app: Any, method: str, raw_path: bytes, query: bytes = b"",
         body: bytes = BODY) -> tuple[int, bytes]:
    """Call the ASGI app with the path bytes exactly as a client sent them (as uvicorn does)."""
    path = raw_path.decode("ascii")
    path = unquote(path) if "%" in path else path
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "https", "path": path, "raw_path": raw_path,
             "query_string": query, "root_path": "", "client": ("192.0.2.7", 50000),
             "server": ("127.0.0.1", 9093),
             "headers": [(b"host", b"gateway"), (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_allow_list_is_exactly_flowers_fleet_routes_and_health() -> None:
    """Every route of the installed SuperLink's Fleet router, and nothing more, is allowed."""
    from flwr.superlink.routers.fleet.router import router

    fleet = {(method, getattr(route, "path", "")) for route in router.routes
             for method in getattr(route, "methods", ())}
    assert set(ALLOWED) == fleet | {("GET", "/health")}
    assert len(FLEET_ENDPOINTS) == 12


@pytest.mark.parametrize("endpoint", sorted(FLEET_ENDPOINTS))
def test_fleet_calls_are_forwarded_with_headers_and_body_unchanged(endpoint: str) -> None:
    """A SuperNode's call reaches the SuperLink byte for byte; its answer comes back unchanged."""
    upstream = FakeSuperLink()
    headers = [("content-type", "application/protobuf"), ("accept", "application/protobuf"),
               ("x-flwr-client", "SuperNode/1.42.0"), *AUTH, ("accept-encoding", "identity")]
    (response,) = _calls(_gateway(upstream), ("POST", f"/v1/fleet/{endpoint}", BODY, headers))
    assert response.status_code == 200
    assert response.content == b"\x08\x07reply-bytes"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers["x-flower-version"] == "1.42.0"
    assert response.headers["content-type"] == "application/protobuf"
    (sent,) = upstream.requests
    assert sent.method == "POST"
    assert str(sent.url) == f"https://{UPSTREAM}/v1/fleet/{endpoint}"
    assert sent.content == BODY
    assert sent.headers["host"] == UPSTREAM
    assert sent.headers["content-length"] == str(len(BODY))
    # Everything the client sent but its own connection's headers, in order, and nothing added.
    assert _headers(sent) == _headers(response.request)
    for name, value in headers:
        assert sent.headers[name] == value


def test_health_is_forwarded() -> None:
    """``GET /health`` answers through the gateway (deploy-local waits on it)."""
    upstream = FakeSuperLink()
    (response,) = _calls(_gateway(upstream), ("GET", "/health", b"", []))
    assert response.status_code == 200
    assert [(r.method, r.url.path) for r in upstream.requests] == [("GET", "/health")]


def test_hop_by_hop_headers_are_not_forwarded() -> None:
    """Connection-level headers (and those the Connection header names) stay at the gateway."""
    upstream = FakeSuperLink()
    _calls(_gateway(upstream), ("POST", "/v1/fleet/pull-messages", BODY, [
        ("connection", "keep-alive, x-hop"), ("x-hop", "1"), ("keep-alive", "timeout=5"),
        ("te", "trailers"), ("proxy-authorization", "Basic eA=="), ("x-end", "2")]))
    (sent,) = upstream.requests
    names = {k.decode().lower() for k, _ in sent.headers.raw}
    assert names.isdisjoint({"connection", "x-hop", "keep-alive", "te", "proxy-authorization"})
    assert sent.headers["x-end"] == "2"


REFUSED_REQUESTS = [
    ("POST", b"/v1/control/register-node"),
    ("POST", b"/v1/control/start-run"),
    ("POST", b"/v1/control/list-runs"),
    ("POST", b"/v1/control/list-nodes"),
    ("POST", b"/v1/control/stop-run"),
    ("POST", b"/v1/runtime/pull-task-input"),
    ("POST", b"/v1/runtime/push-task-output"),
    ("POST", b"/v1/runtime/responses"),
    ("GET", b"/docs"),
    ("GET", b"/openapi.json"),
    ("GET", b"/"),
    ("POST", b"/v1/fleet/unknown-call"),
    ("POST", b"/v1/fleet/"),
    ("POST", b"/v1/fleet"),
    ("GET", b"/v1/fleet/pull-messages"),
    ("PUT", b"/v1/fleet/push-messages"),
    ("DELETE", b"/v1/fleet/unregister-node"),
    ("OPTIONS", b"/v1/fleet/pull-messages"),
    ("HEAD", b"/health"),
    ("POST", b"/health"),
    ("POST", b"/v1/fleet/../control/list-runs"),
    ("POST", b"//v1/control/list-runs"),
    ("POST", b"/v1/fleet/pull-messages/../../control/start-run"),
    ("POST", b"/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", b"/v1/fleet/%2E%2E/control/register-node"),
    ("POST", b"/v1/fleet/pull-messages/%2e%2e/%2e%2e/control/start-run"),
    ("POST", b"/v1/fleet%2fpull-messages"),
    ("POST", b"/v1/fleet/pull%2dmessages"),
    ("POST", b"/%76%31/fleet/pull-messages"),
    ("POST", b"/V1/CONTROL/list-runs"),
    ("POST", b"/V1/FLEET/pull-messages"),
    ("POST", b"/v1/fleet/pull-messages/"),
    ("POST", b"/v1/fleet//pull-messages"),
    ("POST", b"/v1/fleet/./pull-messages"),
    ("POST", b"/v1/fleet/pull-messages;/../../control/list-runs"),
    ("POST", b"/v1/fleet/pull-messages%00"),
    ("POST", b"/v1/fleet/pull-messages\\..\\..\\control\\list-runs"),
    ("POST", b"http://127.0.0.1:9092/v1/control/list-runs"),
]


@pytest.mark.parametrize(("method", "raw_path"), REFUSED_REQUESTS,
                         ids=[f"{m} {p.decode()}" for m, p in REFUSED_REQUESTS])
def test_everything_else_is_refused_and_never_forwarded(method: str, raw_path: bytes) -> None:
    """Control, runtime, docs, other methods and path tricks: 403 and nothing sent upstream."""
    upstream = FakeSuperLink()
    status, body = _raw(_gateway(upstream), method, raw_path)
    assert status == 403
    assert body.startswith(b"refused:")
    assert upstream.requests == []


def test_query_strings_are_refused() -> None:
    """An allowed path with a query string is refused (Flower's Fleet client never sends one)."""
    upstream = FakeSuperLink()
    status, _ = _raw(_gateway(upstream), "POST", b"/v1/fleet/pull-messages",
                     query=b"next=/v1/control/list-runs")
    assert status == 403
    assert upstream.requests == []


def test_refused_through_the_http_client_too() -> None:
    """The same refusals through a real HTTP client (which normalises dot segments itself)."""
    upstream = FakeSuperLink()
    responses = _calls(_gateway(upstream), *[
        ("POST", path, BODY, []) for path in (
            "/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-runs",
            "/v1/fleet/../control/list-runs")],
        ("GET", "/docs", b"", []), ("GET", "/v1/fleet/pull-messages", b"", []))
    for response in responses:
        assert response.status_code == 403, response.request.url
        assert response.headers["content-type"].startswith("text/plain")
    assert upstream.requests == []


def test_refusals_are_logged_by_method_and_path_never_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The log names the method and path of a refused request, never its body."""
    upstream = FakeSuperLink()
    secret = b"patient-canary-4711"
    with caplog.at_level(logging.DEBUG, logger="server.gateway"):
        _raw(_gateway(upstream), "POST", b"/v1/control/register-node", body=secret)
        _raw(_gateway(upstream), "POST", b"/v1/fleet/push-messages", body=secret)
    assert "refused POST '/v1/control/register-node' from 192.0.2.7" in caplog.text
    assert "patient-canary" not in caplog.text
    assert len(upstream.requests) == 1


def test_large_bodies_are_refused_before_forwarding() -> None:
    """A body above the bound gets 413 and is not forwarded."""
    upstream = FakeSuperLink()
    app = _gateway(upstream, max_body=1024)
    big, fits = _calls(app, ("POST", "/v1/fleet/push-object", b"x" * 1025, []),
                       ("POST", "/v1/fleet/push-object", b"x" * 1024, []))
    assert (big.status_code, fits.status_code) == (413, 200)
    assert len(upstream.requests) == 1


def test_unreachable_superlink_is_a_retryable_502() -> None:
    """SuperLink down: 502, which Flower's SuperNode retries (it gives up on a 403)."""

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    for handler, code in ((down, 502), (slow, 504)):
        app = create_gateway_app(UPSTREAM, None, transport=httpx.MockTransport(handler))
        (response,) = _calls(app, ("POST", "/v1/fleet/pull-messages", BODY, []))
        assert response.status_code == code


def test_a_ca_certificate_is_required_without_a_test_transport() -> None:
    """The SuperLink is always verified against the federation's CA."""
    with pytest.raises(ValueError, match="CA certificate"):
        create_gateway_app(UPSTREAM, None)
