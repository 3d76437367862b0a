"""An owner that answers its first health probe, and so is waited for as a
live owner loading the key, then freezes: the forwarder asks again while it
waits, leaves the owner once it stops answering, and loads the key itself
within the client's deadline (peer failure is not client failure).

The waiting is the peer client's (peering/breaker.py) on grpcio, and
the engine's own forward (engine/src/forward.rs) on the engine: both run.
"""

from __future__ import annotations

import grpc
import pytest

from appliance.node.serving import Node
from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from appliance.rules.peers import PeerFacts
from support.fake_peers import FrozenPeer
from support.nodes import CountingOrigin, engine_serving, settings

DEADLINE = 8.0  # half: 4 s; waiting out a live owner: up to 7.9 s
ORIGIN_S = 1.0  # a local load after 7.9 s would miss the deadline

pytestmark = pytest.mark.usefixtures("backend")


async def test_an_owner_that_freezes_while_waited_for_is_left_in_time(monkeypatch):
    monkeypatch.setattr(PeerFacts, "DOWN_MIN_S", 60.0)  # no background probe comes due by itself
    peer = FrozenPeer(health_answers=1)
    await peer.server.start()
    data = {f"k{i}": f"v{i}".encode() for i in range(200)}
    origin = CountingOrigin(data, delay=ORIGIN_S)
    node = Node(settings(hot_cache_mirror=0.0, peer_timeout="10s"), {"g": origin}, port=0)
    try:
        await node.start()
        node.set_peers([node.addr, peer.addr], 1)
        key = next(k for k in data if node.peers.owner(k) == peer.addr)
        await engine_serving(node)
        # A client's Get with its deadline: left once the owner went silent,
        # not at the end of the wait, the local load (1 s) fits in it.
        async with grpc.aio.insecure_channel(node.addr) as channel:
            stub = groupcache_pb2_grpc.GroupCacheStub(channel)
            reply = await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), timeout=DEADLINE)
        assert reply.value == data[key] and origin.calls == [key]  # loaded here
        assert peer.health_answered == 1 and peer.calls.count("/grpc.health.v1.Health/Check") >= 2, peer.calls
    finally:
        await node.stop(0)
        await peer.server.stop(0)
