"""In-process nodes on loopback with real gRPC, for tests."""

from __future__ import annotations

import asyncio
import contextlib

from appliance.config import Settings
from appliance.node.serving import Node


class CountingOrigin:
    """A loader that counts calls and can be held back with a gate."""

    def __init__(self, data=None, delay=0.0):
        self.data = dict(data or {})
        self.calls: list[str] = []
        self.delay = delay
        self.gate: asyncio.Event | None = None

    async def __call__(self, key: str) -> bytes:
        from appliance.cache.errors import KeyNotFound

        self.calls.append(key)
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 10)
        if self.delay:
            await asyncio.sleep(self.delay)
        if key not in self.data:
            raise KeyNotFound(f"{key!r} is not in the test origin")
        return self.data[key]


# The server backend in-process nodes use; the `backend` fixture
# (tests/conftest.py) sets it per test, so one test body runs on both.
BACKEND = {"server": "auto"}


def settings(groups=("g",), auth=None, tls=None, **node) -> Settings:
    """In-process nodes' settings. Writes are open here unless `auth` says
    otherwise: these tests are about the data plane; tests/integration/
    test_write_auth.py runs the same calls with credentials required."""
    node.setdefault("host", "127.0.0.1")
    node.setdefault("server", BACKEND["server"])
    return Settings(
        node=node,
        groups={name: {"origin": "python:tests.none:f", "cache_bytes": "1MiB"} for name in groups},
        cluster={"embedded_etcd": False},
        auth=auth if auth is not None else {"writes": "open"},
        tls=tls or {},
    )


@contextlib.asynccontextmanager
async def cluster(
    n: int, loader, *, groups=("g",), admin_dir=None, forward=None, auth=None, token=None, tls=None, **node
):
    """n started nodes sharing one ring (revision 1); yields the nodes.
    `forward` ("stream" | "unary") overrides how their forwards reach an
    owner; `auth` is the [auth] table, `token` the cluster's own token."""
    s = settings(groups, auth, tls, **node)
    nodes = []
    try:
        for i in range(n):
            admin = f"unix:{admin_dir}/n{i}.sock" if admin_dir else None
            nodes.append(Node(s, {g: loader for g in groups}, port=0, admin_address=admin, token=token))
            if forward is not None:
                nodes[-1].transport.peer_clients.forward = forward  # before any peer client exists
            await nodes[-1].start()
        peers = [x.addr for x in nodes]
        for x in nodes:
            x.set_peers(peers, 1)
        yield nodes
    finally:
        await asyncio.gather(*(x.stop(0) for x in nodes), return_exceptions=True)


async def open_peer_streams(nodes, group: str) -> None:
    """Forward once from every node to every other, so that each holds its
    one long-lived Peer.Forward stream (a few tasks per peer, by design)
    before a test starts counting tasks."""
    from appliance.cache.errors import CacheError

    for node in nodes:
        for other in nodes:
            if other is node:
                continue
            key = next(k for k in (f"__stream-{i}" for i in range(10_000)) if node.peers.owner(k) == other.addr)
            try:
                await node.groups[group].get(key)
            except CacheError:
                pass


async def engine_serving(node, timeout: float = 5.0) -> None:
    """Until the node's engine answers hits and forwards itself (it opens
    at its first collect after the ring); at once on grpcio."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not getattr(node.transport, "hits_open", True):
        assert loop.time() < deadline, "the engine never opened its hit path"
        await asyncio.sleep(0.01)


def client_gets(nodes, group: str = "g") -> int:
    """Gets the nodes received from clients (forwards between them excluded),
    counted as each arrives, before any waits on a load."""
    return sum(n.groups[group].stats.gets - n.groups[group].stats.server_requests for n in nodes)


async def all_arrived(nodes, count: int, group: str = "g", timeout: float = 10.0) -> None:
    """Until `count` client Gets have arrived (a held load keeps them waiting):
    releasing the load before then would let late Gets hit the cache, and a
    load-once check would stop testing singleflight without failing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (arrived := client_gets(nodes, group)) < count:
        if loop.time() > deadline:
            raise AssertionError(f"{arrived} of {count} Gets arrived before the deadline")
        await asyncio.sleep(0.005)


async def go_like_server(served, port=0):
    """A real gRPC server with only the seed's GroupCache/Get, as a Go node
    has (no Peer.Forward): (server, address)."""
    import grpc

    from appliance.pb import groupcache_pb2

    async def seed_get(request, context):
        served.append(request.key)
        return groupcache_pb2.GetResponse(value=b"from-go:" + request.key.encode())

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "groupcachepb.GroupCache",
                {
                    "Get": grpc.unary_unary_rpc_method_handler(
                        seed_get,
                        request_deserializer=groupcache_pb2.GetRequest.FromString,
                        response_serializer=groupcache_pb2.GetResponse.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{port}"
