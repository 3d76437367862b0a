"""Ops surfaces of in-process nodes with real gRPC and HTTP on loopback:
metrics, health, reflection, the HTTP read API, TLS/mTLS, rate limiting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from appliance import tls as tlsmod
from appliance.cache.errors import OriginError
from appliance.config import Settings
from appliance.node.serving import Node
from appliance.ops.box_metrics import BoxCollector, box_registry, serve_metrics
from appliance.pb import admin_pb2, admin_pb2_grpc, groupcache_pb2, groupcache_pb2_grpc
from support.nodes import BACKEND, CountingOrigin
from support.ports import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def make_settings(groups=("g",), *, ops=None, tls=None, **node) -> Settings:
    node.setdefault("host", "127.0.0.1")
    node.setdefault("server", BACKEND["server"])
    return Settings(
        node=node,
        groups={name: {"origin": "python:tests.none:f", "cache_bytes": "1MiB"} for name in groups},
        cluster={"embedded_etcd": False},
        ops={"metrics_addr": "", **(ops or {})},
        tls=tls or {},
    )


@contextlib.asynccontextmanager
async def nodes(n, loader, *, groups=("g",), admin_dir=None, http=False, ring=True, settings=None, token=None, **kw):
    s = settings or make_settings(groups, **kw)
    started = []
    try:
        for i in range(n):
            admin = f"unix:{admin_dir}/n{i}.sock" if admin_dir else None
            started.append(
                Node(
                    s,
                    {g: loader for g in groups},
                    port=0,
                    admin_address=admin,
                    http_port=0 if http else None,
                    token=token,
                )
            )
            await started[-1].start()
        if ring:
            peers = [x.addr for x in started]
            for x in started:
                x.set_peers(peers, 1)
        yield started
    finally:
        await asyncio.gather(*(x.stop(0) for x in started), return_exceptions=True)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed, name, **labels) -> float:
    return parsed[(name, frozenset(labels.items()))]


async def get(addr, group, key, *, credentials=None, metadata=None, timeout=5.0, options=None):
    channel = (
        grpc.aio.secure_channel(addr, credentials, options=options)
        if credentials is not None
        else grpc.aio.insecure_channel(addr, options=options)
    )
    async with channel:
        stub = groupcache_pb2_grpc.GroupCacheStub(channel)
        reply = await stub.Get(groupcache_pb2.GetRequest(group=group, key=key), timeout=timeout, metadata=metadata)
        return reply.value


# Metrics -----------------------------------------------------------------------


@pytest.mark.usefixtures("backend")
async def test_admin_metrics_counts_exactly_and_box_endpoint_labels_workers(tmp_path):
    origin = CountingOrigin({"k": b"value", **{f"x{i}": b"x" for i in range(20)}})
    async with nodes(3, origin, admin_dir=tmp_path) as ns:
        owner = next(n for n in ns if n.addr == ns[0].peers.owner("k"))
        for _ in range(100):
            assert await get(owner.addr, "g", "k") == b"value"
        missing = next(f"missing{i}" for i in range(1000) if owner.peers.owner(f"missing{i}") == owner.addr)
        with pytest.raises(grpc.aio.AioRpcError):
            await get(owner.addr, "g", missing)
        # The worker's own registry over its admin socket.
        async with grpc.aio.insecure_channel(f"unix:{tmp_path}/n{ns.index(owner)}.sock") as ch:
            reply = await admin_pb2_grpc.AdminStub(ch).Metrics(admin_pb2.MetricsRequest(), timeout=5)
        assert reply.addr == owner.addr
        m = samples(reply.text)
        assert value(m, "groupcache_gets_total", group="g") == 101
        assert value(m, "groupcache_loads_total", group="g") == 2
        assert value(m, "groupcache_hits_total", group="g", cache="main") == 99
        assert value(m, "groupcache_hits_total", group="g", cache="hot") == 0
        assert value(m, "groupcache_origin_loads_total", group="g", result="ok") == 1
        assert value(m, "groupcache_origin_loads_total", group="g", result="not_found") == 1
        assert value(m, "groupcache_cache_items", group="g", cache="main") == 1
        assert value(m, "groupcache_cache_bytes", group="g", cache="main") == len("k") + len("value")
        assert value(m, "groupcache_ring_revision") == 1 and value(m, "groupcache_ring_peers") == 3
        shares = owner.peers.ring.shares()
        assert sum(value(m, "groupcache_ring_share", peer=a) for a in shares) == pytest.approx(1.0)
        assert value(m, "groupcache_ring_share", peer=owner.addr) == pytest.approx(shares[owner.addr])

        # The box endpoint: every worker, re-labelled, over real HTTP.
        collector = BoxCollector(lambda: sorted(str(p) for p in tmp_path.glob("n*.sock")))
        port = free_port()
        stop = await asyncio.to_thread(serve_metrics, f"127.0.0.1:{port}", box_registry(collector))
        try:

            def scrape():
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return r.read().decode()

            box = samples(await asyncio.to_thread(scrape))
        finally:
            await asyncio.to_thread(stop)
            collector.close()
        for n in ns:
            assert value(box, "groupcache_worker_up", worker=n.addr) == 1
            assert value(box, "groupcache_ring_peers", worker=n.addr) == 3
        assert value(box, "groupcache_gets_total", worker=owner.addr, group="g") == 101
        assert value(box, "groupcache_hits_total", worker=owner.addr, group="g", cache="main") == 99
        others = [n for n in ns if n is not owner]
        assert all(value(box, "groupcache_gets_total", worker=n.addr, group="g") == 0 for n in others)


async def test_the_metrics_endpoint_bounds_connections_and_asks_workers_once_a_second(tmp_path):
    """A flood of scrapes or of idle connections costs bounded threads and
    at most one round of worker calls a second (a thread per connection and
    a worker round per scrape before)."""
    import socket
    import threading

    async with nodes(1, CountingOrigin({"k": b"v"}), admin_dir=tmp_path) as (node,):
        refused = [0]
        collector = BoxCollector(
            lambda: sorted(str(p) for p in tmp_path.glob("n*.sock")),
            min_interval=60,
            refusals=lambda: {"metrics_connections": refused[0]},
        )
        port = free_port()
        stop = await asyncio.to_thread(
            serve_metrics,
            f"127.0.0.1:{port}",
            box_registry(collector),
            max_connections=3,
            idle_timeout=30,
            on_refused=lambda: refused.__setitem__(0, refused[0] + 1),
        )

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()

        held = []
        try:
            first = samples(await asyncio.to_thread(scrape))
            assert value(first, "groupcache_gets_total", worker=node.addr, group="g") == 0
            assert await get(node.addr, "g", "k") == b"v"
            # Within min_interval a scrape shares the last round: the workers are not asked again.
            again = samples(await asyncio.to_thread(scrape))
            assert value(again, "groupcache_gets_total", worker=node.addr, group="g") == 0
            before = threading.active_count()
            for _ in range(3):  # idle connections take every slot ...
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            deadline = time.monotonic() + 5
            while threading.active_count() < before + 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            extra = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
            try:
                for s in extra:  # ... so more are closed at once, with no thread of their own
                    assert s.recv(1) == b""
                assert threading.active_count() <= before + 3
            finally:
                for s in extra:
                    s.close()
            for s in held:
                s.close()
            held = []
            # A slot is free once its thread sees the close (it releases the
            # slot before it ends): a scrape before then is refused too.
            deadline = time.monotonic() + 5
            while threading.active_count() > before and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            # Each refused connection is counted, and a scrape says so.
            counted = samples(await asyncio.to_thread(scrape))
            assert value(counted, "groupcache_box_refusals_total", limit="metrics_connections") == 20
        finally:
            for s in held:
                s.close()
            await asyncio.to_thread(stop)
            collector.close()


@pytest.mark.usefixtures("backend")
async def test_box_collector_reports_a_dead_worker_as_down(tmp_path):
    (tmp_path / "worker-7.sock").touch()  # a socket nobody listens on
    collector = BoxCollector(
        lambda: [str(tmp_path / "worker-7.sock")], fallback_label=lambda p: "127.0.0.1:7", timeout=1
    )
    families = {f.name: f for f in await asyncio.to_thread(lambda: list(collector.collect()))}
    assert [(s.labels, s.value) for s in families["groupcache_worker_up"].samples] == [({"worker": "127.0.0.1:7"}, 0)]
    collector.close()


# Health and reflection ---------------------------------------------------------


@pytest.mark.usefixtures("backend")
async def test_health_not_serving_until_ring_then_serving_then_not_serving_while_draining():
    async with nodes(1, CountingOrigin({"k": b"v"}), ring=False) as (node,):
        async with grpc.aio.insecure_channel(node.addr) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            check = lambda service="": health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)  # noqa: E731
            assert (await check()).status == NOT_SERVING
            node.set_peers([node.addr], 1)
            for service in ("", "groupcachepb.GroupCache"):
                deadline = time.monotonic() + 5
                while (await check(service)).status != SERVING:
                    assert time.monotonic() < deadline, "never SERVING"
                    await asyncio.sleep(0.01)
            drain = asyncio.ensure_future(node.drain(10))
            deadline = time.monotonic() + 5
            while (await check()).status != NOT_SERVING:
                assert time.monotonic() < deadline, "never NOT_SERVING"
                await asyncio.sleep(0.01)
            assert (await check("groupcachepb.GroupCache")).status == NOT_SERVING
            node.set_peers([], 2)  # the ring without us ends the drain
            assert await asyncio.wait_for(drain, 5) is True


@pytest.mark.usefixtures("backend")
async def test_health_watch_follows_the_status_and_ends_when_the_node_stops():
    async with nodes(1, CountingOrigin({"k": b"v"}), ring=False) as (node,):
        async with grpc.aio.insecure_channel(node.addr) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="groupcachepb.GroupCache"), timeout=30)
            seen = [(await watch.read()).status]
            node.set_peers([node.addr], 1)
            seen.append((await asyncio.wait_for(watch.read(), 5)).status)
            unknown = health.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
            assert (await asyncio.wait_for(unknown.read(), 5)).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # A stop ends open watches at once instead of waiting out its grace.
            started = time.monotonic()
            await asyncio.wait_for(node.stop(grace=30), 10)
            assert time.monotonic() - started < 5
            last = await asyncio.wait_for(watch.read(), 5)
            assert seen == [NOT_SERVING, SERVING] and last.status == NOT_SERVING
            assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK


@pytest.mark.usefixtures("backend")
async def test_reflection_lists_the_services():
    async with nodes(1, CountingOrigin({"k": b"v"})) as (node,):
        async with grpc.aio.insecure_channel(node.addr) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = []
            async for response in call:
                names = [s.name for s in response.list_services_response.service]
            assert "groupcachepb.GroupCache" in names
            assert {"appliance.cache.Cache", "grpc.health.v1.Health"} <= set(names)
            assert not any("admin" in n.lower() for n in names)


# HTTP read API -----------------------------------------------------------------


@pytest.mark.usefixtures("backend")
async def test_http_get_hit_miss_unknown_group_bad_key_origin_down():
    class Origin(CountingOrigin):
        async def __call__(self, key):
            if key == "boom":
                raise OriginError("database is down")
            return await super().__call__(key)

    big = bytes(range(256)) * 1000
    origin = Origin({"k": b"value", "big": big, "a/b c": "张三".encode(), "键": b"x"})
    token = "r" * 8 + "0123456789abcdef01234567"
    async with nodes(3, origin, http=True, token=token) as ns:
        base = f"http://127.0.0.1:{ns[1].http_api.port}"
        async with aiohttp.ClientSession() as http:

            async def fetch(path, headers=None):
                async with http.get(base + path, headers=headers) as r:
                    return r.status, r.headers, await r.read()

            status, headers, body = await fetch("/groups/g/keys/k")
            assert (status, body) == (200, b"value")
            assert headers["Content-Length"] == "5" and headers["Content-Type"] == "application/octet-stream"
            status, headers, body = await fetch("/groups/g/keys/big")
            assert status == 200 and body == big and int(headers["Content-Length"]) == len(big)
            assert (await fetch("/groups/g/keys/a%2Fb%20c"))[::2] == (200, "张三".encode())
            assert (await fetch("/groups/g/keys/%E9%94%AE"))[::2] == (200, b"x")
            status, headers, body = await fetch("/groups/g/keys/nope")
            assert status == 404 and headers["Content-Type"].startswith("text/plain") and b"not found" in body
            assert int(headers["Content-Length"]) == len(body)
            status, _, body = await fetch("/groups/nogroup/keys/k")
            assert status == 404 and b"group 'nogroup' not found" in body
            status, _, body = await fetch("/groups/g/keys/" + "x" * 251)
            assert status == 400 and b"longer than 250" in body
            assert (await fetch("/groups/g/keys/"))[0] == 400
            status, _, body = await fetch("/groups/g/keys/boom", {"Authorization": f"Bearer {token}"})
            assert status == 503 and b"database is down" in body  # a reader is told the cause
            status, _, body = await fetch("/groups/g/keys/boom")
            assert status == 503 and b"database" not in body and b"the origin failed" in body  # others the kind
            status, _, body = await fetch("/healthz")
            assert (status, body) == (200, b"SERVING\n")
        # Same group logic as gRPC: one origin load for k, counted as gets.
        assert origin.calls.count("k") == 1
        assert sum(n.groups["g"].stats.gets for n in ns) >= 6


@pytest.mark.usefixtures("backend")
async def test_http_and_grpc_answer_a_node_without_a_ring_alike():
    """Before its first ring a node loads nothing (NotServing): gRPC answers
    UNAVAILABLE, so HTTP answers 503, not 500."""
    async with nodes(1, CountingOrigin({"k": b"v"}), http=True, ring=False) as (node,):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{node.http_api.port}/groups/g/keys/k") as r:
                assert r.status == 503, await r.text()
                assert "ring" in await r.text()
            async with http.get(f"http://127.0.0.1:{node.http_api.port}/healthz") as r:
                assert (r.status, await r.text()) == (503, "NOT_SERVING\n")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(node.addr, "g", "k")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# TLS ---------------------------------------------------------------------------


def tls_settings(pki, server, **extra):
    if server == "engine":
        from appliance.fronts import engine_available

        if engine_available():
            pytest.skip(f"the engine is not built here: {engine_available()}")
    return make_settings(server=server, tls={"cert": str(pki.cert), "key": str(pki.key), "ca": str(pki.ca), **extra})


# TLS on each backend that serves it: the engine (rustls; auto picks it where built) and grpcio.
TLS_SERVERS = pytest.mark.parametrize("server", ["grpcio", "engine"])


@TLS_SERVERS
async def test_tls_right_ca_succeeds_no_or_wrong_ca_fails_admin_not_on_data_port(pki, tmp_path, server):
    data = {f"k{i}": f"v{i}".encode() for i in range(30)}
    async with nodes(3, CountingOrigin(data), settings=tls_settings(pki, server), admin_dir=tmp_path) as ns:
        good = tlsmod.credentials_from_files(ca=pki.ca)
        # Every key through node 0: the owners answer node 0 over TLS too.
        for k, v in data.items():
            assert await get(ns[0].addr, "g", k, credentials=good) == v
        assert ns[0].groups["g"].stats.peer_loads > 0 and ns[0].groups["g"].stats.peer_errors == 0
        assert {n.backend for n in ns} == {server}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(ns[0].addr, "g", "k1", timeout=2)  # plain text to a TLS port
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(ns[0].addr, "g", "k1", credentials=tlsmod.credentials_from_files(ca=pki.other_ca), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The admin service does not exist on the data port.
        async with grpc.aio.secure_channel(ns[0].addr, good) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin_pb2_grpc.AdminStub(ch).SetPeers(admin_pb2.SetPeersRequest(peers=[], revision=99), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin_pb2_grpc.AdminStub(ch).Metrics(admin_pb2.MetricsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert ns[0].peers.revision == 1


@pytest.mark.parametrize("engine", [True, False], ids=["engine-client", "grpc-client"])
async def test_clients_dial_mtls_on_either_call_library(pki, engine):
    """Client and AsyncClient over mTLS on the engine's client (rustls, from
    the files appliance.tls remembers) and on grpc's: the same values, and
    the same refusal without a client certificate."""
    from appliance.cache.errors import PeerError
    from appliance.client import AsyncClient, Client
    from appliance.peering import engine_channel

    if engine and engine_channel.usable():
        pytest.skip(f"the engine's client is not built here: {engine_channel.usable()}")
    data = {f"k{i}": f"v{i}".encode() for i in range(12)}
    async with nodes(2, CountingOrigin(data), settings=tls_settings(pki, "grpcio", client_auth=True)) as ns:
        peers = [n.addr for n in ns]
        with_cert = tlsmod.credentials_from_files(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        sync = Client(peers, credentials=with_cert, engine=engine)
        try:
            assert sync.engine is engine
            for k, v in data.items():
                assert await asyncio.to_thread(sync.get, "g", k) == v
        finally:
            sync.close()
        async with AsyncClient(peers, credentials=with_cert, engine=engine) as c:
            assert c.engine is engine
            assert await c.get_many("g", list(data)) == data
        no_cert = tlsmod.credentials_from_files(ca=pki.ca)
        async with AsyncClient(peers, credentials=no_cert, engine=engine, timeout=2) as c:
            with pytest.raises(PeerError):
                await c.get("g", "k1")
        other_ca = tlsmod.credentials_from_files(ca=pki.other_ca, cert=pki.client_cert, key=pki.client_key)
        with Client(peers, credentials=other_ca, engine=engine, timeout=2) as c:
            with pytest.raises(PeerError):
                await asyncio.to_thread(c.get, "g", "k1")
    if engine:
        system_roots = tlsmod.credentials_from_files()  # the engine's client reads no system roots
        with pytest.raises(ValueError, match="system's roots"):
            Client(peers, credentials=system_roots, engine=True)
        assert Client(peers, credentials=system_roots).engine is False


@TLS_SERVERS
async def test_mtls_requires_a_client_certificate_from_the_ca(pki, server):
    data = {f"k{i}": b"v" for i in range(20)}
    async with nodes(2, CountingOrigin(data), settings=tls_settings(pki, server, client_auth=True), http=True) as ns:
        assert {n.backend for n in ns} == {server}
        with_cert = tlsmod.credentials_from_files(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        for k in data:  # peers present the node certificate to each other
            assert await get(ns[0].addr, "g", k, credentials=with_cert) == b"v"
        assert ns[0].groups["g"].stats.peer_errors == 0
        for creds in (
            tlsmod.credentials_from_files(ca=pki.ca),  # no client certificate
            tlsmod.credentials_from_files(ca=pki.ca, cert=pki.other_cert, key=pki.other_key),  # wrong CA
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await get(ns[0].addr, "g", "k1", credentials=creds, timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The HTTP API speaks HTTPS with the same rules.
        import ssl

        url = f"https://127.0.0.1:{ns[0].http_api.port}/groups/g/keys/k1"
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        async with aiohttp.ClientSession() as http:
            async with http.get(url, ssl=ctx) as r:
                assert (r.status, await r.read()) == (200, b"v")
            with pytest.raises(aiohttp.ClientError):
                async with http.get(url, ssl=ssl.create_default_context(cafile=str(pki.ca))) as r:
                    await r.read()


# Rate limiting -----------------------------------------------------------------


def details_of(err: grpc.aio.AioRpcError):
    for k, v in err.trailing_metadata() or ():
        if k == "grpc-status-details-bin":
            st = status_pb2.Status.FromString(v)
            out = {}
            for d in st.details:
                for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                    msg = cls()
                    if d.Unpack(msg):
                        out[cls.__name__] = msg
            return out
    return {}


@pytest.mark.usefixtures("backend")
async def test_rate_limit_past_the_burst_then_recovers():
    ops = {"rate_limit": 4, "rate_burst": 5}  # slow refill: robust on a loaded machine
    async with nodes(1, CountingOrigin({"k": b"v"}), ops=ops, http=True) as (node,):
        async with grpc.aio.insecure_channel(node.addr) as ch:
            stub = groupcache_pb2_grpc.GroupCacheStub(ch)
            req = groupcache_pb2.GetRequest(group="g", key="k")
            outcomes = []
            for _ in range(8):
                try:
                    await stub.Get(req, timeout=5)
                    outcomes.append("ok")
                except grpc.aio.AioRpcError as err:
                    outcomes.append(err)
            assert outcomes[:5] == ["ok"] * 5  # the burst
            limited = [o for o in outcomes if not isinstance(o, str)]
            assert limited, outcomes
            err = limited[0]
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit" in err.details()
            d = details_of(err)
            assert d["ErrorInfo"].reason == "RATE_LIMITED"
            delay = d["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
            assert 0 < delay <= 1 / 4 + 0.001
            # Health is not limited.
            health = health_pb2_grpc.HealthStub(ch)
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == SERVING
            # After the advertised delay a token is there again.
            await asyncio.sleep(delay)
            assert (await stub.Get(req, timeout=5)).value == b"v"
            # The HTTP API shares the buckets: 429 with Retry-After.
            async with aiohttp.ClientSession() as http:
                codes = []
                for _ in range(8):
                    async with http.get(f"http://127.0.0.1:{node.http_api.port}/groups/g/keys/k") as r:
                        codes.append(r.status)
                        if r.status == 429:
                            assert r.headers["Retry-After"] == "1"
                assert 429 in codes
        m = samples(node.metrics.exposition())
        assert value(m, "groupcache_rate_limited_total", protocol="grpc") == len(limited)
        assert value(m, "groupcache_rate_limited_total", protocol="http") == codes.count(429)


@pytest.mark.usefixtures("backend")
async def test_a_getmany_costs_a_token_per_distinct_key():
    """A GetMany does what as many Gets would: 20 distinct keys take 20
    tokens of a burst of 5 (it goes ahead, in debt), so the next call is
    refused; a key named twice costs once."""
    from appliance.pb import cache_pb2, cache_pb2_grpc

    ops = {"rate_limit": 1, "rate_burst": 5}  # 1 token/s: the debt outlasts the test
    async with nodes(1, CountingOrigin({f"k{i}": b"v" for i in range(20)}), ops=ops) as (node,):
        async with grpc.aio.insecure_channel(node.addr) as ch:
            many = cache_pb2_grpc.CacheStub(ch).GetMany
            reply = await many(cache_pb2.GetManyRequest(group="g", keys=[f"k{i}" for i in range(20)]), timeout=5)
            assert [r.value for r in reply.results] == [b"v"] * 20
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await groupcache_pb2_grpc.GroupCacheStub(ch).Get(
                    groupcache_pb2.GetRequest(group="g", key="k1"), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Duplicates are one key: 3 calls naming one key 10 times each fit a burst of 5.
    async with nodes(1, CountingOrigin({"k": b"v"}), ops=ops) as (node,):
        async with grpc.aio.insecure_channel(node.addr) as ch:
            many = cache_pb2_grpc.CacheStub(ch).GetMany
            for _ in range(3):
                reply = await many(cache_pb2.GetManyRequest(group="g", keys=["k"] * 10), timeout=5)
                assert [r.value for r in reply.results] == [b"v"] * 10


@pytest.mark.usefixtures("backend")
async def test_forwarded_calls_are_exempt_only_from_ring_members():
    ops = {"rate_limit": 1, "rate_burst": 1}
    forwarded = (("x-groupcache-forwarded", "1"),)
    async with nodes(2, CountingOrigin({f"k{i}": b"v" for i in range(40)}), ops=ops) as (a, b):
        # Peers forward to each other from 127.0.0.1, a ring member: never limited.
        for i in range(40):
            await b.groups["g"].get(f"k{i}")
        assert b.groups["g"].stats.peer_errors == 0 and b.groups["g"].stats.peer_loads > 0
        for _ in range(5):
            assert await get(a.addr, "g", "k1", metadata=forwarded) == b"v"
        # A ring of other hosts: the same header from 127.0.0.1 buys nothing.
        a.set_peers(["192.0.2.1:9999", "192.0.2.2:9999"], 2)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            for _ in range(3):
                await get(a.addr, "g", "k1", metadata=forwarded)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.usefixtures("backend")
async def test_peer_calls_are_charged_from_outside_the_ring():
    """Peek (and Handoff) are free from ring members' addresses and take a
    token from anyone else's: a flood of Peeks was never limited."""
    from appliance.pb import cache_pb2, cache_pb2_grpc

    ops = {"rate_limit": 1, "rate_burst": 2}
    async with nodes(1, CountingOrigin({"k": b"v"}), ops=ops) as (node,):
        async with grpc.aio.insecure_channel(node.addr) as ch:
            peek = cache_pb2_grpc.PeerStub(ch).Peek
            for _ in range(5):  # from 127.0.0.1, the ring's own address
                await peek(cache_pb2.PeekRequest(group="g", key="k"), timeout=5)
            node.set_peers(["192.0.2.1:9999", "192.0.2.2:9999"], 2)  # a ring of other hosts
            with pytest.raises(grpc.aio.AioRpcError) as info:
                for _ in range(4):
                    await peek(cache_pb2.PeekRequest(group="g", key="k"), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.usefixtures("backend")
async def test_with_a_cluster_token_only_a_proven_peer_goes_free_from_the_rings_own_address():
    """On one box every client shares the ring's address (127.0.0.1): the
    forwarded marker, a Peek or a Forward stream from there goes free only
    with a proof of the cluster token, and is charged like any call without."""
    from appliance.pb import cache_pb2, cache_pb2_grpc

    token = "rate-limit-test-cluster-token-0123456789"
    ops = {"rate_limit": 1, "rate_burst": 2}
    forwarded = (("x-groupcache-forwarded", "1"),)
    async with nodes(1, CountingOrigin({"k": b"v"}), ops=ops, token=token) as (node,):

        def proven():
            return (*forwarded, ("authorization", node.rules.auth.proofs.make(node.addr)[0]))

        async with grpc.aio.insecure_channel(node.addr) as ch:
            peek = cache_pb2_grpc.PeerStub(ch).Peek
            for _ in range(6):  # a peer's calls: free
                assert await get(node.addr, "g", "k", metadata=proven()) == b"v"
                await peek(cache_pb2.PeekRequest(group="g", key="k"), timeout=5, metadata=proven())
            refused = []
            for call in (
                lambda: get(node.addr, "g", "k", metadata=forwarded),
                lambda: peek(cache_pb2.PeekRequest(group="g", key="k"), timeout=5),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    for _ in range(4):
                        await call()
                refused.append(info.value.code())
            assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
            if node.backend != "grpcio":
                return  # Forward streams go to grpc.aio on every backend: one run is enough

            async def forward(metadata=None):
                stream = cache_pb2_grpc.PeerStub(ch).Forward(timeout=5, metadata=metadata)
                for i in range(4):
                    await stream.write(cache_pb2.ForwardRequest(id=i + 1, group="g", key="k", timeout=2))
                await stream.done_writing()
                return [r.reason for r in [r async for r in stream]]

            assert await forward(proven()) == [""] * 4  # a peer's stream: free, though the bucket is empty
            assert (await forward()).count("RATE_LIMITED") >= 3  # anyone else's: each Get takes a token


# Logs --------------------------------------------------------------------------


@pytest.mark.usefixtures("backend")
async def test_no_log_line_per_request_at_info(caplog):
    origin = CountingOrigin({"k": b"v"})
    async with nodes(2, origin, http=True) as ns:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            for n in ns:
                for _ in range(50):
                    assert await get(n.addr, "g", "k") == b"v"
                    with pytest.raises(grpc.aio.AioRpcError):
                        await get(n.addr, "g", "nope")
            async with aiohttp.ClientSession() as http:
                for _ in range(20):
                    async with http.get(f"http://127.0.0.1:{ns[0].http_api.port}/groups/g/keys/k") as r:
                        assert r.status == 200
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []


async def test_stats_json_and_metrics_report_the_same_counts():
    """`appliance stats --json` (the node rules' stats) and /metrics read the
    same counters: after traffic of every kind (hits, misses, loads on the
    owner, forwards, a missing key, a failing origin), every counter of one
    equals its series in the other, and none is zero."""

    class Origin(CountingOrigin):
        async def __call__(self, key):
            if key.startswith("boom"):
                raise OriginError("down")
            return await super().__call__(key)

    origin = Origin({f"k{i}": b"v" for i in range(20)})
    async with nodes(2, origin) as (a, b):
        for node in (a, b):
            for i in range(20):
                for _ in range(2):
                    assert await get(node.addr, "g", f"k{i}") == b"v"
        for key in ("missing", "boom"):
            with pytest.raises(grpc.aio.AioRpcError):
                await get(a.addr, "g", key)
        for node in (a, b):
            stats = json.loads(json.dumps(node.rules.stats()))["groups"]["g"]
            m = samples(node.metrics.exposition())
            series = {
                "gets": value(m, "groupcache_gets_total", group="g"),
                "main_hits": value(m, "groupcache_hits_total", group="g", cache="main"),
                "hot_hits": value(m, "groupcache_hits_total", group="g", cache="hot"),
                "loads": value(m, "groupcache_loads_total", group="g"),
                "loads_deduped": value(m, "groupcache_loads_deduped_total", group="g"),
                "peer_loads": value(m, "groupcache_peer_loads_total", group="g"),
                "peer_errors": value(m, "groupcache_peer_errors_total", group="g"),
                "server_requests": value(m, "groupcache_server_requests_total", group="g"),
                "local_loads": value(m, "groupcache_origin_loads_total", group="g", result="ok"),
                "not_found": value(m, "groupcache_origin_loads_total", group="g", result="not_found"),
                "local_load_errs": value(m, "groupcache_origin_loads_total", group="g", result="error"),
                "main_bytes": value(m, "groupcache_cache_bytes", group="g", cache="main"),
                "main_items": value(m, "groupcache_cache_items", group="g", cache="main"),
                "hot_items": value(m, "groupcache_cache_items", group="g", cache="hot"),
                "cache_bytes": value(m, "groupcache_cache_limit_bytes", group="g"),
            }
            assert {k: stats[k] for k in series} == series
        both = [json.loads(json.dumps(n.rules.stats()))["groups"]["g"] for n in (a, b)]
        # The traffic reached every counter compared above, on some node.
        for k in ("gets", "main_hits", "loads", "loads_deduped", "peer_loads", "server_requests", "local_loads"):
            assert sum(st[k] for st in both) > 0, k
        assert sum(st["not_found"] for st in both) == 1 and sum(st["local_load_errs"] for st in both) == 1


# Message sizes -----------------------------------------------------------------


@pytest.mark.usefixtures("backend")
async def test_message_limits_follow_max_value_bytes_on_both_sides():
    from appliance.cache.errors import PeerError
    from appliance.client import Client, settings_kwargs

    s = make_settings(max_value_bytes="6MiB")
    five = b"5" * (5 * 1024 * 1024)
    async with nodes(2, CountingOrigin({f"k{i}": five for i in range(10)}), settings=s) as ns:
        peers = [n.addr for n in ns]
        # A client configured from the same settings takes 5 MiB values,
        # forwarded between the peers (whose channels allow them too).
        with Client(peers, **settings_kwargs(s)) as c:
            for i in range(10):
                assert await asyncio.to_thread(c.get, "g", f"k{i}") == five
        assert sum(n.groups["g"].stats.peer_errors for n in ns) == 0
        # grpc's default 4 MiB limit on a client refuses them.
        with Client(peers, max_message_bytes=4 * 1024 * 1024) as c:
            with pytest.raises(PeerError, match="RESOURCE_EXHAUSTED"):
                await asyncio.to_thread(c.get, "g", "k1")


async def test_http_api_connections_over_the_cap_are_closed_unread_and_counted():
    """ops.http_max_connections: held connections up to the cap are served;
    more are closed at accept, before a byte is read, and counted; once one
    is released, a new connection is served again (aiohttp kept them all)."""
    cap = 4
    s = make_settings(ops={"http_max_connections": cap})
    async with nodes(1, CountingOrigin({"k": b"v"}), http=True, settings=s) as (node,):
        port = node.http_api.port
        request = b"GET /groups/g/keys/k HTTP/1.1\r\nHost: x\r\n\r\n"

        async def served(reader, writer) -> bool:
            writer.write(request)
            await writer.drain()
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            except (asyncio.IncompleteReadError, ConnectionError):
                return False
            return head.startswith(b"HTTP/1.1 200")

        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        extra = []
        try:
            for reader, writer in held:  # each served, and kept open (keep-alive)
                assert await served(reader, writer)
            extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
            for reader, _ in extra:  # closed by the server without reading or answering
                assert await asyncio.wait_for(reader.read(1), 5) == b""
            m = samples(node.metrics.exposition())
            assert value(m, "groupcache_limit_refusals_total", limit="http_connections") == 10
            reader, writer = held.pop()
            writer.close()
            await writer.wait_closed()
            # The freed slot serves a new connection (the server may see the close a moment later).
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                again = await asyncio.open_connection("127.0.0.1", port)
                extra.append(again)
                if await served(*again):
                    break
                assert asyncio.get_running_loop().time() < deadline, "the freed slot never served"
                await asyncio.sleep(0.05)
        finally:
            for _, writer in held + extra:
                writer.close()


async def test_an_idle_http_api_connection_is_closed_after_its_timeout():
    """A keep-alive connection of the HTTP API that sends nothing more is
    closed after ops.http_idle_timeout (aiohttp's default kept it 75 s)."""
    s = make_settings(ops={"http_idle_timeout": "0.3s"})
    async with nodes(1, CountingOrigin({"k": b"v"}), http=True, settings=s) as (node,):
        reader, writer = await asyncio.open_connection("127.0.0.1", node.http_api.port)
        try:
            writer.write(b"GET /groups/g/keys/k HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.read(1), 5) == b"v"
            # Closed by the server well before this bound (aiohttp's default waits 75 s).
            assert await asyncio.wait_for(reader.read(1), 5) == b""
        finally:
            writer.close()
