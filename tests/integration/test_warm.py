"""Membership changes keep the cache warm: handoff on a planned stop, peeks
at previous owners after a ring change, and the fences that make a Remove
or Set win over both. Real nodes on loopback, real gRPC, both backends.

A ring change is what the controller would push: set_peers on every node,
a newer revision each time. A reply is held back (a handoff call or a
peek's answer) by wrapping the sending node's own peer client, so the value
in flight was read before the Remove or Set that the test then issues.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from appliance.node.serving import Node
from appliance.pb import cache_pb2, cache_pb2_grpc, groupcache_pb2, groupcache_pb2_grpc
from appliance.protocol.status import DETAILS_KEY
from support.nodes import CountingOrigin, settings
from support.ports import free_port

pytestmark = pytest.mark.usefixtures("backend")  # each test on both server backends

N_KEYS = 300


class Cluster:
    """Nodes that the test joins, stops and restarts; rings pushed by hand."""

    def __init__(self, origin: CountingOrigin, **node) -> None:
        node.setdefault("hot_cache_mirror", 0.0)
        self.origin = origin
        self.settings = settings(("g",), **node)
        self.nodes: list[Node] = []
        self.revision = 0
        self.channels: dict[str, grpc.aio.Channel] = {}

    async def start(self, port: int = 0) -> Node:
        node = Node(self.settings, {"g": self.origin}, port=port)
        await node.start()
        self.nodes.append(node)
        return node

    def ring(self, members: list[Node], to: list[Node] | None = None) -> None:
        """Push the ring of `members` to `to` (default: every node)."""
        self.revision += 1
        for node in self.nodes if to is None else to:
            node.set_peers([m.addr for m in members], self.revision)

    async def stop(self, node: Node) -> None:
        self.nodes.remove(node)
        await node.stop(0)

    def channel(self, node: Node) -> grpc.aio.Channel:
        if node.addr not in self.channels:
            self.channels[node.addr] = grpc.aio.insecure_channel(node.addr)
        return self.channels[node.addr]

    async def value(self, node: Node, key: str) -> bytes:
        stub = groupcache_pb2_grpc.GroupCacheStub(self.channel(node))
        return (await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), timeout=5)).value

    def cache(self, node: Node) -> cache_pb2_grpc.CacheStub:
        return cache_pb2_grpc.CacheStub(self.channel(node))

    def peer(self, node: Node) -> cache_pb2_grpc.PeerStub:
        return cache_pb2_grpc.PeerStub(self.channel(node))

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()
        await asyncio.gather(*(n.stop(0) for n in self.nodes), return_exceptions=True)


@contextlib.asynccontextmanager
async def running(n: int, origin: CountingOrigin, **node):
    c = Cluster(origin, **node)
    try:
        for _ in range(n):
            await c.start()
        c.ring(c.nodes)
        yield c
    finally:
        await c.close()


async def windows_over(nodes: list[Node], keys, timeout: float = 10.0) -> None:
    """Until no node would peek at a previous owner for any key: their peek
    windows are over (a condition on the nodes, not a sleep past the window)."""
    deadline = time.monotonic() + timeout
    while any(n.peers.peek_candidates(k) for n in nodes for k in keys):
        assert time.monotonic() < deadline, "peek windows still open"
        await asyncio.sleep(0.02)


def data(n: int = N_KEYS) -> dict[str, bytes]:
    return {f"k{i}": f"v{i}".encode() * 4 for i in range(n)}


async def warm(c: Cluster, keys) -> None:
    for i, key in enumerate(keys):
        await c.value(c.nodes[i % len(c.nodes)], key)


def owned(node: Node, keys) -> list[str]:
    return [k for k in keys if node.groups["g"].main.get(k) is not None]


async def leave(c: Cluster, node: Node, timeout: float = 5.0):
    """A planned stop: the ring without it everywhere (it, too, gets it), handoff, stop."""
    c.ring([n for n in c.nodes if n is not node])
    report = await node.handoff(timeout)
    await c.stop(node)
    return report


def held(client, method: str):
    """Hold `method` of a peer client: `arrived` is set once its call (a
    handoff) is about to go out, or its answer (a peek) came back; the
    call or answer then waits for `release`."""
    arrived, release = asyncio.Event(), asyncio.Event()
    real = getattr(client, method)

    async def call(*args, **kwargs):
        if method == "handoff":
            arrived.set()
            await asyncio.wait_for(release.wait(), 10)
            return await real(*args, **kwargs)
        result = await real(*args, **kwargs)
        arrived.set()
        await asyncio.wait_for(release.wait(), 10)
        return result

    setattr(client, method, call)
    return arrived, release


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in err.trailing_metadata() or ():
        if key == DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the trailers")


def key_moving(keys, before: list[Node], after: list[Node], *, to: Node) -> str:
    """A key whose owner is `to` in the ring of `after`, another node in `before`."""
    from appliance.cache.ring import HashRing

    b, a = HashRing([n.addr for n in before]), HashRing([n.addr for n in after])
    return next(k for k in keys if a.owner(k) == to.addr and b.owner(k) != to.addr)


# Handoff ------------------------------------------------------------------------


async def test_planned_stop_hands_its_entries_to_the_new_owners():
    truth = data()
    origin = CountingOrigin(truth)
    async with running(3, origin) as c:
        await warm(c, truth)
        assert len(origin.calls) == len(truth)
        a, b, leaving = c.nodes
        had = owned(leaving, truth)
        report = await leave(c, leaving)
        assert report.sent == len(had) and report.accepted == len(had), report
        assert report.refused == report.failed == report.cut == 0 and report.peers == 2
        assert report.accepted_bytes == sum(len(k) + len(truth[k]) for k in had)
        for key in had:  # each at its owner in the new ring, in its main cache
            owner = next(n for n in (a, b) if n.addr == a.peers.owner(key))
            assert owner.groups["g"].main.get(key).value == truth[key]
        for i, key in enumerate(truth):
            assert await c.value((a, b)[i % 2], key) == truth[key]
        assert len(origin.calls) == len(truth)  # not one load more
        received = a.groups["g"].stats.handoff_in_accepted + b.groups["g"].stats.handoff_in_accepted
        assert received == len(had)


async def test_handoff_carries_the_ttl():
    truth = data(60)
    origin = CountingOrigin(truth)
    async with running(2, origin) as c:
        a, leaving = c.nodes
        leaving.groups["g"].ttl = 30  # its entries expire, a's would not
        key = next(k for k in truth if a.peers.owner(k) == leaving.addr)
        assert await c.value(leaving, key) == truth[key]
        expires = leaving.groups["g"].main.get(key).expires
        report = await leave(c, leaving)
        assert report.accepted == 1
        carried = a.groups["g"].main.get(key)
        assert carried.value == truth[key]
        # Expires on the new owner when it would have on the old (one clock in this process).
        assert carried.expires and abs(carried.expires - expires) < 0.5


@pytest.mark.parametrize("write", ["remove", "set"])
async def test_a_remove_or_set_during_a_handoff_wins(write):
    truth = data(100)
    origin = CountingOrigin(truth)
    async with running(3, origin) as c:
        await warm(c, truth)
        a, b, leaving = c.nodes
        key = owned(leaving, truth)[0]
        old = truth[key]
        arrived, release = held(leaving.peers.client(key_owner(c, key, [a, b]).addr), "handoff")
        c.ring([a, b])
        task = asyncio.ensure_future(leaving.handoff(5))
        await asyncio.wait_for(arrived.wait(), 5)  # the batch holds the old value now
        new = b"written during the handoff"
        if write == "remove":
            origin.data[key] = new
            await c.cache(a).Remove(cache_pb2.RemoveRequest(group="g", key=key), timeout=5)
        else:
            await c.cache(a).Set(cache_pb2.SetRequest(group="g", key=key, value=new), timeout=5)
        release.set()
        report = await task
        assert report.refused >= 1 and report.failed == 0
        for node in (a, b):
            entry = node.groups["g"].main.get(key)
            assert entry is None or entry.value == new
            assert await c.value(node, key) == new
        assert old != new


def key_owner(c: Cluster, key: str, members: list[Node]) -> Node:
    from appliance.cache.ring import HashRing

    addr = HashRing([n.addr for n in members]).owner(key)
    return next(n for n in members if n.addr == addr)


async def test_a_handoff_to_a_stopping_peer_is_refused_cleanly():
    truth = data(100)
    origin = CountingOrigin(truth)
    async with running(3, origin) as c:
        await warm(c, truth)
        a, b, leaving = c.nodes
        drain = asyncio.ensure_future(b.drain(30))  # b is stopping too
        await asyncio.sleep(0)
        c.ring([a, b])
        report = await leaving.handoff(5)
        to_b = [k for k in owned(leaving, truth) if key_owner(c, k, [a, b]) is b]
        to_a = [k for k in owned(leaving, truth) if key_owner(c, k, [a, b]) is a]
        assert report.failed == len(to_b) and report.accepted == len(to_a), report
        assert b.groups["g"].stats.handoff_in_accepted == 0
        drain.cancel()


async def test_a_handoff_larger_than_the_byte_bound_is_cut_there():
    truth = {f"k{i}": b"x" * 100 for i in range(200)}
    origin = CountingOrigin(truth)
    entry = len("k100") + 100
    async with running(2, origin, handoff_bytes=10 * entry) as c:
        a, leaving = c.nodes
        mine = [k for k in truth if a.peers.owner(k) == leaving.addr and len(k) == 4]
        for key in mine:
            await c.value(leaving, key)
        recent = mine[-3:]
        for key in recent:  # the most recently used go first
            await c.value(leaving, key)
        report = await leave(c, leaving)
        assert report.accepted == 10 and report.cut == len(mine) - 10, report
        assert report.accepted_bytes == 10 * entry
        assert all(a.groups["g"].main.get(k) is not None for k in recent)
        assert a.groups["g"].stats.handoff_out_cut == 0 and len(owned(a, truth)) == 10


async def test_handoff_gives_up_at_its_deadline_without_failing_the_stop():
    """A new owner that accepts connections and never answers (a hung
    process): the handoff ends at its deadline, what it could not send
    counted as failed."""
    truth = data(100)
    origin = CountingOrigin(truth)
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    hung = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    try:
        async with running(2, origin) as c:
            await warm(c, truth)
            a, leaving = c.nodes
            c.revision += 1
            for node in c.nodes:
                node.set_peers([a.addr, hung], c.revision)
            report = await leaving.handoff(0.5)
            to_hung = [k for k in owned(leaving, truth) if leaving.peers.owner(k) == hung]
            assert to_hung and report.failed == len(to_hung), report
            assert report.accepted == len(owned(leaving, truth)) - len(to_hung)
            assert report.seconds < 1.5
    finally:
        silent.close()


# Handoff: who may send what ----------------------------------------------------


async def test_handoff_from_a_non_member_or_with_bad_entries_is_refused():
    async with running(2, CountingOrigin(data(10))) as c:
        a, b = c.nodes
        peer = c.peer(a)

        def entries(*items):
            return [cache_pb2.HandoffEntry(key=k, value=v, ttl=t) for k, v, t in items]

        async def refused(request):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await peer.Handoff(request, timeout=5)
            return info.value

        err = await refused(cache_pb2.HandoffRequest(source="10.9.9.9:1", group="g", entries=entries(("k", b"v", 0))))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "not a member" in err.details()
        assert error_info(err).reason == "PERMISSION_DENIED"
        err = await refused(cache_pb2.HandoffRequest(source=a.addr, group="g", entries=entries(("k", b"v", 0))))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # not from itself either
        err = await refused(cache_pb2.HandoffRequest(source=b.addr, group="nope", entries=entries(("k", b"v", 0))))
        assert err.code() == grpc.StatusCode.NOT_FOUND and error_info(err).reason == "GROUP_NOT_FOUND"
        for bad, what in (
            (("", b"v", 0), "key is required"),
            (("k" * 251, b"v", 0), "key longer than 250 bytes"),
            (("k", b"v", -1), "ttl must be >= 0"),
            (("k", b"v", float("nan")), "ttl must be >= 0"),
        ):
            batch = entries(("ok", b"v", 0), bad)
            err = await refused(cache_pb2.HandoffRequest(source=b.addr, group="g", entries=batch))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and what in err.details(), err.details()
            assert "entry 1" in err.details() and error_info(err).reason == "INVALID_REQUEST"
        assert a.groups["g"].main.get("ok") is None  # a bad batch is refused whole
        with pytest.raises(grpc.aio.AioRpcError) as info:
            call = c.channel(a).unary_unary("/appliance.cache.Peer/Handoff")
            await call(b"\xff\xff\xff", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A member's valid batch is taken.
        reply = await peer.Handoff(
            cache_pb2.HandoffRequest(source=b.addr, group="g", entries=entries(("ok", b"v", 0))), timeout=5
        )
        assert (reply.accepted, reply.refused) == (1, 0)


async def test_a_value_larger_than_max_value_bytes_is_refused():
    async with running(2, CountingOrigin({}), max_value_bytes=1024) as c:
        a, b = c.nodes
        request = cache_pb2.HandoffRequest(
            source=b.addr, group="g", entries=[cache_pb2.HandoffEntry(key="k", value=b"x" * 1025)]
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.peer(a).Handoff(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "larger than 1024" in info.value.details()


async def test_a_member_that_just_left_may_still_hand_off():
    truth = data(100)
    async with running(3, CountingOrigin(truth)) as c:
        await warm(c, truth)
        a, b, leaving = c.nodes
        c.ring([a, b])  # every node, the leaving one too, holds the ring without it
        assert leaving.addr not in a.peers.ring
        report = await leaving.handoff(5)
        assert report.accepted == len(owned(leaving, truth)) and report.failed == 0


# Peek -----------------------------------------------------------------------------


async def test_peek_answers_from_the_main_cache_only_and_counts_no_get():
    truth = data(50)
    origin = CountingOrigin(truth)
    async with running(2, origin, hot_cache_mirror=1.0, hot_cache_promotion="random") as c:
        a, b = c.nodes
        mine = next(k for k in truth if a.peers.owner(k) == a.addr)
        theirs = next(k for k in truth if a.peers.owner(k) == b.addr)
        await c.value(a, mine)
        await c.value(a, theirs)  # a mirrors it in its hot cache
        assert a.groups["g"].hot.get(theirs) is not None
        stats = a.groups["g"].stats
        gets, loads, served = stats.gets, len(origin.calls), (stats.peeks_served_hits, stats.peeks_served_misses)
        peer = c.peer(a)
        found = await peer.Peek(cache_pb2.PeekRequest(group="g", key=mine), timeout=5)
        assert found.found and groupcache_pb2.GetResponse.FromString(found.response).value == truth[mine]
        for key in (theirs, "k-absent"):  # hot copies and unknown keys are not answered
            assert not (await peer.Peek(cache_pb2.PeekRequest(group="g", key=key), timeout=5)).found
        assert a.groups["g"].stats.gets == gets and len(origin.calls) == loads
        assert (stats.peeks_served_hits - served[0], stats.peeks_served_misses - served[1]) == (1, 2)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await peer.Peek(cache_pb2.PeekRequest(group="nope", key="k"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await peer.Peek(cache_pb2.PeekRequest(group="g", key=""), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_joining_node_peeks_at_the_previous_owners():
    truth = data()
    origin = CountingOrigin(truth)
    async with running(2, origin) as c:
        await warm(c, truth)
        joiner = await c.start()
        c.ring(c.nodes)  # its first ring: it peeks at the ring without itself
        for key in truth:  # through the joiner: the others hold their old keys still
            assert await c.value(joiner, key) == truth[key]
        assert len(origin.calls) == len(truth)
        moved = [k for k in truth if joiner.peers.owner(k) == joiner.addr]
        assert moved and joiner.groups["g"].stats.peek_hits == len(moved)
        assert len(owned(joiner, truth)) == len(moved)


async def test_a_restarted_node_peeks_at_the_nodes_that_took_its_keys():
    truth = data()
    origin = CountingOrigin(truth)
    async with running(2, origin) as c:
        port = free_port()
        first = await c.start(port)
        c.ring(c.nodes)
        await warm(c, truth)
        loads = len(origin.calls)
        report = await leave(c, first)
        assert report.accepted > 0
        again = await c.start(port)  # a new process at the same address
        assert again.addr == first.addr
        c.ring(c.nodes)
        for key in truth:
            assert await c.value(again, key) == truth[key]
        assert len(origin.calls) == loads
        assert again.groups["g"].stats.peek_hits == report.accepted


async def test_a_miss_on_a_key_that_did_not_move_loads_without_peeking():
    truth = data(100)
    origin = CountingOrigin(truth)
    async with running(2, origin, peek_window="0.3s") as c:
        a, b = c.nodes
        # Past the window of the nodes' own first ring (a first ring counts
        # as joining: a node asks the others about every key for a while).
        await windows_over([a, b], truth)
        joiner = await c.start()
        c.ring(c.nodes)
        stay = next(k for k in truth if a.peers.owner(k) == a.addr)
        assert await c.value(a, stay) == truth[stay]
        stats = a.groups["g"].stats
        assert stats.peek_hits == stats.peek_misses == stats.peek_errors == 0 and origin.calls == [stay]
        assert joiner.groups["g"].stats.peeks_served_hits == 0


async def test_no_peeks_after_the_window_or_when_turned_off():
    truth = data(100)
    for window in ("0s", "0.2s"):
        origin = CountingOrigin(truth)
        async with running(2, origin, peek_window=window) as c:
            await warm(c, truth)
            joiner = await c.start()
            c.ring(c.nodes)
            if window != "0s":
                await windows_over([joiner], truth)
            key = next(k for k in truth if joiner.peers.owner(k) == joiner.addr)
            before = len(origin.calls)
            assert await c.value(joiner, key) == truth[key]
            assert len(origin.calls) == before + 1 and joiner.groups["g"].stats.peek_hits == 0


async def test_a_previous_owner_that_is_gone_costs_one_quick_failure():
    truth = data(100)
    origin = CountingOrigin(truth)
    async with running(3, origin) as c:
        await warm(c, truth)
        a, b, dead = c.nodes
        await c.stop(dead)  # kill: no handoff
        c.ring([a, b])
        keys = [k for k in truth if dead.groups["g"].main.get(k) is not None][:20]
        started = time.monotonic()
        for key in keys:
            assert await c.value(a, key) == truth[key]
        assert time.monotonic() - started < 2.0
        errors = a.groups["g"].stats.peek_errors + b.groups["g"].stats.peek_errors
        assert 1 <= errors <= 2  # one per node, then it is not asked for a while


@pytest.mark.parametrize("write", ["remove", "set"])
async def test_a_remove_or_set_during_a_peek_wins(write):
    truth = data()
    origin = CountingOrigin(truth)
    async with running(2, origin) as c:
        await warm(c, truth)
        before = list(c.nodes)
        joiner = await c.start()
        key = key_moving(truth, before, c.nodes, to=joiner)
        previous = key_owner(c, key, before)
        c.ring(c.nodes)
        arrived, release = held(joiner.peers.client(previous.addr), "peek")
        get = asyncio.ensure_future(c.value(joiner, key))
        await asyncio.wait_for(arrived.wait(), 5)  # the old value is on its way back
        new = b"written during the peek"
        writer = next(n for n in before if n is not previous)
        if write == "remove":
            origin.data[key] = new
            await c.cache(writer).Remove(cache_pb2.RemoveRequest(group="g", key=key), timeout=5)
        else:
            await c.cache(writer).Set(cache_pb2.SetRequest(group="g", key=key, value=new), timeout=5)
        release.set()
        assert await get == new  # not even the Get in flight gets the old value
        assert joiner.groups["g"].stats.peek_refused == 1
        for node in c.nodes:
            entry = node.groups["g"].main.get(key)
            assert entry is None or entry.value == new
            assert await c.value(node, key) == new


@pytest.mark.parametrize("write", ["remove", "set"])
async def test_a_remove_or_set_before_a_peek_wins(write):
    """The previous owner did not get the Remove (it was unreachable), the new owner did: no peek brings it back."""
    truth = data()
    origin = CountingOrigin(truth)
    async with running(2, origin) as c:
        await warm(c, truth)
        before = list(c.nodes)
        joiner = await c.start()
        key = key_moving(truth, before, c.nodes, to=joiner)
        c.ring(c.nodes)
        new = b"written before the peek"
        if write == "remove":
            origin.data[key] = new
            joiner.groups["g"].remove(key)  # what the fan-out did here; the old owner missed it
        else:
            joiner.groups["g"].set(key, new)
            joiner.groups["g"].main.remove(key)  # evicted since
            origin.data[key] = new
        assert await c.value(joiner, key) == new
        assert joiner.groups["g"].stats.peek_hits == 0


async def test_peek_carries_the_ttl():
    truth = data()
    origin = CountingOrigin(truth)
    async with running(2, origin) as c:
        before = list(c.nodes)
        joiner = await c.start()
        key = key_moving(truth, before, c.nodes, to=joiner)
        previous = key_owner(c, key, before)
        previous.groups["g"].ttl = 30  # its entries expire, the joiner's would not
        assert await c.value(previous, key) == truth[key]
        expires = previous.groups["g"].main.get(key).expires
        c.ring(c.nodes)
        assert await c.value(joiner, key) == truth[key]
        assert joiner.groups["g"].stats.peek_hits == 1
        carried = joiner.groups["g"].main.get(key).expires
        assert carried and abs(carried - expires) < 0.5


# Metrics --------------------------------------------------------------------------


async def test_metrics_count_handoffs_and_peeks():
    from prometheus_client.parser import text_string_to_metric_families

    truth = data(100)
    async with running(3, CountingOrigin(truth)) as c:
        await warm(c, truth)
        a, b, leaving = c.nodes
        report = await leave(c, leaving)
        served_before = sum(n.groups["g"].stats.peeks_served_hits for n in (a, b))
        joiner = await c.start()
        c.ring(c.nodes)
        for key in truth:
            # Through the node that does not hold it, so each key that moved
            # to the joiner is forwarded there (placement may give the joiner
            # only one node's keys).
            holder = key_owner(c, key, [a, b])
            await c.value(b if holder is a else a, key)

        def value(node, name, **labels):
            for family in text_string_to_metric_families(node.metrics.exposition()):
                for sample in family.samples:
                    if sample.name == name and sample.labels == labels:
                        return sample.value
            raise AssertionError(f"no {name}{labels}")

        out = {"group": "g", "direction": "out", "result": "accepted"}
        assert value(leaving, "groupcache_handoff_entries_total", **out) == report.accepted
        assert value(leaving, "groupcache_handoff_bytes_total", **out) == report.accepted_bytes
        assert value(leaving, "groupcache_handoff_seconds") == report.seconds > 0
        into = {"group": "g", "direction": "in", "result": "accepted"}
        assert sum(value(n, "groupcache_handoff_entries_total", **into) for n in (a, b)) == report.accepted
        hits = value(joiner, "groupcache_peeks_total", group="g", result="hit")
        served = sum(value(n, "groupcache_peeks_served_total", group="g", result="hit") for n in (a, b))
        assert hits == joiner.groups["g"].stats.peek_hits > 0
        assert served - served_before >= hits  # each answered by a or b (which may also ask each other)
