"""Forwarding over the Peer.Forward stream, and the fallback to plain Get."""

import asyncio

import grpc
import pytest

from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from appliance.peering.engine_channel import AioEngineChannel
from support.nodes import CountingOrigin, cluster, go_like_server
from support.ports import free_port

pytestmark = pytest.mark.usefixtures("backend")  # each test on both server backends


async def get(addr, key):
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = groupcache_pb2_grpc.GroupCacheStub(ch)
        return (await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), timeout=5)).value


async def test_each_backend_forwards_its_own_way_by_default():
    """grpcio forwards over the Peer/Forward stream; the engine with unary
    Gets, which their owners answer in Rust (bench/forwarded.py measures
    why), made on its own client."""
    origin = CountingOrigin({f"k{i}": f"v{i}".encode() for i in range(100)})
    async with cluster(2, origin, hot_cache_mirror=0.0) as (a, b):
        remote = [k for k in origin.data if a.peers.owner(k) == b.addr][:5]
        assert await asyncio.gather(*(get(a.addr, k) for k in remote)) == [origin.data[k] for k in remote]
        client = a.peers.client(b.addr).calls
        assert client.streaming is (a.backend == "grpcio")
        assert (client._stream is not None) is (a.backend == "grpcio")
        assert isinstance(client.channel, AioEngineChannel) is (a.backend == "engine")
        assert b.groups["g"].stats.server_requests == len(remote) and a.groups["g"].stats.peer_errors == 0


async def test_forwarded_gets_share_one_stream_and_keep_statuses():
    origin = CountingOrigin({f"k{i}": f"v{i}".encode() for i in range(100)})
    async with cluster(2, origin, hot_cache_mirror=0.0, forward="stream") as (a, b):
        remote = [k for k in origin.data if a.peers.owner(k) == b.addr]
        values = await asyncio.gather(*(get(a.addr, k) for k in remote))
        assert values == [origin.data[k] for k in remote]
        client = a.peers.client(b.addr).calls
        stream = client._stream
        assert stream is not None and stream.broken is None and client.streaming
        assert a.groups["g"].stats.peer_loads == len(remote)
        assert b.groups["g"].stats.server_requests == len(remote)
        # The owner's NOT_FOUND comes back through the stream as such.
        missing = next(f"m{i}" for i in range(1000) if a.peers.owner(f"m{i}") == b.addr)
        try:
            await get(a.addr, missing)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("expected NOT_FOUND")
        assert client._stream is stream  # still the same stream
        assert a.groups["g"].stats.peer_errors == 0


async def test_graceful_stop_is_not_held_by_open_peer_streams():
    origin = CountingOrigin({f"k{i}": b"v" for i in range(50)})
    async with cluster(2, origin, forward="stream") as (a, b):
        remote = next(k for k in origin.data if a.peers.owner(k) == b.addr)
        await get(a.addr, remote)
        assert a.peers.client(b.addr).calls._stream.broken is None
        # b has an idle stream from a open; its stop must not wait 30 s for it.
        await asyncio.wait_for(b.stop(grace=30), 10)
        other = next(k for k in origin.data if a.peers.owner(k) == b.addr and k != remote)
        assert await get(a.addr, other) == b"v"  # owner gone: loaded locally
        assert a.groups["g"].stats.peer_errors == 1


async def test_peer_without_the_stream_service_gets_plain_gets():
    """A node that only speaks the seed's GroupCache/Get (a Go node, say)."""
    served = []
    server, go = await go_like_server(served)
    try:
        async with cluster(1, CountingOrigin({}), forward="stream") as (a,):
            a.set_peers([a.addr, go], 2)
            keys = [k for k in (f"k{i}" for i in range(200)) if a.peers.owner(k) == go][:5]
            for k in keys:
                assert await get(a.addr, k) == b"from-go:" + k.encode()
            assert served == keys
            assert a.peers.client(go).calls.streaming is False
            assert a.groups["g"].stats.peer_errors == 0
    finally:
        await server.stop(0)


async def test_peer_without_the_stream_service_is_recognised_on_every_fresh_stream():
    """Against a real server without Peer.Forward, each fresh node's first
    stream fails in whichever order grpc delivers the errors (see
    tests/unit/test_forward_error_orders.py for each order replayed); every
    Get still ends in a plain Get to the owner (no local load, no peer
    error), and the answer is kept per address across a leave and rejoin."""
    served = []
    server, go = await go_like_server(served)
    try:
        for _ in range(6):  # fresh nodes: fresh first streams
            origin = CountingOrigin({})
            async with cluster(1, origin, forward="stream") as (a,):
                a.set_peers([a.addr, go], 2)
                keys = [k for k in (f"k{i}" for i in range(400)) if a.peers.owner(k) == go][:6]
                served.clear()
                values = await asyncio.gather(*(get(a.addr, k) for k in keys[:3]))  # together, on the first stream
                assert values == [b"from-go:" + k.encode() for k in keys[:3]]
                assert a.peers.client(go).calls.streaming is False
                assert await get(a.addr, keys[3]) == b"from-go:" + keys[3].encode()
                a.set_peers([a.addr], 3)  # the Go node leaves ...
                a.set_peers([a.addr, go], 4)  # ... and rejoins: a new client, told already
                assert a.peers.client(go).calls.streaming is False
                for k in keys[4:]:
                    assert await get(a.addr, k) == b"from-go:" + k.encode()
                assert sorted(served) == sorted(keys)
                stats = a.groups["g"].stats
                assert (stats.peer_errors, stats.local_loads, origin.calls) == (0, 0, [])
    finally:
        await server.stop(0)


async def test_peer_that_is_down_is_not_taken_for_one_without_the_stream():
    """A refused stream to a dead owner: one plain Get is tried, fails too,
    the key is loaded locally (a peer error) and the next Get tries the
    stream again."""
    dead = f"127.0.0.1:{free_port()}"
    origin = CountingOrigin({f"k{i}": b"local" for i in range(400)})
    async with cluster(1, origin, forward="stream") as (a,):
        a.set_peers([a.addr, dead], 2)
        keys = [k for k in origin.data if a.peers.owner(k) == dead][:2]
        for k in keys:
            assert await get(a.addr, k) == b"local"
        assert a.peers.client(dead).calls.streaming is True
        assert a.groups["g"].stats.peer_errors == 2
        assert origin.calls == keys


async def test_owner_that_comes_back_is_reached_at_once():
    """A Get finds the owner down (refused: a peer error, loaded locally).
    The owner comes back at the same address and rejoins the ring: the very
    next forward reaches it. (grpc shares subchannels between channels, so
    the client made for the rejoined peer used to inherit the refused
    subchannel's reconnect backoff and fail fast for a second or more.)"""
    port = free_port()
    owner = f"127.0.0.1:{port}"
    origin = CountingOrigin({f"k{i}": b"local" for i in range(400)})
    async with cluster(1, origin) as (a,):
        a.set_peers([a.addr, owner], 2)
        keys = [k for k in origin.data if a.peers.owner(k) == owner][:3]
        assert await get(a.addr, keys[0]) == b"local"
        assert a.groups["g"].stats.peer_errors == 1
        served = []
        server, _ = await go_like_server(served, port=port)
        try:
            a.set_peers([a.addr], 3)
            a.set_peers([a.addr, owner], 4)
            for k in keys[1:]:
                assert await get(a.addr, k) == b"from-go:" + k.encode()
            assert served == keys[1:]
            assert a.groups["g"].stats.peer_errors == 1
        finally:
            await server.stop(0)
