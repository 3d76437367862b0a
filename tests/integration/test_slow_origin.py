"""One load per key per cluster under a slow origin, and a frozen owner is
still no client failure. Real nodes on loopback, real gRPC, every server
backend.

- A slow origin (longer than half the clients' deadline): a forwarder whose
  owner has not answered by half the caller's deadline asks the owner's
  server whether it is alive (a health probe, answered by its server, not
  its origin). It is, so the forwarder waits for its answer within the
  caller's deadline instead of loading the key itself: each key is loaded
  once, however many clients ask the owner and the non-owner at once.
- A frozen owner (its connection is up, nothing answers, not even the
  health service): the probe gets no answer, and at half the deadline the
  forwarder loads the key itself, so the client still gets its value.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from appliance.node.serving import Node
from appliance.pb import cache_pb2, cache_pb2_grpc, groupcache_pb2, groupcache_pb2_grpc
from appliance.rules.peers import PeerFacts
from support.fake_peers import FrozenPeer
from support.nodes import CountingOrigin, settings

pytestmark = pytest.mark.usefixtures("backend")

DEADLINE = 2.0  # the clients' deadline (seconds)


async def until(predicate, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def read_all(addrs_keys: list[tuple[str, str]]) -> list[bytes | BaseException]:
    """One client per (node address, key), all at once, each with DEADLINE:
    its value, or the error it got."""
    channels = {addr: grpc.aio.insecure_channel(addr) for addr, _ in addrs_keys}
    try:
        for ch in channels.values():
            await asyncio.wait_for(ch.channel_ready(), 5)

        async def get(addr: str, key: str) -> bytes:
            stub = groupcache_pb2_grpc.GroupCacheStub(channels[addr])
            return (await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), timeout=DEADLINE)).value

        return await asyncio.gather(*(get(a, k) for a, k in addrs_keys), return_exceptions=True)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels.values()))


@contextlib.asynccontextmanager
async def owner_and_asker(delay: float):
    """Two nodes on one counting origin of `delay` s (it counts the
    cluster's loads); yields (owner, asker, origin, data, 4 keys the owner owns)."""
    data = {f"k{i}": f"v{i}".encode() for i in range(300)}
    origin = CountingOrigin(data, delay=delay)
    s = settings(hot_cache_mirror=0.0)  # peer_timeout: the default 5 s
    owner, asker = Node(s, {"g": origin}, port=0), Node(s, {"g": origin}, port=0)
    try:
        for n in (owner, asker):
            await n.start()
        for n in (owner, asker):
            n.set_peers([owner.addr, asker.addr], 1)
        yield owner, asker, origin, data, [k for k in data if asker.peers.owner(k) == owner.addr][:4]
    finally:
        await asyncio.gather(owner.stop(0), asker.stop(0), return_exceptions=True)


async def test_a_slow_origin_loads_each_key_once():
    """1.2 s origin, 2 s deadlines (half of it is well short of the load):
    clients of the owner and of a non-owner, four per key and node."""
    async with owner_and_asker(1.2) as (owner, asker, origin, data, keys):
        asks = [(addr, key) for key in keys for addr in (asker.addr, owner.addr) for _ in range(4)]
        values = await read_all(asks)
        assert sorted(origin.calls) == sorted(keys)  # one load per key in the cluster
        assert values == [data[key] for _, key in asks]  # every client got its value in time
        stats = asker.groups["g"].stats
        assert stats.peer_errors == 0 and stats.peer_loads == len(keys)
        assert asker.peers.pick(keys[0]).facts.read_allowed()  # the breaker stayed closed


async def test_a_slow_origin_loads_each_key_once_for_get_many_too():
    """A GetMany at the non-owner (one batch to the owner) beside Gets at the owner."""
    async with owner_and_asker(1.2) as (owner, asker, origin, data, keys):
        async with grpc.aio.insecure_channel(asker.addr) as ch:
            many = cache_pb2_grpc.CacheStub(ch).GetMany(
                cache_pb2.GetManyRequest(group="g", keys=keys), timeout=DEADLINE
            )
            gets, reply = await asyncio.gather(read_all([(owner.addr, k) for k in keys]), many)
        assert sorted(origin.calls) == sorted(keys)  # one load per key in the cluster
        assert gets == [data[k] for k in keys]
        assert {r.key: (r.code, r.value) for r in reply.results} == {k: (0, data[k]) for k in keys}
        assert asker.groups["g"].stats.peer_errors == 0


@contextlib.asynccontextmanager
async def beside_a_frozen_owner(monkeypatch):
    monkeypatch.setattr(PeerFacts, "DOWN_MIN_S", 60.0)  # no probe comes due by itself here
    data = {f"k{i}": f"v{i}".encode() for i in range(300)}
    origin = CountingOrigin(data, delay=0.5)
    peer = FrozenPeer()
    await peer.server.start()
    node = Node(settings(hot_cache_mirror=0.0), {"g": origin}, port=0)  # peer_timeout: the default 5 s
    try:
        await node.start()
        node.set_peers([node.addr, peer.addr], 1)
        yield node, peer, origin, data, [k for k in data if node.peers.owner(k) == peer.addr][:4]
    finally:
        await node.stop(0)
        await peer.server.stop(0)


async def test_a_frozen_owner_is_no_client_failure(monkeypatch):
    async with beside_a_frozen_owner(monkeypatch) as (node, peer, origin, data, keys):
        facts = node.peers.pick(keys[0]).facts
        # The first reads are sent to the owner, which never answers them
        # nor the probe: each client still gets its value within its deadline.
        values = await read_all([(node.addr, key) for key in keys[:2] for _ in range(3)])
        assert values == [data[key] for key in keys[:2] for _ in range(3)]
        assert any(c.endswith(("/Forward", "/Get")) for c in peer.calls)  # it was asked first
        assert sorted(origin.calls) == sorted(keys[:2])  # loaded here, once per key
        assert all(node.groups["g"].main.get(k) is None for k in keys)  # not cached as owner
        await until(lambda: not facts.read_allowed(), 5)  # the probe got no answer: breaker open
        # Now its keys load here at once.
        assert await read_all([(node.addr, key) for key in keys[2:]]) == [data[k] for k in keys[2:]]
        assert sorted(origin.calls) == sorted(keys)
