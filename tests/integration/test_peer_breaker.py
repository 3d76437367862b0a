"""A peer that gives no answers is not waited on for every Get, and a slow
one is not mistaken for it (PeerFacts' breaker). Real nodes on loopback,
real gRPC, both server backends.

- A silent peer: its connection is up (READY) but nothing answers, not even
  the health service, as with a frozen process or a cut link whose
  connection has not timed out. After a read and a probe without an answer,
  the node loads that peer's keys locally at once, and a background probe
  closes the breaker when the peer answers again.
- A slow owner (its origin held back): reads time out and load locally, but
  the probe gets an answer, so the next Gets still go to the owner.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2

from appliance.node.serving import Node
from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from appliance.rules.peers import PeerFacts
from support.nodes import CountingOrigin, settings

pytestmark = pytest.mark.usefixtures("backend")


async def until(predicate, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


class SilentPeer:
    """A gRPC server that takes every call and answers none while `silent`
    is set; otherwise it answers Health/Check and the seed's GroupCache/Get
    (like a Go node: no Peer/Forward, so grpcio nodes fall back to Gets)."""

    def __init__(self) -> None:
        self.silent = asyncio.Event()
        self.silent.set()
        self.calls: list[str] = []
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        self.addr = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def service(self, details):
        if details.method == "/grpc.health.v1.Health/Check":

            async def check(request, context):
                return await self._answer("Check", health_pb2.HealthCheckResponse(status=1))

            return grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            )
        if details.method == "/groupcachepb.GroupCache/Get":

            async def get(request, context):
                return await self._answer("Get", groupcache_pb2.GetResponse(value=b"peer:" + request.key.encode()))

            return grpc.unary_unary_rpc_method_handler(
                get,
                request_deserializer=groupcache_pb2.GetRequest.FromString,
                response_serializer=groupcache_pb2.GetResponse.SerializeToString,
            )
        return None  # UNIMPLEMENTED (Peer/Forward among them)

    async def _answer(self, method: str, response):
        self.calls.append(method)
        while self.silent.is_set():  # no answer, until cancelled by the caller's deadline
            await asyncio.sleep(0.05)
        return response


@contextlib.asynccontextmanager
async def beside_a_silent_peer(monkeypatch, n_keys: int):
    """A node and a SilentPeer, both in the node's ring; yields (node, peer,
    origin, data, the first n_keys keys the peer owns)."""
    monkeypatch.setattr(PeerFacts, "DOWN_MIN_S", 60.0)  # no probe comes due by itself here
    data = {f"k{i}": f"v{i}".encode() for i in range(300)}
    origin = CountingOrigin(data)
    peer = SilentPeer()
    await peer.server.start()
    node = Node(settings(peer_timeout="300ms", hot_cache_mirror=0.0), {"g": origin}, port=0)
    try:
        await node.start()
        node.set_peers([node.addr, peer.addr], 1)
        yield node, peer, origin, data, [k for k in data if node.peers.owner(k) == peer.addr][:n_keys]
    finally:
        await node.stop(0)
        await peer.server.stop(0)


async def test_a_silent_peer_is_skipped_until_a_probe_gets_an_answer(monkeypatch):
    async with beside_a_silent_peer(monkeypatch, 8) as (node, peer, origin, data, keys):
        facts = node.peers.pick(keys[0]).facts
        async with grpc.aio.insecure_channel(node.addr) as ch:
            stub = groupcache_pb2_grpc.GroupCacheStub(ch)

            async def get(key):
                return (await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), timeout=5)).value

            assert await get(keys[0]) == data[keys[0]]  # timed out at the peer, loaded here, not cached
            await until(lambda: not facts.read_allowed(), 5)  # the probe got no answer either
            asked = list(peer.calls)
            assert "Check" in asked
            for key in keys[1:6]:
                assert await get(key) == data[key]
            assert peer.calls == asked  # not asked again: loaded locally at once
            assert origin.calls == keys[:6]
            assert all(node.groups["g"].main.get(k) is None for k in keys[:6])
            assert node.groups["g"].stats.peer_errors == 6
            # It answers again: a probe (started by a read, which still loads
            # locally) closes the breaker, and Gets go to it again.
            peer.silent.clear()
            facts.down_until = 0.0  # the probe is due
            assert await get(keys[6]) == data[keys[6]]
            await until(facts.read_allowed, 10)
            assert await get(keys[7]) == b"peer:" + keys[7].encode()
            assert origin.calls[-1] == keys[6] and node.groups["g"].stats.peer_loads == 1


async def test_a_read_while_the_probe_asks_waits_for_its_answer(monkeypatch):
    """A Get that comes while a probe asks a silent peer is decided by that
    probe: it is not sent to the peer to wait a whole peer timeout too."""
    async with beside_a_silent_peer(monkeypatch, 2) as (node, peer, origin, data, keys):
        facts = node.peers.pick(keys[0]).facts
        assert (await node.rules.get("g", keys[0], timeout=5)).value == data[keys[0]]
        sent = peer.calls.count("Get")
        assert sent == 1 and facts.probing  # unanswered: a probe asks now
        assert (await node.rules.get("g", keys[1], timeout=5)).value == data[keys[1]]
        assert peer.calls.count("Get") == sent  # not sent: loaded here
        assert origin.calls == keys
        await until(lambda: not facts.read_allowed(), 5)  # the probe got no answer: open


async def test_a_slow_owner_keeps_its_keys():
    data = {f"k{i}": f"v{i}".encode() for i in range(300)}
    s = settings(peer_timeout="300ms", hot_cache_mirror=0.0)
    slow, local = CountingOrigin(data), CountingOrigin(data)
    slow.gate = asyncio.Event()
    owner, asker = Node(s, {"g": slow}, port=0), Node(s, {"g": local}, port=0)
    try:
        for n in (owner, asker):
            await n.start()
        for n in (owner, asker):
            n.set_peers([owner.addr, asker.addr], 1)
        keys = [k for k in data if asker.peers.owner(k) == owner.addr][:4]
        facts = asker.peers.pick(keys[0]).facts
        for key in keys[:3]:
            entry = await asker.rules.get("g", key, timeout=5)
            assert entry.value == data[key]  # the owner was too slow: loaded here
            await until(lambda: not facts.probing, 5)  # its health probe was answered
            assert facts.read_allowed()
        assert slow.calls == keys[:3]  # every one was asked of the owner first
        slow.gate.set()
        assert (await asker.rules.get("g", keys[3], timeout=5)).value == data[keys[3]]
        assert slow.calls[-1] == keys[3] and asker.groups["g"].stats.peer_loads == 1
    finally:
        await asyncio.gather(owner.stop(0), asker.stop(0), return_exceptions=True)
