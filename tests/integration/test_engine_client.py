"""The engine's client (appliance_engine.Channel through
transport/engine_channel.py) against a real grpc.aio server over loopback:
what grpc's client would report, it reports (status, details, trailers),
and deadlines, size limits, restarts and closing behave as grpc's do."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from appliance.peering import engine_channel
from support.ports import free_port

if engine_channel.usable():
    pytest.skip(f"the engine's client is not built here: {engine_channel.usable()}", allow_module_level=True)

from appliance.peering.engine_channel import AioEngineChannel, EngineChannel  # noqa: E402

ECHO = "/test.Echo/Echo"
FAIL = "/test.Echo/Fail"
SLOW = "/test.Echo/Slow"
BIG = "/test.Echo/Big"
LIMIT = 1 << 20


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    # The call's metadata comes back in the trailers: what was sent arrives.
    sent = tuple((k, v) for k, v in context.invocation_metadata() if k.startswith("x-"))
    context.set_trailing_metadata(sent + (("x-length", str(len(request))),))
    return request


async def _fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-why-bin", b"\x00\xffraw"), ("x-plain", "text")))
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such key: 'k' (100% missing)")


async def _slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(float(request.decode()))
    return b"late"


async def _big(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"x" * int(request.decode())


def _handlers():
    unary = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {"Echo": unary(_echo), "Fail": unary(_fail), "Slow": unary(_slow), "Big": unary(_big)},
    )


async def _serve(port: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 << 20)])
    server.add_generic_rpc_handlers((_handlers(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


@pytest.fixture
async def server():
    port = free_port()
    srv = await _serve(port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await srv.stop(0)


async def _grpc_failure(addr: str, path: str, request: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(addr) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(path)(request, timeout=5)
    return info.value


async def test_a_failed_call_reads_as_grpcs_does(server):
    """Same status, details and trailers (binary values included) as grpc.aio's client sees."""
    want = await _grpc_failure(server, FAIL, b"")
    ch = AioEngineChannel(server, max_message=LIMIT)
    try:
        with pytest.raises(grpc.RpcError) as info:
            await ch.unary_unary(FAIL)(b"", timeout=5)
        got = info.value
        assert (
            (got.code(), got.details())
            == (want.code(), want.details())
            == (
                grpc.StatusCode.NOT_FOUND,
                "no such key: 'k' (100% missing)",
            )
        )
        assert sorted(got.trailing_metadata()) == sorted(want.trailing_metadata())
        assert ("x-why-bin", b"\x00\xffraw") in got.trailing_metadata()
    finally:
        await ch.close()
    sync = EngineChannel(server, max_message=LIMIT)
    try:
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(sync.unary_unary(FAIL), b"", timeout=5)
        assert (info.value.code(), info.value.details()) == (want.code(), want.details())
    finally:
        sync.close()


async def test_replies_metadata_and_many_calls_at_once(server):
    """200 concurrent calls on one channel (one connection) each get their
    own reply; text and binary metadata arrive; trailers come back."""
    ch = AioEngineChannel(server, max_message=LIMIT)
    try:
        echo = ch.unary_unary(ECHO)
        payloads = [f"call {i}".encode() * (i % 7 + 1) for i in range(200)]
        calls = [
            echo(p, timeout=5, metadata=(("x-n", str(i)), ("x-raw-bin", bytes([i % 256, 0]))))
            for i, p in enumerate(payloads)
        ]
        assert await asyncio.gather(*calls) == payloads
        trailers = dict(await calls[7].trailing_metadata())
        assert trailers["x-n"] == "7" and trailers["x-raw-bin"] == b"\x07\x00"
        assert trailers["x-length"] == str(len(payloads[7]))
        assert ch.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await ch.close()


def test_a_blocking_channel_shared_by_threads(server_thread):
    """Eight threads on one blocking channel: they take turns driving its
    one connection, and each gets its own replies."""
    ch = EngineChannel(server_thread, max_message=LIMIT)
    echo = ch.unary_unary(ECHO)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(100):
                payload = f"{i}-{j}".encode()
                reply, call = echo.with_call(payload, timeout=5)
                assert reply == payload
                assert dict(call.trailing_metadata())["x-length"] == str(len(payload))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ch.close()
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)


@pytest.fixture
def server_thread():
    """A grpc.aio server on its own loop in a thread, for blocking callers."""
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict = {}

    async def main():
        holder["server"] = await _serve(port)
        holder["stop"] = asyncio.Event()
        ready.set()
        await holder["stop"].wait()
        await holder["server"].stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(10)
        loop.close()


async def test_deadlines_and_the_size_limit(server):
    ch = AioEngineChannel(server, max_message=LIMIT)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.RpcError) as info:
            await ch.unary_unary(SLOW)(b"5", timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert loop.time() - started < 2.5  # bounded by the deadline, not the server's 5 s
        assert await ch.unary_unary(BIG)(str(LIMIT - 5).encode(), timeout=5) == b"x" * (LIMIT - 5)
        with pytest.raises(grpc.RpcError) as info:
            await ch.unary_unary(BIG)(str(LIMIT + 1).encode(), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await ch.unary_unary(ECHO)(b"still fine", timeout=5) == b"still fine"  # the connection lives on
    finally:
        await ch.close()


async def test_a_server_that_restarts_is_reached_again():
    port = free_port()
    addr = f"127.0.0.1:{port}"
    ch = AioEngineChannel(addr, max_message=LIMIT)
    try:
        echo = ch.unary_unary(ECHO)
        with pytest.raises(grpc.RpcError) as info:
            await echo(b"nobody", timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ch.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        server = await _serve(port)
        assert await echo(b"up", timeout=5) == b"up"  # no backoff to wait out
        await server.stop(0)
        with pytest.raises(grpc.RpcError) as info:
            await echo(b"down again", timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        server = await _serve(port)
        try:
            assert await echo(b"back", timeout=5) == b"back"
        finally:
            await server.stop(0)
    finally:
        await ch.close()


async def test_a_closed_channel_refuses_calls(server):
    ch = AioEngineChannel(server, max_message=LIMIT)
    assert await ch.unary_unary(ECHO)(b"a", timeout=5) == b"a"
    slow = ch.unary_unary(SLOW)(b"3", timeout=5)
    waiting = asyncio.ensure_future(_await(slow))
    await asyncio.sleep(0)
    await ch.close()
    with pytest.raises(grpc.RpcError) as info:
        await waiting
    assert info.value.code() == grpc.StatusCode.CANCELLED
    with pytest.raises(grpc.RpcError) as info:
        await ch.unary_unary(ECHO)(b"b", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ch.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    sync = EngineChannel(server, max_message=LIMIT)
    sync.close()
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(sync.unary_unary(ECHO), b"c", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def _await(call):
    return await call


def test_bad_arguments_are_clear():
    from appliance_engine import Channel

    with pytest.raises(ValueError, match="not a host:port"):
        Channel("127.0.0.1:1", authority="bad authority/x")
    with pytest.raises(ValueError, match="needs tls_ca"):
        Channel("127.0.0.1:1", tls_cert="/c", tls_key="/k")
    with pytest.raises(ValueError, match="timeout must be"):
        Channel("127.0.0.1:1", True).call(ECHO, b"", None, -1.0)
    with pytest.raises(RuntimeError, match="blocking"):
        Channel("127.0.0.1:1", False).call(ECHO, b"", None, 1.0)
