"""One origin load per key under a slow origin: a forwarder waits for an
owner that is alive and loading instead of loading the key itself."""

import asyncio

import grpc
import pytest

from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from support.nodes import CountingOrigin, cluster

pytestmark = pytest.mark.usefixtures("backend")


async def get(addr, key, timeout):
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = groupcache_pb2_grpc.GroupCacheStub(ch)
        return (await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), timeout=timeout)).value


async def test_forwarder_waits_for_a_loading_owner_within_the_deadline():
    # A 1 s origin and 2 s client deadlines (the cold start).
    origin = CountingOrigin({f"k{i}": f"v{i}".encode() for i in range(50)}, delay=1.0)
    async with cluster(2, origin, hot_cache_mirror=0.0) as (a, b):
        remote = [k for k in origin.data if a.peers.owner(k) == b.addr][:4]
        # Every key asked of its owner and of the other node at once.
        values = await asyncio.gather(*(get(n.addr, k, 2.0) for k in remote for n in (a, b)))
        assert values == [origin.data[k] for k in remote for _ in (a, b)]
        assert sorted(origin.calls) == sorted(remote)  # one load per key
        assert a.groups["g"].stats.peer_errors == 0


async def test_forwarder_loads_itself_when_the_owner_is_down():
    origin = CountingOrigin({f"k{i}": f"v{i}".encode() for i in range(50)})
    async with cluster(2, origin, hot_cache_mirror=0.0) as (a, b):
        key = next(k for k in origin.data if a.peers.owner(k) == b.addr)
        await b.stop(0)
        assert await get(a.addr, key, 5.0) == origin.data[key]
        assert origin.calls == [key] and a.groups["g"].stats.peer_errors == 1
