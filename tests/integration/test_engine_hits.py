"""Hits answered inside the engine (engine/src/hits.rs), over real gRPC on
loopback: the bytes and trailers Python would send, counted in the group's
stats, the rate limit charged in the same buckets as Python's, and
everything the hit path may not decide (a miss, an unknown credential, a
refusal) still answered by Python as before."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from appliance.node.serving import Node
from appliance.pb import cache_pb2, groupcache_pb2
from appliance.protocol import codec
from support import nodes as support_nodes
from support.nodes import CountingOrigin, cluster

# The conftest's `backend` fixture, on the engine only (it skips where the engine is not built).
pytestmark = [pytest.mark.parametrize("backend", ["engine"], indirect=True), pytest.mark.usefixtures("backend")]

# Enough keys that each of two nodes owns some, however the ring falls.
DATA = {f"k{i}": f"v{i}".encode() for i in range(200)}
GET = "/groupcachepb.GroupCache/Get"


async def get(addr: str, key: str, metadata=(), group: str = "g"):
    """(value, trailers) of one Get, or the grpc error."""
    async with grpc.aio.insecure_channel(addr) as channel:
        call = channel.unary_unary(
            GET,
            request_serializer=groupcache_pb2.GetRequest.SerializeToString,
            response_deserializer=groupcache_pb2.GetResponse.FromString,
        )(groupcache_pb2.GetRequest(group=group, key=key), timeout=5, metadata=metadata)
        reply = await call
        return reply.value, tuple(await call.trailing_metadata())


def answered(node) -> int:
    return node.transport._front.hits_answered()


async def until_open(node) -> None:
    """Until the hit path opened (the transport opens it once there is a ring)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while answered(node) == 0:
        assert loop.time() < deadline, "the engine never answered a hit"
        await get(node.addr, "k1")
        await asyncio.sleep(0.02)


async def test_hits_are_answered_in_the_engine_and_counted_in_the_group():
    origin = CountingOrigin(DATA)
    async with cluster(1, origin) as (node,):
        assert await get(node.addr, "k1") == (b"v1", ())  # a miss: Python loads it
        await until_open(node)
        before, stats = answered(node), node.groups["g"].stats
        gets, hits = stats.gets, stats.main_hits
        for _ in range(50):
            assert (await get(node.addr, "k1"))[0] == b"v1"
        assert answered(node) - before == 50  # none reached Python
        stats = node.groups["g"].stats  # reading them collects the engine's counts
        assert (stats.gets - gets, stats.main_hits - hits) == (50, 50)
        assert origin.calls == ["k1"]
        # A Set replaces the engine's bytes at once: the next hit is the new value.
        node.groups["g"].set("k1", b"new")
        assert (await get(node.addr, "k1"))[0] == b"new"
        # What the hit path may not decide goes to Python, which answers as before.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(node.addr, "k1", group="nope")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(node.addr, "")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_owner_marks_a_hot_key_from_hits_it_never_saw():
    async with cluster(1, CountingOrigin(DATA)) as (node,):
        await until_open(node)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        # Read k2 at well over OwnedHotKeys' 32/s until its replies say hot.
        while True:
            assert loop.time() < deadline, "k2 never became hot"
            replies = await asyncio.gather(*(get(node.addr, "k2") for _ in range(40)))
            if any(("x-groupcache-hot", "1") in trailers for _, trailers in replies):
                break
        assert "k2" in node.groups["g"].owned_hot.hot
        assert node.transport._front.hits_answered() > 40  # the engine's hits made it hot


async def test_closed_reads_answer_known_readers_in_the_engine_and_the_rest_in_python(tmp_path):
    tokens = {}
    for name in ("reader", "writer"):
        path = tmp_path / name
        path.write_text(f"{name}-token-0123456789abcdef\n")
        path.chmod(0o600)
        tokens[name] = (("authorization", f"Bearer {name}-token-0123456789abcdef"),)
    auth = {
        "reads": "authenticated",
        "writes": "authenticated",
        "credentials": {
            "reader": {"token_file": str(tmp_path / "reader"), "scopes": ["read"]},
            "writer": {"token_file": str(tmp_path / "writer"), "scopes": ["write"]},
        },
    }
    async with cluster(1, CountingOrigin(DATA), auth=auth) as (node,):
        assert (await get(node.addr, "k3", tokens["reader"]))[0] == b"v3"  # loaded by Python
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while answered(node) == 0:
            assert loop.time() < deadline
            assert (await get(node.addr, "k3", tokens["reader"]))[0] == b"v3"
            await asyncio.sleep(0.02)
        before = answered(node)
        refusals = [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
            (tokens["writer"], grpc.StatusCode.PERMISSION_DENIED),
        ]
        for metadata, code in refusals:  # the key is cached: only Python may refuse it
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await get(node.addr, "k3", metadata)
            assert info.value.code() == code, metadata
        assert answered(node) == before
        assert (await get(node.addr, "k3", tokens["reader"]))[0] == b"v3"
        assert answered(node) == before + 1


async def test_a_rate_limit_is_charged_alike_in_the_engine_and_in_python():
    """With [ops] rate_limit the engine charges the buckets Python charges
    (appliance_engine.TokenBuckets): each Get takes one token whichever side
    answers it, hits in the engine until the burst is spent, then Python
    refuses every call with RESOURCE_EXHAUSTED and a RetryInfo."""
    from google.rpc import error_details_pb2, status_pb2

    from appliance.protocol.status import DETAILS_KEY

    burst = 30
    base = support_nodes.settings()
    ops = base.ops.model_copy(update={"rate_limit": 0.001, "rate_burst": burst})  # no refill in the test
    node = Node(base.model_copy(update={"ops": ops}), {"g": CountingOrigin(DATA)}, port=0)
    await node.start()
    try:
        node.set_peers([node.addr], 1)
        assert await get(node.addr, "k1") == (b"v1", ())  # a miss, charged in Python
        await until_open(node)
        spent = node.groups["g"].stats.gets  # every Get so far was served, and took one token
        in_engine = answered(node)
        served, refusal = 0, None
        for _ in range(burst + 5):
            try:
                assert (await get(node.addr, "k1"))[0] == b"v1"
                served += 1
            except grpc.aio.AioRpcError as exc:
                refusal = exc
                break
        assert served == burst - spent  # one bucket for both sides
        assert answered(node) - in_engine == served  # ... and these hits were the engine's
        assert refusal is not None and refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = status_pb2.Status.FromString(dict(refusal.trailing_metadata())[DETAILS_KEY])
        kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
        assert error_details_pb2.RetryInfo.DESCRIPTOR.full_name in kinds, kinds
    finally:
        await node.stop(0)


@pytest.mark.parametrize("token", [None, "cluster-token-0123456789abcdef"])
async def test_a_peers_forward_is_answered_in_the_engine_as_python_would(token):
    """The owner's engine answers a peer's forwarded Get: with a cluster
    token, only on a valid proof and with its own proof back (the forwarder
    takes no value without it); with none, on the marker alone."""
    origin = CountingOrigin(DATA)
    async with cluster(2, origin, token=token) as (a, b):
        await until_open(b)
        key = next(k for k in DATA if b.peers.owner(k) == b.addr)
        assert (await get(b.addr, key))[0] == DATA[key]  # b loads it, as its owner
        before = answered(b)
        requests = b.groups["g"].stats.server_requests
        assert (await a.groups["g"].get(key)).value == DATA[key]  # a forwards it to b
        assert answered(b) == before + 1  # answered by b's engine
        assert b.groups["g"].stats.server_requests == requests + 1
        stats = a.groups["g"].stats
        assert (stats.peer_loads, stats.peer_errors) == (1, 0)  # a took it: the proof held
        assert origin.calls.count(key) == 1  # loaded once, by its owner


async def get_many_raw(addr: str, keys, group: str = "g") -> bytes:
    """The raw GetManyResponse bytes, as the server sent them."""
    async with grpc.aio.insecure_channel(addr) as channel:
        call = channel.unary_unary(
            "/appliance.cache.Cache/GetMany",
            request_serializer=cache_pb2.GetManyRequest.SerializeToString,
        )
        return await call(cache_pb2.GetManyRequest(group=group, keys=keys), timeout=5)


async def test_a_getmany_of_hits_is_answered_in_the_engine_byte_for_byte():
    origin = CountingOrigin(DATA)
    async with cluster(1, origin, max_value_bytes=1024) as (node,):
        await until_open(node)
        keys = ["k5", "k6", "k5", "k7"]  # a key twice: counted and answered twice
        python = await get_many_raw(node.addr, keys)  # misses: Python loads and answers
        group = node.groups["g"]
        before, gets = answered(node), group.stats.gets
        engine = await get_many_raw(node.addr, keys)
        assert answered(node) == before + 1 and group.stats.gets == gets + len(keys)
        assert engine == python  # the bytes Python's codec writes
        entries = [group.peek(k) for k in keys]
        assert engine == codec.encode_get_many_response(keys, entries)
        # A miss among them, or a reply over the limit: Python's, as before.
        reply = cache_pb2.GetManyResponse.FromString(await get_many_raw(node.addr, ["k5", "nope"]))
        assert [(r.key, r.value, r.code) for r in reply.results] == [
            ("k5", b"v5", 0),
            ("nope", b"", grpc.StatusCode.NOT_FOUND.value[0]),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get_many_raw(node.addr, ["k5"] * 10_000)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert answered(node) == before + 1
