"""A peer client whose channel a ring change closed under a read in flight
answers as a peer that cannot be reached (PeerError: the key loads
locally), never with grpc's UsageError, which a worker turned into INTERNAL
for its client (seen once in the partition test of the multibox suite)."""

from __future__ import annotations

import pytest

from appliance.cache import errors
from appliance.peering.breaker import Breaker
from appliance.peering.peer_client import GrpcPeerClient, channel
from appliance.rules.peers import PeerFacts
from support.ports import free_port


@pytest.mark.parametrize("forward", ["stream", "unary"])
async def test_a_read_on_a_closed_channel_is_a_peer_error(forward):
    addr = f"127.0.0.1:{free_port()}"
    calls = GrpcPeerClient(addr, channel(addr, options=[], credentials=None), forward=forward)
    client = Breaker(calls, PeerFacts(), max_wait=1.0)
    await calls.channel.close()
    for read in (
        lambda: client.get("g", "k", 2.0),
        lambda: client.get_many("g", ["k"], 2.0),
        lambda: client.peek("g", "k", 1.0),
    ):
        with pytest.raises(errors.PeerError):
            await read()
