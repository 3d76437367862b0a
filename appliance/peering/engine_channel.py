"""grpc's channel API, the part our clients use, on the engine's client.

`appliance_engine.Channel` makes unary calls over one HTTP/2 connection in
Rust (h2 on tokio, rustls). These adapters give it the shape of a grpc or
grpc.aio channel (`unary_unary` multicallables, `with_call`, awaitable calls
with `trailing_metadata()`, `get_state`, `close`), and fail a call with a
grpc RpcError carrying the status, details and trailers, so the peer client
and the application clients keep one code path for both libraries.

A blocking call waits with the GIL released, and the waiting thread drives
the connection itself (no other thread is woken). An awaitable call is
started in Rust, on the engine's client thread; its outcome comes back
through the channel's Completions, whose socket the event loop watches:
one wakeup per batch of finished calls, and no engine thread ever takes
the GIL.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from ..config.backend import engine_available
from ..tls import TlsFiles

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_STATES = list(grpc.ChannelConnectivity)  # the engine numbers states in this order
_OK = 0


def usable() -> str | None:
    """None when the engine's client can be used here, else why not."""
    missing = engine_available()
    if missing:
        return missing
    try:
        from appliance_engine import Channel  # noqa: F401
    except ImportError as exc:  # an engine built before it had a client
        return f"appliance_engine has no client ({exc})"
    return None


def failure(outcome: Sequence) -> grpc.aio.AioRpcError:
    """The RpcError of a failed outcome (code, message, reply, trailers)."""
    code, message, _, trailers = outcome
    return grpc.aio.AioRpcError(_CODES.get(code, grpc.StatusCode.UNKNOWN), (), tuple(trailers), message)


def _identity(data: bytes) -> bytes:
    return data


def _native(target: str, *, blocking: bool, max_message: int, tls: TlsFiles | None, server_name: str | None):
    from appliance_engine import Channel

    if tls is None:
        return Channel(target, blocking, max_message=max_message)
    if tls.ca is None:
        raise ValueError("the engine's client needs a CA file (it does not read the system's roots)")
    return Channel(
        target,
        blocking,
        max_message=max_message,
        tls_ca=tls.ca,
        tls_cert=tls.cert,
        tls_key=tls.key,
        server_name=server_name,
    )


class _Finished:
    """A finished blocking call, as `with_call` returns it."""

    __slots__ = ("_trailers",)

    def __init__(self, trailers) -> None:
        self._trailers = trailers

    def trailing_metadata(self):
        return self._trailers

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK


class _Unary:
    """A blocking UnaryUnaryMultiCallable."""

    __slots__ = ("_call", "_path", "_serialize", "_deserialize")

    def __init__(self, native, path: str, serialize: Callable, deserialize: Callable) -> None:
        self._call, self._path, self._serialize, self._deserialize = native.call, path, serialize, deserialize

    def with_call(self, request, timeout: float | None = None, metadata=None):
        outcome = self._call(self._path, self._serialize(request), metadata, timeout)
        if outcome[0] != _OK:
            raise failure(outcome)
        return self._deserialize(outcome[2]), _Finished(outcome[3])

    def __call__(self, request, timeout: float | None = None, metadata=None):
        outcome = self._call(self._path, self._serialize(request), metadata, timeout)
        if outcome[0] != _OK:
            raise failure(outcome)
        return self._deserialize(outcome[2])


class EngineChannel:
    """A blocking channel (grpc.Channel's calls) to one node."""

    def __init__(
        self, target: str, *, max_message: int, tls: TlsFiles | None = None, server_name: str | None = None
    ) -> None:
        """`server_name`: the name the node's certificate must carry (default: the host dialled)."""
        self.target = target
        self._native = _native(target, blocking=True, max_message=max_message, tls=tls, server_name=server_name)
        # A Get with no message objects: (group, key, metadata, timeout) ->
        # the value (bytes), or the failed outcome (code, message, reply, trailers).
        self.get_value = self._native.get

    def unary_unary(self, path: str, request_serializer=None, response_deserializer=None, **_) -> _Unary:
        return _Unary(self._native, path, request_serializer or _identity, response_deserializer or _identity)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return _STATES[self._native.state(try_to_connect)]

    def close(self) -> None:
        self._native.close()


class _AioCall:
    """One started call: await it for the reply (RpcError if it failed)."""

    __slots__ = ("_future", "_deserialize")

    def __init__(self, future: asyncio.Future, deserialize: Callable) -> None:
        self._future, self._deserialize = future, deserialize

    def __await__(self):
        outcome = yield from self._future.__await__()
        if outcome[0] != _OK:
            raise failure(outcome)
        return self._deserialize(outcome[2])

    async def trailing_metadata(self):
        return (await self._future)[3]

    async def code(self) -> grpc.StatusCode:
        return _CODES.get((await self._future)[0], grpc.StatusCode.UNKNOWN)

    def cancel(self) -> bool:
        # The engine's call runs out its own deadline; nobody waits for it.
        return self._future.cancel()


class _AioUnary:
    __slots__ = ("_channel", "_path", "_serialize", "_deserialize")

    def __init__(self, channel: AioEngineChannel, path: str, serialize: Callable, deserialize: Callable) -> None:
        self._channel, self._path, self._serialize, self._deserialize = channel, path, serialize, deserialize

    def __call__(self, request, timeout: float | None = None, metadata=None) -> _AioCall:
        future = self._channel._start(self._path, self._serialize(request), metadata, timeout)
        return _AioCall(future, self._deserialize)


class AioEngineChannel:
    """An asyncio channel (grpc.aio.Channel's unary calls) to one node. It
    belongs to the event loop of its first call."""

    def __init__(
        self, target: str, *, max_message: int, tls: TlsFiles | None = None, server_name: str | None = None
    ) -> None:
        """`server_name`: the name the node's certificate must carry (default: the host dialled)."""
        self.target = target
        self._native = _native(target, blocking=False, max_message=max_message, tls=tls, server_name=server_name)
        self._done: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count(1)
        self._closed = False

    def unary_unary(self, path: str, request_serializer=None, response_deserializer=None, **_) -> _AioUnary:
        return _AioUnary(self, path, request_serializer or _identity, response_deserializer or _identity)

    def _start(self, path: str, payload: bytes, metadata, timeout: float | None) -> asyncio.Future:
        return self._begin(self._native.start, path, payload, metadata, timeout)

    def get_value(self, group: str, key: str, metadata, timeout: float | None) -> asyncio.Future:
        """A Get with no message objects: a future of its outcome (code,
        message, the value, trailers)."""
        return self._begin(self._native.start_get, group, key, metadata, timeout)

    def _begin(self, start: Callable, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._closed:  # as grpc.aio's closed channel: no call starts
            future = loop.create_future()
            future.set_result((grpc.StatusCode.UNAVAILABLE.value[0], "channel closed", b"", ()))
            return future
        if self._loop is not loop:
            self._watch(loop)
        token = next(self._tokens)
        future = loop.create_future()
        self._pending[token] = future
        try:
            start(self._done, token, *args)
        except BaseException:
            del self._pending[token]
            raise
        return future

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        from appliance_engine import Completions

        if self._loop is not None:
            raise RuntimeError("this channel belongs to another event loop")
        self._done = Completions()
        loop.add_reader(self._done.fileno(), self._drain)
        self._loop = loop

    def _drain(self) -> None:
        pending = self._pending
        for token, outcome in self._done.take():
            future = pending.pop(token, None)
            if future is not None and not future.done():
                future.set_result(outcome)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return _STATES[self._native.state(try_to_connect)]

    async def close(self, grace: float | None = None) -> None:
        """Close the connection; calls still waiting fail as grpc.aio's do."""
        if self._closed:
            return
        self._closed = True
        self._native.close()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._done.fileno())
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_result((grpc.StatusCode.CANCELLED.value[0], "channel closed", b"", ()))
