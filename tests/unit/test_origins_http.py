"""HTTP origin against a real aiohttp.web server on 127.0.0.1 (same event loop)."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import unquote

import pytest
from aiohttp import web

from appliance.cache.errors import KeyNotFound, OriginError
from appliance.config import GroupSettings
from appliance.origins import build_origin


class Server:
    """Routes on the first raw path segment; the key is the second, still encoded."""

    def __init__(self) -> None:
        self.requests = 0
        self.raw_keys: list[str] = []
        self.peers: set[tuple] = set()
        self.headers: list[dict[str, str]] = []
        self.current = 0
        self.max_current = 0
        self.flaky_fail = 1  # number of 500s /flaky answers before it recovers
        self.release = asyncio.Event()  # set at teardown: slow handlers finish
        self.port = 0
        self.redirect_to = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.peers.add(request.transport.get_extra_info("peername"))
        self.headers.append(dict(request.headers))
        _, kind, raw_key = request.raw_path.split("/", 2)
        self.raw_keys.append(raw_key)
        key = unquote(raw_key)
        self.current += 1
        self.max_current = max(self.max_current, self.current)
        try:
            if kind == "kv":
                if key.startswith("missing"):
                    return web.Response(status=404, text="no such key")
                return web.Response(body=("value:" + key).encode())
            if kind == "fail":
                return web.Response(status=500, text="database is down")
            if kind == "flaky":
                if self.flaky_fail > 0:
                    self.flaky_fail -= 1
                    return web.Response(status=500, text="flaky")
                return web.Response(body=b"ok")
            if kind == "slow":  # hold the request (bounded) to measure concurrency
                try:
                    await asyncio.wait_for(self.release.wait(), float(key))
                except TimeoutError:
                    pass
                return web.Response(body=b"slow:" + key.encode())
            if kind == "big":
                return web.Response(body=b"b" * int(key))
            if kind == "bigstream":  # no Content-Length: the cap must hold while streaming
                resp = web.StreamResponse()
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                for _ in range(int(key)):
                    await resp.write(b"s" * 1000)
                await resp.write_eof()
                return resp
            if kind == "redirect":
                raise web.HTTPFound(self.redirect_to)
            if kind == "header":
                return web.Response(body=request.headers.get(key, "<absent>").encode())
            return web.Response(status=400, text="unknown route")
        finally:
            self.current -= 1


@pytest.fixture
async def server():
    srv = Server()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", srv.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.port = site._server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        srv.release.set()
        await runner.cleanup()


@pytest.fixture
async def make(server, tmp_path):
    made = []

    def _make(route="kv", max_value_bytes=1 << 16, **kw):
        kw.setdefault("timeout", 2.0)
        spec = GroupSettings(origin=f"http://127.0.0.1:{server.port}/{route}/{{key}}", **kw)
        o = build_origin("web", spec, state_dir=tmp_path, max_value_bytes=max_value_bytes)
        made.append(o)
        return o

    yield _make
    for o in made:
        await o.close()


async def test_200_and_404(make):
    o = make()
    assert await o.load("a") == b"value:a"
    with pytest.raises(KeyNotFound):
        await o.load("missing-1")


async def test_keys_are_url_encoded(make, server):
    o = make()
    keys = ["with space", "a/b/../c", "张三", "q?x=1&y#frag", "%41", "plus+sign", "..", ".", "v1.2"]
    for k in keys:
        assert await o.load(k) == ("value:" + k).encode()
    assert server.raw_keys == [
        "with%20space",
        "a%2Fb%2F%2E%2E%2Fc",
        "%E5%BC%A0%E4%B8%89",
        "q%3Fx%3D1%26y%23frag",
        "%2541",
        "plus%2Bsign",
        "%2E%2E",  # not a dot-segment: the request stays under /kv/
        "%2E",
        "v1%2E2",
    ]


async def test_a_redirect_is_not_followed_with_the_origins_headers(make, server):
    """An origin that answers 302 towards another host does not get the
    origin's (secret) headers sent there: no redirect is followed."""
    elsewhere = Server()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", elsewhere.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        o = make("redirect", headers={"X-Api-Key": "s3cret-key"})
        server.redirect_to = f"http://127.0.0.1:{port}/header/X-Api-Key"
        with pytest.raises(OriginError, match="HTTP 302 .*redirect: not followed"):
            await o.load("k")
        assert server.requests == 1 and elsewhere.requests == 0
    finally:
        await runner.cleanup()


async def test_key_in_the_host_is_refused():
    from pydantic import ValidationError

    from appliance.origins.http import HttpOrigin

    with pytest.raises(ValidationError, match="not in its host"):  # by the config
        GroupSettings(origin="http://{key}.example.com/items", timeout="1s")
    with pytest.raises(ValueError, match="not in its host"):  # and by the origin itself
        HttpOrigin(
            "web",
            "http://api-{key}.example.com/items",
            timeout=1,
            headers={},
            headers_from_env={},
            max_value_bytes=100,
        )


async def test_500_is_origin_error_with_reason(make):
    with pytest.raises(
        OriginError, match="group web: origin answered HTTP 500: Internal Server Error: database is down"
    ):
        await make("fail").load("k")


async def test_failure_is_not_sticky(make, server):
    o = make("flaky")
    with pytest.raises(OriginError, match="HTTP 500"):
        await o.load("k")
    assert server.requests == 1
    assert await o.load("k") == b"ok"
    assert server.requests == 2


async def test_connections_are_reused(make, server):
    o = make()
    for i in range(20):
        if i % 4 == 3:  # error answers keep the connection too
            with pytest.raises(KeyNotFound):
                await o.load(f"missing-{i}")
        else:
            assert await o.load(f"k{i}") == f"value:k{i}".encode()
    assert server.requests == 20
    assert len(server.peers) == 1, server.peers


async def test_timeout(make, server):
    o = make("slow", timeout=0.2)
    started = time.monotonic()
    with pytest.raises(OriginError, match=r"group web: origin timed out after 0\.2s"):
        await o.load("3")  # the server holds it for at most 3 s
    assert time.monotonic() - started < 1.5
    # and the origin still works afterwards
    assert await make("kv").load("after") == b"value:after"


async def test_concurrency_limit(make, server):
    o = make("slow", max_concurrent_loads=2, timeout=5.0)
    results = await asyncio.gather(*(o.load("0.1") for _ in range(6)))
    assert results == [b"slow:0.1"] * 6
    assert server.max_current == 2


async def test_oversized_body(make, server):
    o = make("big", max_value_bytes=1000)
    assert await o.load("1000") == b"b" * 1000
    with pytest.raises(OriginError, match="group web: response larger than 1000 bytes"):
        await o.load("5000000")  # refused on Content-Length, not read
    s = make("bigstream", max_value_bytes=1000)
    with pytest.raises(OriginError, match="response larger than 1000 bytes"):
        await s.load("5000")


async def test_headers_static_and_from_env(make, server, monkeypatch):
    monkeypatch.setenv("ORIGIN_TEST_TOKEN", "s3cret-token")
    o = make("header", headers={"X-Static": "static-value"}, headers_from_env={"X-Token": "ORIGIN_TEST_TOKEN"})
    assert await o.load("X-Token") == b"s3cret-token"
    assert await o.load("X-Static") == b"static-value"
    assert "s3cret-token" not in repr(o)


async def test_missing_env_var_is_value_error_at_build(server, tmp_path, monkeypatch):
    monkeypatch.delenv("ORIGIN_TEST_ABSENT", raising=False)
    spec = GroupSettings(
        origin=f"http://127.0.0.1:{server.port}/kv/{{key}}", headers_from_env={"Authorization": "ORIGIN_TEST_ABSENT"}
    )
    with pytest.raises(ValueError, match="ORIGIN_TEST_ABSENT is not set"):
        build_origin("web", spec, state_dir=tmp_path, max_value_bytes=100)


async def test_connection_refused_is_origin_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    spec = GroupSettings(origin=f"http://127.0.0.1:{port}/kv/{{key}}", timeout=2.0)
    o = build_origin("web", spec, state_dir=tmp_path, max_value_bytes=100)
    try:
        with pytest.raises(OriginError, match=f"group web: cannot reach origin 127.0.0.1:{port}"):
            await o.load("k")
    finally:
        await o.close()


async def test_close_closes_the_session(make):
    o = make()
    assert await o.load("a") == b"value:a"
    session = o.inner._session
    await o.close()
    assert session.closed
    with pytest.raises(OriginError, match="closed"):
        await o.load("a")
