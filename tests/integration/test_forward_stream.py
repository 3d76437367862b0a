"""Forwarding over the Peer.Forward stream, and the fallback to plain Get."""

import asyncio

import grpc

from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from support.nodes import CountingOrigin, cluster
import pytest

pytestmark = pytest.mark.usefixtures("backend")  # each test on both server backends


async def get(addr, key):
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = groupcache_pb2_grpc.GroupCacheStub(ch)
        return (await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), timeout=5)).value


async def test_forwarded_gets_share_one_stream_and_keep_statuses():
    origin = CountingOrigin({f"k{i}": f"v{i}".encode() for i in range(100)})
    async with cluster(2, origin, hot_cache_mirror=0.0) as (a, b):
        remote = [k for k in origin.data if a.peers.owner(k) == b.addr]
        values = await asyncio.gather(*(get(a.addr, k) for k in remote))
        assert values == [origin.data[k] for k in remote]
        client = a.peers.client(b.addr)
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
    async with cluster(2, origin) as (a, b):
        remote = next(k for k in origin.data if a.peers.owner(k) == b.addr)
        await get(a.addr, remote)
        assert a.peers.client(b.addr)._stream.broken is None
        # b has an idle stream from a open; its stop must not wait 30 s for it.
        await asyncio.wait_for(b.stop(grace=30), 10)
        other = next(k for k in origin.data if a.peers.owner(k) == b.addr and k != remote)
        assert await get(a.addr, other) == b"v"  # owner gone: loaded locally
        assert a.groups["g"].stats.peer_errors == 1


async def test_peer_without_the_stream_service_gets_plain_gets():
    """A node that only speaks the seed's GroupCache/Get (a Go node, say)."""
    served = []

    async def seed_get(request, context):
        served.append(request.key)
        return groupcache_pb2.GetResponse(value=b"from-go:" + request.key.encode())

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("groupcachepb.GroupCache", {
        "Get": grpc.unary_unary_rpc_method_handler(
            seed_get,
            request_deserializer=groupcache_pb2.GetRequest.FromString,
            response_serializer=groupcache_pb2.GetResponse.SerializeToString,
        )
    }),))  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    go = f"127.0.0.1:{port}"
    try:
        async with cluster(1, CountingOrigin({})) as (a,):
            a.set_peers([a.addr, go], 2)
            keys = [k for k in (f"k{i}" for i in range(200)) if a.peers.owner(k) == go][:5]
            for k in keys:
                assert await get(a.addr, k) == b"from-go:" + k.encode()
            assert served == keys
            assert a.peers.client(go).streaming is False
            assert a.groups["g"].stats.peer_errors == 0
    finally:
        await server.stop(0)
