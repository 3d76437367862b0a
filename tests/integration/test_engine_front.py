"""The engine's front (appliance_engine.Front) on its own, driven as the
backend drives it (events out, answers by call id), over real gRPC on
loopback: limits at the socket, statuses and trailers, a clean close."""

from __future__ import annotations

import threading

import grpc
import pytest

from appliance.fronts import engine_available

pytestmark = pytest.mark.skipif(engine_available() is not None, reason=f"engine not built: {engine_available()}")

ECHO = "/test.Engine/Echo"
FAIL = "/test.Engine/Fail"


class Served:
    """The front plus a pump thread that echoes, or fails with trailers."""

    def __init__(self, **limits) -> None:
        from appliance_engine import EVENT_CALL, Front

        self.front = Front("127.0.0.1:0", [(ECHO, False), (FAIL, False)], **limits)
        self.seen: list[bytes] = []
        self.details: list[tuple] = []
        self.call = EVENT_CALL
        self.front.start()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        self.addr = f"127.0.0.1:{self.front.bound_port}"

    def _pump(self) -> None:
        while (events := self.front.recv_batch_details(64)) is not None:
            for kind, call_id, method, payload, _, details in events:
                if kind != self.call:
                    continue
                self.seen.append(payload)
                self.details.append(details)
                if method == 0:
                    self.front.respond(call_id, payload)
                else:
                    self.front.fail(call_id, 5, "not here: 100%", [("x-detail-bin", b"\x00\xff")])

    def close(self) -> None:
        self.front.close()
        self.pump.join(5)
        assert not self.pump.is_alive()


@pytest.fixture
def served(request):
    s = Served(**getattr(request, "param", {}))
    try:
        yield s
    finally:
        s.close()


def call(addr: str, method: str, payload: bytes, **kw):
    # A channel of its own (not grpc's shared subchannel): its own connection.
    with grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return channel.unary_unary(method)(payload, timeout=5, **kw)


@pytest.mark.parametrize("served", [{"max_message": 16}], indirect=True)
def test_a_message_over_the_limit_is_refused_at_its_prefix(served):
    assert call(served.addr, ECHO, b"x" * 16) == b"x" * 16
    with pytest.raises(grpc.RpcError) as info:
        call(served.addr, ECHO, b"y" * 17)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "Received message larger than max (17 vs. 16)"
    assert served.seen == [b"x" * 16]  # Python never saw the oversized one
    assert served.front.refusals() == (1, 0)  # but the worker's metrics count it
    metadata, peer, remaining = served.details[0]
    assert peer.startswith("ipv4:127.0.0.1:")  # as grpcio gives it, for client_address()
    # grpc-timeout as the client sent it: grpc core rounds a 5 s deadline up
    # to a coarser unit (seen: 5.01 s), never to more than a few digits.
    assert remaining is not None and 0 < remaining <= 5.1
    assert all(isinstance(k, str) for k, _ in metadata)


def test_status_message_and_binary_trailers_reach_the_client(served):
    with pytest.raises(grpc.RpcError) as info:
        call(served.addr, FAIL, b"")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "not here: 100%"
    assert ("x-detail-bin", b"\x00\xff") in tuple(info.value.trailing_metadata())


def test_an_unknown_method_is_unimplemented_without_a_fallback(served):
    with pytest.raises(grpc.RpcError) as info:
        call(served.addr, "/test.Engine/Nope", b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("served", [{"max_connections": 1}], indirect=True)
def test_connections_over_the_limit_are_closed(served):
    with grpc.insecure_channel(served.addr) as first:
        echo = first.unary_unary(ECHO)
        assert echo(b"a", timeout=5) == b"a"
        with pytest.raises(grpc.RpcError) as info:
            call(served.addr, ECHO, b"b", wait_for_ready=False)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert echo(b"c", timeout=5) == b"c"  # the first one serves on
    assert b"b" not in served.seen
    assert served.front.refusals()[1] >= 1  # counted (grpc may retry the connect)


@pytest.mark.parametrize("served", [{"max_header_list_size": 2048}], indirect=True)
def test_headers_over_the_limit_are_refused(served):
    assert call(served.addr, ECHO, b"a", metadata=[("x-small", "s" * 100)]) == b"a"
    with pytest.raises(grpc.RpcError) as info:
        call(served.addr, ECHO, b"b", metadata=[("x-big", "b" * 4096)])
    # hyper answers HTTP 431 before any gRPC status; grpc maps that to UNKNOWN.
    assert info.value.code() == grpc.StatusCode.UNKNOWN and "431" in (info.value.details() or ""), info.value
    assert b"b" not in served.seen
