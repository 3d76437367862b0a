"""GetMany, Set, Remove and TTL across three real nodes on loopback."""

import asyncio
import time

import grpc
import pytest

from appliance.pb import cache_pb2, cache_pb2_grpc, groupcache_pb2, groupcache_pb2_grpc
from appliance.peering.peer_client import GrpcPeerClient as PeerClient
from support.nodes import CountingOrigin, all_arrived, cluster

pytestmark = pytest.mark.usefixtures("backend")  # each test on both server backends


class Stubs:
    def __init__(self, nodes):
        self.channels = [grpc.aio.insecure_channel(n.addr) for n in nodes]
        self.get = [groupcache_pb2_grpc.GroupCacheStub(c) for c in self.channels]
        self.cache = [cache_pb2_grpc.CacheStub(c) for c in self.channels]

    async def value(self, i, key, group="g"):
        r = await self.get[i].Get(groupcache_pb2.GetRequest(group=group, key=key), timeout=5)
        return r.value

    async def close(self):
        for c in self.channels:
            await c.close()


async def eventually(predicate, timeout=5.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval)


@pytest.fixture
def batch_calls(monkeypatch):
    calls = []
    real = PeerClient.get_many

    async def counting(self, group, keys, timeout):
        calls.append((self.addr, list(keys)))
        return await real(self, group, keys, timeout)

    monkeypatch.setattr(PeerClient, "get_many", counting)
    return calls


async def test_get_many_one_call_per_owner_one_load_per_key(batch_calls):
    data = {f"k{i}": f"v{i}".encode() for i in range(300)}
    origin = CountingOrigin(data)
    async with cluster(3, origin, hot_cache_mirror=0.0) as nodes:
        s = Stubs(nodes)
        keys = list(data) + ["absent", "k1", ""]
        reply = await s.cache[0].GetMany(cache_pb2.GetManyRequest(group="g", keys=keys), timeout=5)
        assert [r.key for r in reply.results] == keys
        for r in reply.results[:300]:
            assert (r.code, r.value) == (0, data[r.key])
        assert reply.results[300].code == grpc.StatusCode.NOT_FOUND.value[0]
        assert reply.results[301].value == b"v1"
        assert reply.results[302].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert sorted(origin.calls) == sorted([*data, "absent"])  # one load per key
        owners = {c[0] for c in batch_calls}
        assert owners == {nodes[1].addr, nodes[2].addr} and len(batch_calls) == 2
        # A second batch is all hits at the owners: no new loads.
        await s.cache[1].GetMany(cache_pb2.GetManyRequest(group="g", keys=list(data)), timeout=5)
        assert len(origin.calls) == 301
        await s.close()


async def test_get_many_and_get_share_singleflight():
    origin = CountingOrigin({"k": b"v"})
    origin.gate = asyncio.Event()
    async with cluster(3, origin) as nodes:
        s = Stubs(nodes)
        calls = [s.get[i % 3].Get(groupcache_pb2.GetRequest(group="g", key="k"), timeout=5) for i in range(30)]
        calls += [
            s.cache[i % 3].GetMany(cache_pb2.GetManyRequest(group="g", keys=["k", "k"]), timeout=5) for i in range(30)
        ]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await all_arrived(nodes, 30 + 30 * 2)  # each GetMany asks for "k" twice
        origin.gate.set()
        await asyncio.gather(*tasks)
        assert origin.calls == ["k"]
        await s.close()


async def test_remove_drops_owner_and_hot_copies_everywhere():
    origin = CountingOrigin({"k": b"old"})
    async with cluster(3, origin, hot_cache_mirror=1.0, hot_cache_promotion="random") as nodes:
        s = Stubs(nodes)
        for i in range(3):
            assert await s.value(i, "k") == b"old"
        owner = nodes[0].peers.owner("k")
        held = [n.addr for n in nodes if n.groups["g"].peek("k") is not None]
        assert sorted(held) == sorted(n.addr for n in nodes)  # owner main + 2 hot copies
        origin.data["k"] = b"new"
        via = next(i for i, n in enumerate(nodes) if n.addr != owner)
        reply = await s.cache[via].Remove(cache_pb2.RemoveRequest(group="g", key="k"), timeout=5)
        assert reply.owner == owner
        assert sorted(p.addr for p in reply.peers if p.confirmed) == sorted(n.addr for n in nodes)
        assert all(n.groups["g"].peek("k") is None for n in nodes)
        for i in range(3):
            assert await s.value(i, "k") == b"new"
        await s.close()


async def test_remove_reports_unreachable_peer():
    origin = CountingOrigin({"k": b"v"})
    async with cluster(3, origin) as nodes:
        s = Stubs(nodes)
        await nodes[2].stop(0)
        reply = await s.cache[0].Remove(cache_pb2.RemoveRequest(group="g", key="k"), timeout=3)
        by_addr = {p.addr: p.confirmed for p in reply.peers}
        assert by_addr[nodes[2].addr] is False
        assert by_addr[nodes[0].addr] is True and by_addr[nodes[1].addr] is True
        await s.close()


async def test_remove_racing_an_inflight_load_does_not_resurrect_old_value():
    origin = CountingOrigin({"k": b"old"})
    origin.gate = asyncio.Event()
    async with cluster(3, origin, hot_cache_mirror=1.0, hot_cache_promotion="random") as nodes:
        s = Stubs(nodes)
        owner = nodes[0].peers.owner("k")
        # Loads in flight on the owner, via every node.
        inflight = [asyncio.ensure_future(s.value(i, "k")) for i in range(3)]
        await eventually(lambda: asyncio.sleep(0, result=bool(origin.calls)))
        reply = await s.cache[0].Remove(cache_pb2.RemoveRequest(group="g", key="k"), timeout=5)
        assert all(p.confirmed for p in reply.peers)
        origin.data["k"] = b"new"
        origin.gate.set()  # the old load now completes with b"old"
        await asyncio.gather(*inflight)
        assert all(n.groups["g"].peek("k") is None or n.groups["g"].peek("k").value == b"new" for n in nodes)
        for i in range(3):
            assert await s.value(i, "k") == b"new"
        assert owner in [n.addr for n in nodes]
        await s.close()


async def test_set_writes_through_to_owner_and_invalidates_hot_copies():
    origin = CountingOrigin({"k": b"origin"})
    async with cluster(3, origin, hot_cache_mirror=1.0, hot_cache_promotion="random") as nodes:
        s = Stubs(nodes)
        for i in range(3):
            await s.value(i, "k")
        owner = nodes[0].peers.owner("k")
        via = next(i for i, n in enumerate(nodes) if n.addr != owner)
        reply = await s.cache[via].Set(cache_pb2.SetRequest(group="g", key="k", value=b"pushed"), timeout=5)
        assert reply.owner == owner and all(p.confirmed for p in reply.peers)
        for n in nodes:
            entry = n.groups["g"].peek("k")
            assert (entry is not None and entry.value == b"pushed") if n.addr == owner else entry is None
        for i in range(3):
            assert await s.value(i, "k") == b"pushed"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.cache[0].Set(
                cache_pb2.SetRequest(group="g", key="k", value=b"x" * (4 * 1024 * 1024 + 1)), timeout=5
            )
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        await s.close()


async def test_ttl_expires_on_owner_and_hot_copies():
    origin = CountingOrigin({"k": b"v1"})
    async with cluster(3, origin, hot_cache_mirror=1.0, hot_cache_promotion="random") as nodes:
        for n in nodes:
            n.groups["g"].ttl = 0.5
        s = Stubs(nodes)
        for i in range(3):
            assert await s.value(i, "k") == b"v1"
        hot = [n for n in nodes if n.groups["g"].hot.get("k") is not None]
        assert len(hot) == 2
        for n in hot:  # the hot copy never outlives the owner's entry
            owner_node = next(x for x in nodes if x.addr == n.peers.owner("k"))
            assert n.groups["g"].hot.get("k").expires <= owner_node.groups["g"].main.get("k").expires + 0.01
        origin.data["k"] = b"v2"

        async def all_new():
            return all([await s.value(i, "k") == b"v2" for i in range(3)])

        await eventually(all_new, timeout=5)
        await s.close()


async def test_python_client_get_many_set_remove():
    from appliance.client import Client

    origin = CountingOrigin({f"k{i}": b"v" for i in range(20)})
    async with cluster(3, origin) as nodes:

        def sync_part():
            with Client([n.addr for n in nodes]) as c:
                got = c.get_many("g", [f"k{i}" for i in range(20)] + ["nope"])
                assert got == {f"k{i}": b"v" for i in range(20)}
                assert c.set("g", "k1", b"w").owner == c.locate("k1")
                assert c.get("g", "k1") == b"w"
                r = c.remove("g", "k1")
                assert all(p.confirmed for p in r.peers)
                assert c.get("g", "k1") == b"v"

        await asyncio.to_thread(sync_part)
