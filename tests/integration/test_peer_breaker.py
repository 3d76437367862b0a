"""A peer that gives no answers is not waited on for every Get: after two
reads in a row without an answer (or at once when its channel is down),
a node loads those keys locally without asking it, until a background
probe gets an answer. Real nodes on loopback, both server backends; the
silent owner is alive but stuck (its origin held back), as a frozen or
cut-off peer whose connection still looks up."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from support.nodes import CountingOrigin, settings

from appliance.node.node import Node
from appliance.node.peers import PeerFacts
from appliance.pb import groupcache_pb2, groupcache_pb2_grpc


async def until(predicate, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


pytestmark = pytest.mark.usefixtures("backend")


async def test_a_silent_owner_is_skipped_until_it_answers_again(monkeypatch):
    monkeypatch.setattr(PeerFacts, "DOWN_MIN_S", 60.0)  # the wait never runs out by itself here
    data = {f"k{i}": f"v{i}".encode() for i in range(200)}
    s = settings(peer_timeout="300ms", hot_cache_mirror=0.0)
    stuck, local = CountingOrigin(data), CountingOrigin(data)
    stuck.gate = asyncio.Event()
    owner, asker = Node(s, {"g": stuck}, port=0), Node(s, {"g": local}, port=0)
    try:
        for n in (owner, asker):
            await n.start()
        for n in (owner, asker):
            n.set_peers([owner.addr, asker.addr], 1)
        keys = [k for k in data if asker.peers.owner(k) == owner.addr][:8]
        async with grpc.aio.insecure_channel(asker.addr) as ch:
            stub = groupcache_pb2_grpc.GroupCacheStub(ch)

            async def get(key):
                return (await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), timeout=5)).value

            for key in keys[:6]:
                assert await get(key) == data[key]  # loaded locally, right, not cached as owner
            # Only the first two reached the stuck owner; the rest did not wait for it.
            assert stuck.calls == keys[:2], stuck.calls
            assert local.calls == keys[:6]
            assert asker.groups["g"].stats.peer_errors == 6
            assert all(asker.groups["g"].main.get(k) is None for k in keys[:6])
            # It answers again: a background probe (not a client's read) closes the breaker.
            stuck.gate.set()
            facts = asker.peers.pick(keys[6]).facts
            assert not facts.read_allowed()
            facts.down_until = 0.0  # the probe is due
            assert await get(keys[6]) == data[keys[6]]  # this read still loads locally, and starts the probe
            await until(facts.read_allowed, 10)
            assert await get(keys[7]) == data[keys[7]]
            assert stuck.calls[2:] == [keys[7]] and local.calls[-1] == keys[6]
            assert asker.groups["g"].stats.peer_loads == 1
    finally:
        await asyncio.gather(owner.stop(0), asker.stop(0), return_exceptions=True)
