"""Forwards made by the engine itself (engine/src/forward.rs, issue 20),
over real gRPC on loopback: a Get for a key another member owns goes from
the engine to the owner without Python, proven both ways with the cluster
token, counted in the group as Python counts a forward, and joined with
concurrent Gets of the same key; whatever the engine may not decide (an
owner that does not answer) goes to Python, which answers as before."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from appliance.node.serving import Node
from appliance.pb import groupcache_pb2
from appliance.rules.peers import PeerFacts
from support.fake_peers import FrozenPeer
from support.nodes import CountingOrigin, cluster, engine_serving, settings

# The conftest's `backend` fixture, on the engine only (it skips where the engine is not built).
pytestmark = [pytest.mark.parametrize("backend", ["engine"], indirect=True), pytest.mark.usefixtures("backend")]

DATA = {f"k{i}": f"v{i}".encode() for i in range(200)}
TOKEN = "a-cluster-token-for-the-tests-0123456789"


LONG = 30.0


def reader(channel, timeout: float = LONG):
    """read(key) -> group g's value, on `channel`: concurrent reads share its connection."""
    call = channel.unary_unary(
        "/groupcachepb.GroupCache/Get",
        request_serializer=groupcache_pb2.GetRequest.SerializeToString,
        response_deserializer=groupcache_pb2.GetResponse.FromString,
    )

    async def read(key: str) -> bytes:
        return (await call(groupcache_pb2.GetRequest(group="g", key=key), timeout=timeout)).value

    return read


async def get(addr: str, key: str, timeout: float = LONG) -> bytes:
    async with grpc.aio.insecure_channel(addr) as channel:
        return await reader(channel, timeout)(key)


def forwards(node) -> int:
    return node.transport._front.forwards_answered()


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def told_the_ring(a, b, data=DATA) -> None:
    """Until a's engine holds the ring (pushed at the ring change) and has
    made a forward: a key of b's (in `data`) read through a is then the engine's."""
    # Each a key of its own: one Python fetched may have a hot copy since.
    keys = iter([k for k in data if a.peers.owner(k) == b.addr][:40])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while forwards(a) == 0:  # the hit path opens at the first collect after the ring
        assert loop.time() < deadline, "the engine never forwarded"
        await get(a.addr, next(keys))
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "proofs"])
async def test_a_miss_of_a_peer_s_key_is_forwarded_by_the_engine_and_counted(token):
    origin = CountingOrigin(DATA)
    async with cluster(2, origin, token=token, hot_cache_mirror=0.0, peek_window=0.0) as (a, b):
        await told_the_ring(a, b)
        theirs = [k for k in DATA if a.peers.owner(k) == b.addr][-20:]
        a.groups["g"].collect()
        stats = a.groups["g"].stats
        before = (forwards(a), stats.gets, stats.loads, stats.peer_loads, stats.local_loads, len(origin.calls))
        assert [await get(a.addr, k) for k in theirs] == [DATA[k] for k in theirs]
        a.groups["g"].collect()
        after = (forwards(a), stats.gets, stats.loads, stats.peer_loads, stats.local_loads, len(origin.calls))
        n = len(theirs)
        # Each by the engine; counted as Python counts a forward; loaded once, by b.
        assert [y - x for x, y in zip(before, after, strict=True)] == [n, n, n, n, 0, n]
        assert b.groups["g"].stats.server_requests >= n
        # The owner's NOT_FOUND comes back as such, from the engine, and holds nothing back.
        missing = [k for k in (f"m{i}" for i in range(400)) if a.peers.owner(k) == b.addr][:3]
        for k in missing:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await get(a.addr, k)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert forwards(a) == after[0] + len(missing)
        assert await get(a.addr, theirs[0]) == DATA[theirs[0]]
        assert forwards(a) == after[0] + len(missing) + 1


async def test_concurrent_gets_of_one_key_take_one_call_to_its_owner():
    origin = CountingOrigin(DATA, delay=0.3)
    async with cluster(2, origin, hot_cache_mirror=0.0, peek_window=0.0) as (a, b):
        await told_the_ring(a, b)
        key = next(k for k in reversed(DATA) if a.peers.owner(k) == b.addr)
        a.groups["g"].collect()
        stats = a.groups["g"].stats
        gets, peer_loads, made = stats.gets, stats.peer_loads, forwards(a)
        values = await asyncio.gather(*(get(a.addr, key) for _ in range(8)))
        assert values == [DATA[key]] * 8
        a.groups["g"].collect()
        assert (stats.gets - gets, stats.peer_loads - peer_loads, forwards(a) - made) == (8, 1, 8)
        assert origin.calls.count(key) == 1


async def test_a_forwarded_value_gets_a_hot_copy_while_the_hot_cache_has_room():
    origin = CountingOrigin(DATA)
    async with cluster(2, origin, hot_cache_mirror=0.1, peek_window=0.0) as (a, b):
        await told_the_ring(a, b)
        key = next(k for k in reversed(DATA) if a.peers.owner(k) == b.addr)
        made = forwards(a)
        assert await get(a.addr, key) == DATA[key]
        assert forwards(a) == made + 1
        assert a.groups["g"].hot.get(key) is not None  # kept by the engine
        assert await get(a.addr, key) == DATA[key]
        assert forwards(a) == made + 1  # the second Get was a hit


async def test_an_owner_that_is_gone_leaves_the_get_to_python_which_loads_it():
    origin = CountingOrigin(DATA)
    async with cluster(2, origin, hot_cache_mirror=0.0, peek_window=0.0) as (a, b):
        await told_the_ring(a, b)
        theirs = [k for k in DATA if a.peers.owner(k) == b.addr][-3:]
        await b.stop(grace=0)
        made = forwards(a)
        for k in theirs:
            assert await get(a.addr, k) == DATA[k]  # loaded by a (b is down)
        assert forwards(a) == made
        a.groups["g"].collect()
        assert a.groups["g"].stats.peer_errors >= 1


async def test_forwards_are_made_here_with_the_default_peek_window_too():
    """Peeks at previous owners are the owner's, on its own miss: a
    non-owner's forward needs none, so the window does not hold it back."""
    origin = CountingOrigin(DATA)
    async with cluster(2, origin, hot_cache_mirror=0.0) as (a, b):
        assert a.settings.node.peek_window > 0
        await told_the_ring(a, b)
        theirs = [k for k in DATA if a.peers.owner(k) == b.addr][-5:]
        made = forwards(a)
        assert [await get(a.addr, k) for k in theirs] == [DATA[k] for k in theirs]
        assert forwards(a) == made + 5


async def test_a_live_owner_is_waited_for_past_the_first_wait_within_the_caller_s_deadline():
    """A caller's 2 s deadline (first wait 1 s, patience 1.9 s): the owner's
    1.5 s load is waited out by the engine, because its server answers the
    health probe, so the key is loaded once, by its owner."""
    origin = CountingOrigin(DATA)
    async with cluster(2, origin, hot_cache_mirror=0.0, peek_window=0.0, peer_timeout="5s") as (a, b):
        await told_the_ring(a, b)
        key = [k for k in DATA if a.peers.owner(k) == b.addr][-1]
        made, loads = forwards(a), len(origin.calls)
        origin.delay = 1.5
        assert await get(a.addr, key, timeout=2.0) == DATA[key]
        assert forwards(a) == made + 1  # the engine's forward answered it
        assert origin.calls[loads:] == [key]  # once, by b
        assert a.peers.facts(b.addr).read_allowed()


async def test_a_silent_owner_is_left_at_the_first_wait_and_its_breaker_opens(monkeypatch):
    """An owner that takes the call and answers nothing, not even a health
    probe: the engine leaves it at the first wait (1 s of a 2 s deadline)
    and tells Python, whose breaker opens, so the key is loaded here, in
    time, without asking the owner again."""
    monkeypatch.setattr(PeerFacts, "DOWN_MIN_S", 60.0)  # no background probe closes it again
    peer = FrozenPeer()
    await peer.server.start()
    origin = CountingOrigin(DATA)
    node = Node(settings(hot_cache_mirror=0.0, peek_window=0.0, peer_timeout="5s"), {"g": origin}, port=0)
    try:
        await node.start()
        node.set_peers([node.addr, peer.addr], 1)
        await engine_serving(node)
        key = next(k for k in DATA if node.peers.owner(k) == peer.addr)
        assert node.peers.facts(peer.addr).read_allowed()
        assert await get(node.addr, key, timeout=2.0) == DATA[key]
        assert key in origin.calls  # loaded here
        assert peer.calls.count("/groupcachepb.GroupCache/Get") == 1, peer.calls  # asked once, by the engine
        assert "/grpc.health.v1.Health/Check" in peer.calls  # the engine's probe
        assert not node.peers.facts(peer.addr).read_allowed()
        assert forwards(node) == 0
    finally:
        await node.stop(0)
        await peer.server.stop(0)


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "proofs"])
async def test_forwards_that_arrive_together_go_to_their_owner_batched(token):
    """Concurrent Gets of distinct keys one owner holds, sent to another
    node on one connection: its engine sends those that arrive together as
    one GetMany (proven both ways), and each caller gets its own value."""
    origin = CountingOrigin(DATA)
    async with cluster(2, origin, token=token, hot_cache_mirror=0.0, peek_window=0.0) as (a, b):
        await told_the_ring(a, b)
        theirs = [k for k in DATA if a.peers.owner(k) == b.addr]
        b_front = b.transport._front
        async with grpc.aio.insecure_channel(a.addr) as channel:
            read = reader(channel)

            calls = []
            for round_keys in [theirs[i : i + 16] for i in range(0, 80, 16)]:
                for k in round_keys:  # held by b, so each forward is one hit there
                    await get(b.addr, k)
                made, answered = forwards(a), b_front.hits_answered()
                assert await asyncio.gather(*(read(k) for k in round_keys)) == [DATA[k] for k in round_keys]
                assert forwards(a) - made == len(round_keys)  # every one answered by the engine's forwards
                calls.append(b_front.hits_answered() - answered)
        assert min(calls) < 16, calls  # fewer calls reached b than Gets: batched
        assert len(origin.calls) == len(set(origin.calls))  # nothing loaded twice
        assert a.groups["g"].stats.local_loads == 0


async def test_an_owner_s_error_answers_are_passed_on_as_python_passes_them(monkeypatch):
    """The engine passes on what the owner answered about the key, once:
    its origin's failure (the cause only to a caller with a read
    credential, as node_rules.told) and a missing key. A missing group at
    the owner is no answer about the key: Python loads it locally."""
    from appliance.cache import errors as cache_errors
    from appliance.protocol.status import failure, reason_of
    from appliance.rules.auth import bearer
    from appliance.rules.node_rules import ORIGIN_UNTOLD

    asked: list[str] = []
    answers = {
        "fire": cache_errors.OriginError("HTTP 500: database on fire"),
        "gone": cache_errors.KeyNotFound("not in the origin"),
        "nogroup": cache_errors.GroupNotFound("group 'g' not found"),
    }

    async def owner_get(request: bytes, context):
        key = groupcache_pb2.GetRequest.FromString(request).key
        asked.append(key)
        f = failure(answers[key.rstrip("0123456789")], "g", key)
        await context.abort(f.code, f.details, f.trailing_metadata)

    owner = grpc.aio.server()
    owner.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "groupcachepb.GroupCache", {"Get": grpc.unary_unary_rpc_method_handler(owner_get)}
            ),
        )
    )
    owner_addr = f"127.0.0.1:{owner.add_insecure_port('127.0.0.1:0')}"
    await owner.start()
    origin = CountingOrigin({f"nogroup{i}": b"local" for i in range(100)})
    node = Node(settings(hot_cache_mirror=0.0, peek_window=0.0), {"g": origin}, port=0, token=TOKEN)
    try:
        await node.start()
        node.set_peers([node.addr, owner_addr], 1)
        await engine_serving(node)
        # Each kind's key: one the fake owner owns on this ring.
        fire, gone, nogroup = (
            next(f"{kind}{i}" for i in range(100) if node.peers.owner(f"{kind}{i}") == owner_addr) for kind in answers
        )

        async def read(key: str, metadata=()) -> grpc.aio.AioRpcError:
            async with grpc.aio.insecure_channel(node.addr) as channel:
                call = channel.unary_unary("/groupcachepb.GroupCache/Get")
                request = groupcache_pb2.GetRequest(group="g", key=key).SerializeToString()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(request, timeout=LONG, metadata=metadata)
                return err.value

        told = await read(fire, metadata=bearer(TOKEN))  # the cluster's token reads
        assert told.code() == grpc.StatusCode.UNAVAILABLE and "database on fire" in told.details()
        untold = await read(fire)
        assert untold.code() == grpc.StatusCode.UNAVAILABLE and untold.details() == ORIGIN_UNTOLD
        assert reason_of(untold.trailing_metadata()) == "ORIGIN_ERROR"
        assert "database" not in str(untold.trailing_metadata())
        missing = await read(gone)
        assert missing.code() == grpc.StatusCode.NOT_FOUND and reason_of(missing.trailing_metadata()) == "KEY_NOT_FOUND"
        assert asked == [fire, fire, gone]  # each asked once, by the engine
        assert forwards(node) == 3 and origin.calls == []
        # A missing group at the owner: loaded here, by Python.
        async with grpc.aio.insecure_channel(node.addr) as channel:
            assert (
                await channel.unary_unary("/groupcachepb.GroupCache/Get")(
                    groupcache_pb2.GetRequest(group="g", key=nogroup).SerializeToString(), timeout=LONG
                )
                == groupcache_pb2.GetResponse(value=b"local").SerializeToString()
            )
        assert origin.calls == [nogroup] and forwards(node) == 3
    finally:
        await node.stop(0)
        await owner.stop(0)


async def test_a_batched_forward_never_waits_on_another_s_origin():
    """A batch asks its owner only for what it holds (x-groupcache-cached-
    only): a cold key batched with held ones goes on alone, so the held
    keys are answered while its origin is still loading, and it is loaded
    once."""
    origin = CountingOrigin(DATA)
    async with cluster(2, origin, token=TOKEN, hot_cache_mirror=0.0, peek_window=0.0) as (a, b):
        await told_the_ring(a, b)
        theirs = [k for k in DATA if a.peers.owner(k) == b.addr]
        held, cold = theirs[:45], theirs[-3:]
        for k in held:
            await get(b.addr, k)
        b_front = b.transport._front
        batched = 0
        async with grpc.aio.insecure_channel(a.addr) as channel:
            read = reader(channel)

            for i, key in enumerate(cold):
                hot = held[i * 15 : (i + 1) * 15]
                origin.gate = asyncio.Event()  # the cold key's load waits for it
                answered = b_front.hits_answered()
                # Sent together on one connection: the cold key among the held ones.
                hot_reads = [asyncio.ensure_future(read(hot[0]))]
                cold_read = asyncio.ensure_future(read(key))
                hot_reads += [asyncio.ensure_future(read(k)) for k in hot[1:]]
                # Every held key is answered while the cold one still loads.
                assert await asyncio.wait_for(asyncio.gather(*hot_reads), 5) == [DATA[k] for k in hot]
                await until(lambda key=key: key in origin.calls)
                assert not cold_read.done()
                batched += b_front.hits_answered() - answered < len(hot)  # some went in a GetMany
                origin.gate.set()
                assert await asyncio.wait_for(cold_read, 10) == DATA[key]
        assert batched, "no round batched its forwards"
        assert sorted(origin.calls[-len(cold) :]) == sorted(cold) and len(set(origin.calls)) == len(origin.calls)


async def test_a_batch_its_owner_refuses_whole_goes_alone_and_holds_nothing_back():
    """A batch whose reply would pass the owner's message limit is refused
    as a whole (RESOURCE_EXHAUSTED): each of its forwards then goes alone,
    and the owner is not left to Python for it."""
    big = {f"b{i}": bytes([65 + i % 26]) * 12_000 for i in range(200)}  # 12 KB each; the limit: 16 KiB + 64 KiB
    origin = CountingOrigin(big)
    async with cluster(2, origin, hot_cache_mirror=0.0, peek_window=0.0, max_value_bytes="16KiB") as (a, b):
        await told_the_ring(a, b, big)
        theirs = [k for k in big if a.peers.owner(k) == b.addr]
        refused = 0
        async with grpc.aio.insecure_channel(a.addr, options=[("grpc.max_receive_message_length", 1 << 20)]) as ch:
            read = reader(ch)
            for i in range(len(theirs) // 12):  # until a batch was refused: whether one forms is timing
                if refused:
                    break
                keys = theirs[i * 12 : (i + 1) * 12]
                for k in keys:  # held by b
                    await get(b.addr, k)
                b.groups["g"].collect()
                before_b, made = b.groups["g"].stats.server_requests, forwards(a)
                assert await asyncio.gather(*(read(k) for k in keys)) == [big[k] for k in keys]
                assert forwards(a) - made == len(keys)  # every one by the engine, none left to Python
                b.groups["g"].collect()
                refused += b.groups["g"].stats.server_requests - before_b > len(keys)  # a batch came first
        assert refused, "no batch was refused: the test did not test it"
