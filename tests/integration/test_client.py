"""The Python clients (Client and AsyncClient) against real in-process nodes
over real gRPC, and following the ring in a real etcd."""

import asyncio
import contextlib
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.cache import errors
from appliance.cache.ring import HashRing
from appliance.client import AsyncClient, Client
from appliance.cluster import etcd
from appliance.cluster.controller import Controller
from appliance.config import Settings
from appliance.peering import engine_channel
from support.etcd_server import EtcdServer
from support.nodes import CountingOrigin, cluster
from support.ports import free_port

DATA = {f"k{i}": f"v{i}".encode() for i in range(300)}


class Blocking:
    """A sync Client driven from the test's event loop (where the nodes
    run): every call in a thread, awaited like AsyncClient's."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @property
    def ring(self):
        return self.client.ring

    def __getattr__(self, name):
        method = getattr(self.client, name)

        async def call(*args, **kwargs):
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


# Each client on each call library: the engine's client, and grpc's (the
# fallback where the engine is not built).
KINDS = ["sync", "async", "sync/grpc", "async/grpc"]


def library(kind: str) -> bool:
    """The `engine` argument for a kind; skips an engine kind where it is not built."""
    if kind.endswith("/grpc"):
        return False
    missing = engine_channel.usable()
    if missing:
        pytest.skip(f"the engine's client is not built here: {missing}")
    return True


async def make(kind: str, *args, from_settings=None, **kwargs):
    """A Client ("sync", wrapped in Blocking) or an AsyncClient ("async"),
    started (the ring read), on the engine's client or grpc's ("/grpc")."""
    kwargs.setdefault("engine", library(kind))
    kind = kind.split("/")[0]
    if kind == "sync":
        make = Client.from_settings if from_settings is not None else Client
        first = (from_settings,) if from_settings is not None else args
        return Blocking(await asyncio.to_thread(make, *first, **kwargs))
    client = (
        AsyncClient.from_settings(from_settings, **kwargs)
        if from_settings is not None
        else AsyncClient(*args, **kwargs)
    )
    await client.refresh()
    return client


async def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def ring_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "appliance-client-ring" or t.name.startswith("watch-")]


def ring_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "appliance-client-ring"]


# Static peers -------------------------------------------------------------------


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("kind", KINDS)
async def test_a_client_spreads_a_key_its_owner_says_is_hot(kind):
    """Many clients that each read a key a little: none of them finds it hot,
    its owner does (x-groupcache-hot on its replies), and a client that
    hears so spreads the key's reads over every node."""
    async with cluster(3, CountingOrigin(DATA)) as nodes:
        peers = [n.addr for n in nodes]
        others = await make(kind, peers, spread_hot=False)  # the other clients: always the owner
        c = await make(kind, peers)
        try:
            hot = (c.client if kind.startswith("sync") else c)._router.hot
            hot.threshold = float("inf")  # this client's own reads never make a key hot
            owner = await c.locate("k1")

            def gets() -> dict[str, int]:
                return {n.addr: n.groups["g"].stats.gets for n in nodes}

            for _ in range(40):  # a little: all to the owner, which does not call k1 hot yet
                assert await c.get("g", "k1") == DATA["k1"]
            assert [a for a, n in gets().items() if n] == [owner]
            for _ in range(400):  # the others make k1 hot at its owner
                await others.get("g", "k1")
            before = gets()
            for _ in range(60):
                assert await c.get("g", "k1") == DATA["k1"]
            after = gets()
            spread = {a: after[a] - before[a] for a in peers}
            assert all(n > 0 for n in spread.values()), spread
            assert sum(n.groups["g"].stats.local_loads for n in nodes) == 1  # still loaded once
        finally:
            await c.close()
            await others.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_calls_and_errors(kind):
    origin = CountingOrigin(DATA)
    async with cluster(3, origin) as nodes:
        peers = [n.addr for n in nodes]
        c = await make(kind, peers)
        try:
            assert await c.peers() == sorted(peers)
            assert await c.locate("k1") == nodes[0].peers.owner("k1")  # the nodes' ring
            assert await c.get("g", "k1") == b"v1"
            keys = [f"k{i}" for i in range(40)]
            assert await c.get_many("g", keys + ["nope", "k1"]) == {k: DATA[k] for k in keys}
            assert await c.get_many("g", []) == {}
            change = await c.set("g", "k1", b"w", ttl=30)
            assert change.owner == await c.locate("k1")
            assert await c.get("g", "k1") == b"w"
            removed = await c.remove("g", "k1")
            assert removed.owner == change.owner and all(p.confirmed for p in removed.peers)
            assert await c.get("g", "k1") == b"v1"
            with pytest.raises(errors.KeyNotFound):
                await c.get("g", "nope")
            with pytest.raises(errors.GroupNotFound, match="'nogroup' not found"):
                await c.get("nogroup", "k1")
            with pytest.raises(errors.InvalidRequest, match="key is required"):
                await c.get("g", "")
            # Bad arguments are told apart before anything is sent.
            with pytest.raises(TypeError, match="keys must be a list of str"):
                await c.get_many("g", "k1")
            with pytest.raises(TypeError, match="value must be bytes"):
                await c.set("g", "k1", "text")
            with pytest.raises(ValueError, match="ttl must be"):
                await c.set("g", "k1", b"x", ttl=-1)
            with pytest.raises(TypeError, match="key must be a str"):
                await c.get("g", 1)
            with pytest.raises(ValueError, match="timeout must be"):
                await c.get("g", "k1", timeout=0)
        finally:
            await c.close()
        with pytest.raises(RuntimeError, match="closed"):
            await c.get("g", "k1")


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_bad_constructor_arguments_are_clear(cls):
    with pytest.raises(TypeError, match="not a single str"):
        cls("127.0.0.1:9999")
    with pytest.raises(ValueError, match='expected "host:port"'):
        cls(["127.0.0.1"])
    with pytest.raises(ValueError, match="timeout must be"):
        cls(["127.0.0.1:9999"], timeout=-1)
    with pytest.raises(ValueError, match="not both"):
        cls(["127.0.0.1:9999"], discover=lambda: ["127.0.0.1:9998"])
    with pytest.raises(ValueError, match="unknown ring scheme"):
        cls(["127.0.0.1:9999"], scheme="jump")


async def test_async_client_sends_each_key_to_its_owner_concurrently():
    origin = CountingOrigin(DATA)
    async with cluster(3, origin) as nodes:
        async with AsyncClient([n.addr for n in nodes]) as c:
            keys = list(DATA)[:90]
            values = await asyncio.gather(*(c.get("g", k) for k in keys))
            assert values == [DATA[k] for k in keys]
            for n in nodes:
                stats = n.groups["g"].stats
                owned = [k for k in keys if c.ring.owner(k) == n.addr]
                assert (stats.gets, stats.local_loads, stats.peer_loads) == (len(owned), len(owned), 0)
            # One GetMany per owner, all at once.
            assert await c.get_many("g", list(DATA)[90:200]) == {k: DATA[k] for k in list(DATA)[90:200]}
            assert sum(n.groups["g"].stats.peer_loads for n in nodes) == 0
            assert ring_tasks() == []  # a static list is not followed


@pytest.mark.parametrize("kind", KINDS)
async def test_owner_down_retries_on_another_node(kind):
    async with cluster(3, CountingOrigin(DATA)) as nodes:
        c = await make(kind, [n.addr for n in nodes], timeout=3)
        try:
            victim = nodes[1]
            keys = [k for k in DATA if c.ring.owner(k) == victim.addr][:5]
            await victim.stop(0)
            for k in keys:
                assert await c.get("g", k) == DATA[k]
            assert victim.addr in await c.peers()  # static: the list stays as given
        finally:
            await c.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_timeout_bounds_the_call_and_its_retries(kind):
    origin = CountingOrigin(DATA)
    origin.gate = asyncio.Event()  # every load hangs
    async with cluster(3, origin) as nodes:
        c = await make(kind, [n.addr for n in nodes])
        try:
            started = time.monotonic()
            with pytest.raises(errors.PeerError, match="DEADLINE_EXCEEDED"):
                await c.get("g", "k1", timeout=0.5)
            # Not three tries of 0.5 s each: one deadline for all of them.
            assert time.monotonic() - started < 1.4
            # A deadline over before the first try is a PeerError too, not a bad argument.
            with pytest.raises(errors.PeerError):
                await c.get("g", "k1", timeout=1e-9)
        finally:
            origin.gate.set()
            await c.close()


async def test_async_client_close_leaves_nothing_behind():
    async with cluster(2, CountingOrigin(DATA)) as nodes:
        c = AsyncClient([n.addr for n in nodes])
        assert await c.get("g", "k1") == b"v1"
        channels = [ch for ch, _ in c._pool._live.values()]
        assert len(channels) == 1
        await c.close()
        await c.close()  # twice is fine
        assert c._pool._live == {} and not c._closers
        with pytest.raises(RuntimeError, match="closed"):
            await c.get_many("g", ["k1"])


# Following etcd -------------------------------------------------------------------


def client_settings(server: EtcdServer) -> Settings:
    return Settings(cluster={"etcd": [server.endpoint], "embedded_etcd": False})


class Registry:
    """Writes nodes' registrations as a worker's Registration would
    (without a lease: the tests add and remove them themselves)."""

    def __init__(self, server: EtcdServer) -> None:
        self.etcd = server.client()

    def add(self, addr: str) -> None:
        self.etcd.put(etcd.member_key("groupcache", addr), etcd.member_value(addr))

    def remove(self, addr: str) -> None:
        self.etcd.delete(etcd.member_key("groupcache", addr))

    def close(self) -> None:
        self.etcd.close()


@pytest.fixture
def registry(etcd_server):
    r = Registry(etcd_server)
    try:
        yield r
    finally:
        r.close()


@contextlib.asynccontextmanager
async def box_controller(server: EtcdServer, admin_dir, n: int):
    """A real controller (appliance.cluster.controller) pushing etcd's
    membership to the in-process nodes' admin sockets."""
    sockets = [str(admin_dir / f"n{i}.sock") for i in range(n)]
    ctl = Controller(server.client, "groupcache", lambda: sockets, push_interval=0.5)
    thread = threading.Thread(target=ctl.run, daemon=True, name="test-controller")
    thread.start()
    try:
        yield ctl
    finally:
        ctl.stop_event.set()
        await asyncio.to_thread(thread.join, 10)


def requests_by_node(nodes) -> dict[str, int]:
    """Gets each node had straight from a client (not forwarded by a peer)."""
    return {n.addr: n.groups["g"].stats.gets - n.groups["g"].stats.server_requests for n in nodes}


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("watch", ["watch", "no watch"])
async def test_clients_follow_a_scale_out_and_a_scale_in(kind, watch, etcd_server, registry, monkeypatch, tmp_path):
    if watch == "no watch":
        # etcd refuses the watch (say, a proxy that does not pass streams):
        # the client falls back to re-reading every poll_interval.
        def refused(*args, **kwargs):
            raise RuntimeError("watch refused")

        monkeypatch.setattr(etcd, "watch_prefix", refused)
    async with cluster(3, CountingOrigin(DATA), admin_dir=tmp_path) as nodes, box_controller(etcd_server, tmp_path, 3):
        a, b, new = nodes
        old_ring, full_ring = [a.addr, b.addr], [a.addr, b.addr, new.addr]

        def rings_are(ring):  # the nodes' rings, as a real controller makes them from etcd
            return lambda: all(sorted(n.peers.ring.nodes) == sorted(ring) for n in nodes)

        registry.add(a.addr)
        registry.add(b.addr)
        await until(rings_are(old_ring), 10, "the controller to push the first ring")
        # With a watch, a poll_interval past the deadlines: only the watch can make them.
        poll = 30 if watch == "watch" else 0.5
        c = await make(kind, from_settings=client_settings(etcd_server), poll_interval=poll, timeout=3)
        try:
            assert await c.peers() == sorted(old_ring)
            moved = [k for k in DATA if HashRing(sorted(full_ring)).owner(k) == new.addr][:20]
            for k in moved:  # before: to the old owners
                assert await c.get("g", k) == DATA[k]
            assert requests_by_node(nodes)[new.addr] == 0

            registry.add(new.addr)
            await until(rings_are(full_ring), 10, "the controller to push the new node")
            await until(lambda: new.addr in c.ring, 5, "the client's ring to gain the new node")
            before = requests_by_node(nodes)
            for k in moved:
                assert await c.get("g", k) == DATA[k]
            after = requests_by_node(nodes)
            assert after[new.addr] - before[new.addr] == len(moved)  # each straight to its new owner
            assert after[a.addr] == before[a.addr] and after[b.addr] == before[b.addr]

            registry.remove(new.addr)
            await until(rings_are(old_ring), 10, "the controller to push the ring without it")
            await until(lambda: new.addr not in c.ring, 5, "the client's ring to lose the node")
            before = requests_by_node(nodes)
            for k in moved:
                assert await c.get("g", k) == DATA[k]
            assert requests_by_node(nodes)[new.addr] == before[new.addr]  # nothing sent to it
        finally:
            await c.close()
    await until(lambda: not ring_threads(), 5, "the ring watch threads to end")
    if kind.startswith("async"):
        assert ring_tasks() == []


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
async def test_the_watch_comes_back_after_etcd_restarts(kind, etcd_server, registry):
    async with cluster(2, CountingOrigin(DATA)) as (a, b):
        registry.add(a.addr)
        c = await make(kind, from_settings=client_settings(etcd_server), poll_interval=0.5)
        try:
            assert await c.peers() == [a.addr]
            registry.close()
            await asyncio.to_thread(etcd_server.kill)  # the watch stream ends
            await asyncio.to_thread(etcd_server.start)  # same port, same data
            registry.etcd = etcd_server.client()
            registry.add(b.addr)
            await until(lambda: b.addr in c.ring, 10, "the client to watch again after etcd came back")
            assert await c.get("g", "k1") == b"v1"
        finally:
            await c.close()
    await until(lambda: not ring_threads(), 5, "the ring watch threads to end")


def etcd_calls(server: EtcdServer) -> dict[str, int]:
    """RPCs etcd itself counts as started, by method (its /metrics)."""
    text = urllib.request.urlopen(f"http://{server.endpoint}/metrics", timeout=5).read().decode()
    calls: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "grpc_server_started_total" and sample.labels["grpc_service"].startswith("etcdserverpb"):
                method = sample.labels["grpc_method"]
                calls[method] = calls.get(method, 0) + int(sample.value)
    return calls


@pytest.mark.integration
async def test_a_static_client_never_touches_etcd(etcd_server, registry):
    async with cluster(2, CountingOrigin(DATA)) as (a, b):
        registry.add(a.addr)
        before = etcd_calls(etcd_server)
        static = [await make("sync", [a.addr]), await make("async", [a.addr])]
        for c in static:
            assert await c.get("g", "k1") == b"v1"
        assert etcd_calls(etcd_server) == before  # etcd saw no read, no watch, nothing
        assert ring_threads() == [] and ring_tasks() == []
        followed = await make("async", from_settings=client_settings(etcd_server), poll_interval=0.5)
        try:
            # The control: a client that follows the ring is seen by etcd.
            await until(lambda: etcd_calls(etcd_server).get("Watch", 0) > before.get("Watch", 0), 5, "a watch")
            assert etcd_calls(etcd_server)["Range"] > before["Range"]
            registry.add(b.addr)
            await until(lambda: b.addr in followed.ring, 5, "the followed client to see the new node")
            for c in static:  # had they watched, they would have seen it too
                assert await c.peers() == [a.addr]
                assert await c.get("g", "k1") == b"v1"
                await c.refresh()  # a no-op for a static list
                assert await c.peers() == [a.addr]
        finally:
            await followed.close()
            for c in static:
                await c.close()


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
async def test_unreachable_etcd_is_a_clear_error(kind):
    settings = Settings(cluster={"etcd": [f"127.0.0.1:{free_port()}"], "embedded_etcd": False})
    with pytest.raises(
        errors.PeerError, match=r"cannot read the ring from etcd at 127\.0\.0\.1:\d+ \(service 'groupcache'\)"
    ):
        await make(kind, from_settings=settings)
    assert ring_threads() == []
