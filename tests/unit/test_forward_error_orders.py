"""How a node tells a peer without Peer.Forward, whatever order grpc
delivers the stream's errors in.

A real server without the stream service (tests/integration/
test_forward_stream.py) fails a first stream in an order grpc chooses, so no
test can pick one. Here each order observed against a real seed node is
replayed on the stream call of a real node's client to a real go-like
server (only GroupCache/Get), which then answers the plain Gets.
"""

import asyncio

import grpc
import pytest

from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from support.nodes import CountingOrigin, cluster, go_like_server

pytestmark = pytest.mark.usefixtures("backend")


async def get(addr, key):
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = groupcache_pb2_grpc.GroupCacheStub(ch)
        return (await stub.Get(groupcache_pb2.GetRequest(group="g", key=key), timeout=5)).value


# What grpc.aio reports when a server without Peer.Forward (the seed's Go
# server) ends our stream with UNIMPLEMENTED: trailers-only, then RST_STREAM.
# Over 60 fresh streams to a real seed node (tests/integration/
# test_seed_interop.py runs it): 29 reader_first, 11 writer_unimplemented,
# 20 writer_clobbers. status_before_write is what a second write, queued
# behind the first, meets. See ForwardStream.unanswered_code.
def _rpc_error(code, details, debug=""):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, debug)


UNIMPLEMENTED = ("unimplemented", "unknown service appliance.cache.Peer")
CLOBBERED = ("internal", "Internal error from Core")
ORDERS = {
    # the status arrives first: the reader raises UNIMPLEMENTED, a later write InvalidStateError
    "reader_first": dict(write=None, read=UNIMPLEMENTED, final=UNIMPLEMENTED),
    # the status arrives while the writer waits for its metadata to be sent
    "writer_unimplemented": dict(write=UNIMPLEMENTED, read=UNIMPLEMENTED, final=UNIMPLEMENTED),
    # the reset lands while the first write is in flight: set_internal_error
    # overwrites the call's status, so the writer, the reader and code() all say INTERNAL
    "writer_clobbers": dict(write=CLOBBERED, read=CLOBBERED, final=CLOBBERED),
    # the status is in before the first write starts: the writer's error is no AioRpcError
    "status_before_write": dict(write="finished", read=UNIMPLEMENTED, final=UNIMPLEMENTED),
}


class ReplayedForward:
    """Stands in for the Peer.Forward method of a channel to a Go node:
    each call replays one observed order of errors."""

    def __init__(self, order):
        self.order = order
        self.calls = 0

    def __call__(self, metadata=None):
        self.calls += 1
        return _ReplayedCall(**self.order)


class _ReplayedCall:
    def __init__(self, write, read, final):
        self._write, self._read, self._final = write, read, final
        self._done = asyncio.Event()

    def _error(self, spec):
        code = getattr(grpc.StatusCode, spec[0].upper())
        debug = (
            'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object>,)' if spec is CLOBBERED else ""
        )
        return _rpc_error(code, spec[1], debug)

    async def write(self, request):
        await asyncio.sleep(0)
        if self._write is None:
            return
        if self._write == "finished":  # the call is done already
            self._done.set()
            raise asyncio.InvalidStateError("RPC already finished.")
        self._done.set()
        raise self._error(self._write)

    async def read(self):
        await asyncio.sleep(0.001)
        self._done.set()
        raise self._error(self._read)

    async def code(self):
        await self._done.wait()
        return self._error(self._final).code()

    def cancel(self):
        return False


@pytest.mark.parametrize("order", sorted(ORDERS))
async def test_each_observed_error_order_ends_in_plain_gets(order):
    """Every order of the stream's errors ends in a plain Get to the owner
    (no local load, no peer error), and the answer is kept per address: a
    client made anew after the peer left and rejoined the ring sends plain
    Gets straight away."""
    served = []
    server, go = await go_like_server(served)
    origin = CountingOrigin({})
    try:
        async with cluster(1, origin, forward="stream") as (a,):
            a.set_peers([a.addr, go], 2)
            forward = a.peers.client(go).calls._forward = ReplayedForward(ORDERS[order])
            keys = [k for k in (f"k{i}" for i in range(400)) if a.peers.owner(k) == go][:6]
            values = await asyncio.gather(*(get(a.addr, k) for k in keys[:3]))  # together, on the first stream
            assert values == [b"from-go:" + k.encode() for k in keys[:3]]
            assert a.peers.client(go).calls.streaming is False
            streams = forward.calls
            assert await get(a.addr, keys[3]) == b"from-go:" + keys[3].encode()
            assert forward.calls == streams  # no new stream
            a.set_peers([a.addr], 3)  # the Go node leaves ...
            a.set_peers([a.addr, go], 4)  # ... and rejoins: a new client
            rejoined = a.peers.client(go).calls
            rejoined._forward = ReplayedForward(ORDERS[order])
            assert rejoined.streaming is False
            for k in keys[4:]:
                assert await get(a.addr, k) == b"from-go:" + k.encode()
            assert rejoined._forward.calls == 0
            assert sorted(served) == sorted(keys)
            stats = a.groups["g"].stats
            assert (stats.peer_errors, stats.local_loads, origin.calls) == (0, 0, [])
    finally:
        await server.stop(0)
