"""Callers without the cluster's credential cannot pass for peers: a client
that sets the forwarded marker is served as any client, and a Peer/Forward
stream it leaves unread holds a bounded number of answers. Both backends,
real gRPC on loopback."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from appliance.pb import cache_pb2, groupcache_pb2, groupcache_pb2_grpc
from appliance.protocol.metadata import FORWARDED
from appliance.rules.auth import bearer
from support.nodes import CountingOrigin, cluster

pytestmark = pytest.mark.usefixtures("backend")

TOKEN = "t" * 8 + os.urandom(12).hex()
MARKED = (FORWARDED,)


async def test_a_client_setting_the_forwarded_marker_is_served_as_a_client():
    """The marker alone once made a non-owner load the key as its owner
    (skipping the owner's singleflight and keeping the value in its main
    cache); without the cluster token it now goes to the owner as any Get."""
    data = {f"k{i}": b"v" for i in range(200)}
    origin = CountingOrigin(data)
    async with cluster(2, origin, token=TOKEN) as (a, b):
        key = next(k for k in data if a.peers.owner(k) == b.addr)
        async with grpc.aio.insecure_channel(a.addr) as ch:
            stub = groupcache_pb2_grpc.GroupCacheStub(ch)
            reply = await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), metadata=MARKED, timeout=5)
        assert reply.value == b"v"
        assert (a.groups["g"].stats.local_loads, b.groups["g"].stats.local_loads) == (0, 1)  # the owner loaded it
        assert a.groups["g"].stats.peer_loads == 1 and a.groups["g"].main.get(key) is None
        # A peer's forward (marker and cluster token) is still served by the receiver itself.
        other = next(k for k in data if a.peers.owner(k) == b.addr and k != key)
        async with grpc.aio.insecure_channel(a.addr) as ch:
            stub = groupcache_pb2_grpc.GroupCacheStub(ch)
            await stub.Get(groupcache_pb2.GetRequest(group="g", key=other), metadata=MARKED + bearer(TOKEN), timeout=5)
        assert a.groups["g"].stats.local_loads == 1 and a.groups["g"].main.get(other) is not None


async def test_an_unread_forward_stream_holds_at_most_its_window():
    """A caller that sends 600 Forward requests and reads no answer gets at
    most forward_window (here 50) of them worked on, plus what HTTP/2 flow
    control carries to it (an unbounded queue held all 600 answers);
    reading them lets the rest through, every answer right."""
    window, sent = 50, 600
    async with cluster(1, CountingOrigin({"k": b"x" * 65536}), token=TOKEN, forward_window=window) as (node,):
        async with grpc.aio.insecure_channel(node.addr) as ch:
            forward = ch.stream_stream(
                "/appliance.cache.Peer/Forward",
                request_serializer=cache_pb2.ForwardRequest.SerializeToString,
                response_deserializer=cache_pb2.ForwardResponse.FromString,
            )
            call = forward(metadata=bearer(TOKEN))

            async def send() -> None:
                for i in range(sent):
                    await call.write(cache_pb2.ForwardRequest(id=i, group="g", key="k", timeout=5))
                await call.done_writing()

            sending = asyncio.ensure_future(send())
            gets = lambda: node.groups["g"].stats.gets  # noqa: E731
            # Worked on: the window, plus the answers HTTP/2 flow control
            # took before the caller's side filled up; then it stays put.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            last, still_since = -1, loop.time()
            while loop.time() < deadline and loop.time() - still_since < 0.5:
                if gets() != last:
                    last, still_since = gets(), loop.time()
                await asyncio.sleep(0.02)
            held = gets()
            print(f"\n[unread Forward stream] {sent} sent, {held} worked on with a window of {window}")
            # (the engine's proxy to the stream service buffers some more)
            assert window <= held <= 4 * window
            answers = [await call.read() for _ in range(sent)]
            await asyncio.wait_for(sending, 10)
        assert sorted(r.id for r in answers) == list(range(sent))
        value = groupcache_pb2.GetResponse(value=b"x" * 65536).SerializeToString()
        assert all(r.response == value and not r.code for r in answers)
        assert gets() == sent


async def test_a_getmany_reply_is_sized_in_bytes_not_characters():
    """The reply-size limit counts what goes on the wire: 400 keys of 62
    four-byte characters (248 bytes each) pass the limit (1 KiB values + 64
    KiB), while as many 62-letter keys, the same character count, do not."""
    from appliance.cache import errors

    wide = [f"{i:04d}" + "\U0001f511" * 58 for i in range(400)]  # 4 + 232 bytes
    narrow = [f"{i:04d}" + "k" * 58 for i in range(400)]
    async with cluster(1, CountingOrigin(), max_value_bytes="1KiB") as (node,):
        results = await node.rules.get_many("g", narrow)
        assert all(isinstance(r, errors.KeyNotFound) for r in results)
        with pytest.raises(errors.TooLarge, match="bytes"):
            await node.rules.get_many("g", wide)
