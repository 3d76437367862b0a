"""HTTP read API of one worker: `GET /groups/{group}/keys/{key}`.

Each worker serves it on `ops.http_base_port + i` (its own event loop, next
to its gRPC server) and runs the Get of the calls table (fronts/calls.py)
itself: the same validation, singleflight, ring routing and counters as a
gRPC Get, with no extra hop. A per-box endpoint in the controller was the alternative; the
controller is synchronous and owns no groups, so every request would cost a
thread and a gRPC call to a worker, and one process would carry all of the
box's HTTP traffic. Per worker, HTTP scales with the workers, and a load
balancer can spread requests over the same set of nodes it uses for gRPC.

Answers:

    200  the value (application/octet-stream, exact Content-Length)
    400  bad key or group name (empty, too long)           plain-text reason
    401  a credential is needed (reads = "authenticated")  plain-text reason
    403  the credential lacks the read scope               plain-text reason
    404  unknown group, or the origin has no such key      plain-text reason
    429  rate limited (shares the gRPC port's buckets)     Retry-After header
    503  the origin failed or timed out, or the node has   plain-text reason
         no ring yet or is draining (gRPC: UNAVAILABLE)

`GET /healthz` answers 200 SERVING once the worker holds a ring and 503
NOT_SERVING before that and while it drains (the gRPC health status).
With `[tls]` the API speaks HTTPS with the node's certificate (and requires
client certificates with client_auth), so it is never a clear-text way
around the data port's TLS. Requests are not logged (no access log).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ...cache import errors
from ...rules.auth import Credentials
from ...rules.node_rules import told
from .. import calls
from ..calls import CallContext

if TYPE_CHECKING:
    import ssl

    from ...node.serving import Node
    from ...rules.ratelimit import RateLimiter

log = logging.getLogger(__name__)

# The HTTP status of each error kind (cache/errors.py); protocol/status.py
# maps the same kinds to gRPC codes. A node without a ring yet (NotServing)
# or draining answers 503 as gRPC answers UNAVAILABLE.
STATUS = {
    "invalid_argument": 400,
    "not_found": 404,
    "unavailable": 503,
    "unauthenticated": 401,
    "permission_denied": 403,
    "resource_exhausted": 413,
    "internal": 500,
}


def _text(status: int, reason: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=reason + "\n", content_type="text/plain", headers=headers)


class ConnectionCap:
    """A protocol factory that serves at most `limit` connections at once:
    one over it is closed as it is made, before a byte is read, and counted
    (`on_refused()`). aiohttp has no such knob, and its handlers take no
    new attributes (slots), so each is served through a _Counted wrapper."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int, on_refused: Callable[[], None]) -> None:
        self._factory = factory
        self.limit = limit
        self.open = 0
        self._on_refused = on_refused

    def __call__(self) -> asyncio.Protocol:
        return _Counted(self, self._factory())

    def admit(self) -> bool:
        if self.open >= self.limit:
            self._on_refused()
            return False
        self.open += 1
        return True


class _Counted(asyncio.Protocol):
    """Passes a connection's events to aiohttp's handler if the cap admits it."""

    def __init__(self, cap: ConnectionCap, inner: asyncio.Protocol) -> None:
        self._cap, self._inner = cap, inner
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._cap.admit():
            transport.close()  # the handler never sees it
            return
        self._admitted = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self._cap.open -= 1
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _CappedSite(web.BaseSite):
    """aiohttp's TCPSite, serving through a ConnectionCap."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, ssl_context: ssl.SSLContext | None, cap: ConnectionCap
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port, self._cap = host, port, cap
        self.port = port

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = await asyncio.get_running_loop().create_server(
            self._cap, self._host, self._port, ssl=self._ssl_context, reuse_address=True
        )
        self._server = server
        self.port = server.sockets[0].getsockname()[1]


class HttpApi:
    name = "HTTP API"

    def __init__(
        self,
        node: Node,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limiter: RateLimiter | None = None,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_refused()`: a connection over ops.http_max_connections was closed."""
        self.on_refused = on_refused
        self.node = node
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.limiter = limiter
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/groups/{group}/keys/{key:.*}", self.get_value)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def start(self) -> int:
        """Bind and serve; the port bound (useful with port 0)."""
        # No access log (a line per request); a stop gives requests in
        # flight the same grace as gRPC calls (the peer timeout).
        grace = float(self.node.settings.node.peer_timeout)
        # An idle keep-alive connection is closed after http_idle_timeout: it
        # holds a file descriptor this process shares with the data port.
        runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=grace,
            keepalive_timeout=float(self.node.settings.ops.http_idle_timeout),
        )
        await runner.setup()
        server = runner.server
        assert server is not None  # made by setup()
        cap = ConnectionCap(server, self.node.settings.ops.http_max_connections, self.on_refused)
        site = _CappedSite(runner, self.host, self.port, self.ssl_context, cap)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = site.port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def get_value(self, request: web.Request) -> web.Response:
        if self.limiter is not None:
            wait = self.limiter.admit(request.remote or "", protocol="http")
            if wait:
                return _text(429, f"rate limit exceeded; retry in {wait:.3f}s", {"Retry-After": str(math.ceil(wait))})
        group_name = request.match_info["group"]
        key = request.match_info["key"]
        rules = self.node.rules
        credentials = Credentials(request.headers.get("Authorization"))
        ctx = CallContext(credentials, False, None, request.remote or "")
        try:
            entry = await calls.run(calls.GET, rules, calls.Key(group_name, key), ctx)
        except errors.CacheError as exc:
            status = STATUS[exc.kind]
            if isinstance(exc, errors.KeyNotFound):
                reason = f"key {key!r} not found in group {group_name!r}"
            else:
                exc = told(exc, rules.shows_cause(credentials))
                reason = str(exc) or exc.reason
            return _text(status, reason)
        except Exception as exc:  # a bug: answer 500 and keep serving
            log.exception("HTTP get %s/%r failed", group_name, key[:64])
            return _text(500, f"internal error: {type(exc).__name__}")
        return web.Response(body=entry.value, content_type="application/octet-stream")

    async def healthz(self, request: web.Request) -> web.Response:
        if self.node.serving:
            return _text(200, "SERVING")
        return _text(503, "NOT_SERVING")
