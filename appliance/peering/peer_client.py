"""A node's calls to one peer, over one grpc.aio channel or the engine's.

Every front uses it: the engine's on the engine's own client
(engine_channel.py), the others on grpc.aio. A node holds it behind a
Breaker (breaker.py), which decides how long each call may take. Gets go to the
owner over one long-lived `appliance.cache.Peer/Forward` stream (a message
on an open stream costs a fraction of a unary call in grpc.aio), or as
unary calls; a peer without our services (a seed Go node) gets the seed's
plain `groupcachepb.GroupCache/Get`, and that answer is remembered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from ..cache import errors
from ..pb import cache_pb2, groupcache_pb2
from ..protocol import framing as wire
from ..protocol.metadata import FORWARDED, ttl_from_trailers
from ..protocol.status import error_of, from_rpc_error, owner_error
from ..rules.peer_proofs import READ, WRITE, PeerProofs
from ..rules.peers import PeerFacts

log = logging.getLogger(__name__)

_METADATA = (FORWARDED,)
# A stream that ends with one of these before any answer may be a peer
# without Peer/Forward (INTERNAL: see ForwardStream.unanswered_code).
_NO_STREAM_CODES = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL)
# A peer that comes back must be reachable at once. grpc shares subchannels
# between channels to one address, so without a local pool the channel made
# for a peer that rejoins the ring inherits the old one's reconnect backoff
# (it grows to 2 min) and fails fast meanwhile: each Get then loads locally.
PEER_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ForwardStream:
    """One long-lived Peer.Forward stream to an owner, shared by every Get
    this node forwards there. Answers are matched to requests by id."""

    def __init__(self, method, metadata, proven: Callable[[Any], bool] | None = None) -> None:
        """`proven(initial metadata)`: whether the callee proved itself (None: nothing to check)."""
        self._call = method(metadata=metadata)
        self._proven = proven
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: asyncio.Queue = asyncio.Queue()
        self.broken: BaseException | None = None
        self.answered = False  # a response came: the peer serves Peer/Forward
        self.unproven = False  # the callee did not prove itself: nothing it sends is taken
        self._tasks = (asyncio.ensure_future(self._write()), asyncio.ensure_future(self._read()))

    async def request(self, group: str, key: str, wait: float) -> cache_pb2.ForwardResponse:
        if self.broken is not None:
            raise errors.PeerError(f"stream broken: {self.broken}")
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        self._outbox.put_nowait(cache_pb2.ForwardRequest(id=rid, group=group, key=key, timeout=wait))
        try:
            async with asyncio.timeout(wait):
                return await future
        except TimeoutError:
            raise errors.PeerError(f"no answer within {wait:.3f}s") from None
        finally:
            self._pending.pop(rid, None)

    async def _write(self) -> None:
        try:
            while True:
                await self._call.write(await self._outbox.get())
        except Exception as exc:
            self._fail(exc)

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    raise EOFError("stream ended by the peer")
                if not self.answered and self._proven is not None:
                    # Checked at the first answer, not before: a stream a Go
                    # node refuses must still end with its own status.
                    if not self._proven(await self._call.initial_metadata()):
                        self.unproven = True
                        self._call.cancel()
                        raise errors.PeerError("the peer did not prove it knows the cluster token")
                self.answered = True
                future = self._pending.get(response.id)
                if future is not None and not future.done():
                    future.set_result(response)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        for future in self._pending.values():
            if not future.done():
                future.set_exception(errors.PeerError(f"stream broken: {exc}"))
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def unanswered_code(self) -> grpc.StatusCode | None:
        """For a stream that broke before any response: the status it ended
        with (None if it answered, or has not failed).

        A peer without Peer/Forward (a Go node) ends the stream at once with
        UNIMPLEMENTED: trailers-only, then RST_STREAM, since we have not
        half-closed. Which error each side of the call then sees is a race.
        If the reset lands while a write is in flight, grpc.aio's write
        catches the failed SEND_MESSAGE batch and calls set_internal_error,
        which overwrites the call's status, UNIMPLEMENTED already included:
        the writer, a reader that wakes later, and `await call.code()` all
        see INTERNAL ("Internal error from Core"). If the status lands first,
        the reader sees UNIMPLEMENTED, and a write that starts later fails
        with InvalidStateError. So neither the first error nor the final
        code says UNIMPLEMENTED reliably; callers ask with a plain Get."""
        if self.answered or self.unproven or self.broken is None:
            return None
        if isinstance(self.broken, grpc.aio.AioRpcError) and self.broken.code() == grpc.StatusCode.UNIMPLEMENTED:
            return grpc.StatusCode.UNIMPLEMENTED
        try:
            return await asyncio.wait_for(self._call.code(), 1.0)
        except Exception:  # TimeoutError included
            return None

    def close(self) -> None:
        if self.broken is None:
            self.broken = EOFError("closed")
        self._call.cancel()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()


class GrpcPeerClient:
    """breaker.PeerCalls over one grpc.aio channel, or the engine's
    (engine_channel.AioEngineChannel: unary calls only).

    `forward` picks how Gets reach the owner: "stream" (Peer.Forward) or
    "unary" (GroupCache/Get marked as forwarded)."""

    def __init__(
        self,
        addr: str,
        channel: grpc.aio.Channel,
        *,
        forward: str = "stream",
        proofs: PeerProofs | None = None,
        accept_unproven_plain_get: bool = False,
        facts: PeerFacts | None = None,
    ) -> None:
        """`proofs` (the cluster token's): each call proves it, and values are
        taken only from a peer that proves itself in its reply (peer_proofs.py).
        `accept_unproven_plain_get`: a plain Get's value may come without
        one (the seed's Go nodes make none: cluster.seed_interop)."""
        self.addr = addr
        self.facts = facts if facts is not None else PeerFacts()
        self._use_stream = forward == "stream"
        self.channel = channel
        self._proofs = proofs
        self._accept_unproven = accept_unproven_plain_get
        # Made at the first streamed Get: the engine's channel has unary calls only.
        self._forward: Any = None
        self._stream: ForwardStream | None = None
        # The reply stays encoded: it is what we cache and send on (protocol/framing.py).
        self._get = channel.unary_unary(
            "/groupcachepb.GroupCache/Get",
            request_serializer=groupcache_pb2.GetRequest.SerializeToString,
        )
        self._get_many = channel.unary_unary(
            "/appliance.cache.Cache/GetMany",
            request_serializer=cache_pb2.GetManyRequest.SerializeToString,
            response_deserializer=cache_pb2.GetManyResponse.FromString,
        )
        self._set = channel.unary_unary(
            "/appliance.cache.Cache/Set",
            request_serializer=cache_pb2.SetRequest.SerializeToString,
            response_deserializer=cache_pb2.ChangeResponse.FromString,
        )
        self._remove = channel.unary_unary(
            "/appliance.cache.Cache/Remove",
            request_serializer=cache_pb2.RemoveRequest.SerializeToString,
            response_deserializer=cache_pb2.ChangeResponse.FromString,
        )
        self._peek = channel.unary_unary(
            "/appliance.cache.Peer/Peek",
            request_serializer=cache_pb2.PeekRequest.SerializeToString,
            response_deserializer=cache_pb2.PeekResponse.FromString,
        )
        self._handoff = channel.unary_unary(
            "/appliance.cache.Peer/Handoff",
            request_serializer=cache_pb2.HandoffRequest.SerializeToString,
            response_deserializer=cache_pb2.HandoffResponse.FromString,
        )
        self._health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    async def answers(self, wait: float) -> bool:
        """Whether the peer's server answers a health check within `wait`
        (any status but UNAVAILABLE and DEADLINE_EXCEEDED is an answer)."""
        try:
            await self._health(health_pb2.HealthCheckRequest(), timeout=wait)
            return True
        except grpc.aio.AioRpcError as err:
            return err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        except asyncio.CancelledError:
            raise
        except Exception:  # the channel closed under us
            return False

    def connected(self) -> bool:
        try:
            return self.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY
        except Exception:  # closed under us by a ring change (grpc.aio.UsageError)
            return False

    def _metadata(self, scope: str = READ) -> tuple[tuple, str | None]:
        """(call metadata, the proof's nonce): the forwarded marker, and a
        fresh proof of the cluster token made for this peer's address, for
        a call that may do `scope` (WRITE: Set, Remove, Handoff)."""
        if self._proofs is None:
            return _METADATA, None
        authorization, nonce = self._proofs.make(self.addr, scope)
        return (*_METADATA, ("authorization", authorization)), nonce

    async def _call(
        self, method, request, timeout: float, *, proven: bool = False, unproven_ok: bool = False, scope: str = READ
    ):
        """(reply, call). `proven`: the reply's trailers must prove the peer
        (PeerError otherwise: its values are not taken)."""
        metadata, nonce = self._metadata(scope)
        try:
            call = method(request, timeout=timeout, metadata=metadata)
            reply = await call
            if proven and nonce is not None and not unproven_ok:
                assert self._proofs is not None  # a nonce comes from proofs
                if not self._proofs.replied(nonce, await call.trailing_metadata()):
                    raise errors.PeerError(f"{self.addr}: the reply does not prove the peer knows the cluster token")
            return reply, call
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        except (asyncio.CancelledError, errors.CacheError):
            raise
        except Exception as err:  # channel closed under us by a ring change
            raise errors.PeerError(f"{self.addr}: {err}") from None

    @property
    def streaming(self) -> bool:
        """Whether Gets go over Peer/Forward (not to a peer known to lack it)."""
        return self._use_stream and not self.facts.plain_get_only

    async def get(self, group: str, key: str, wait: float) -> tuple[bytes, float]:
        if not self.streaming:
            return await self._get_unary(group, key, wait)
        return await self._get_streamed(group, key, wait)

    async def _get_streamed(self, group: str, key: str, wait: float) -> tuple[bytes, float]:
        stream = self._stream
        if stream is None or stream.broken is not None:
            if stream is not None:
                stream.close()
            metadata, nonce = self._metadata()
            proofs = self._proofs
            proven = None if proofs is None or nonce is None else (lambda md, n=nonce: proofs.replied(n, md))
            try:
                if self._forward is None:
                    self._forward = self.channel.stream_stream(
                        "/appliance.cache.Peer/Forward",
                        request_serializer=cache_pb2.ForwardRequest.SerializeToString,
                        response_deserializer=cache_pb2.ForwardResponse.FromString,
                    )
                stream = self._stream = ForwardStream(self._forward, metadata, proven)
            except Exception as err:  # channel closed under us by a ring change
                raise errors.PeerError(f"{self.addr}: {err}") from None
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            response = await stream.request(group, key, wait)
        except errors.PeerError:
            code = await stream.unanswered_code()
            left = wait - (loop.time() - started)
            if code is None or left <= 0:
                raise
            # The stream broke before any answer: ask once with a plain Get
            # (PeerError if the peer is down). If the peer answers and the
            # stream ended as a server without Peer/Forward ends it, it is a
            # Go node or an older one: plain Gets from now on.
            try:
                # A Go node (seed_interop) makes no proof of its reply.
                result = await self._get_unary(group, key, left, unproven_ok=self._accept_unproven)
            except errors.CacheError as exc:
                if not isinstance(exc, errors.PeerError):  # the owner's own answer (NOT_FOUND, ...)
                    self._no_stream(code)
                raise
            self._no_stream(code)
            return result
        if response.code:
            raise owner_error(response.reason, response.code, response.error or response.reason)
        try:
            return wire.normalize(response.response), response.ttl
        except Exception as exc:  # undecodable: treat the owner as failed
            raise errors.PeerError(f"{self.addr}: bad GetResponse: {exc}") from None

    def _no_stream(self, code: grpc.StatusCode) -> None:
        if code in _NO_STREAM_CODES and not self.facts.plain_get_only:
            self.facts.plain_get_only = True
            log.info("%s has no Peer/Forward stream (%s): plain Gets from now on", self.addr, code.name)

    async def _get_unary(
        self, group: str, key: str, wait: float, *, unproven_ok: bool | None = None
    ) -> tuple[bytes, float]:
        if unproven_ok is None:
            # Plain Gets are all a unary client makes, so any peer may be a
            # Go node, as one that has no Peer/Forward stream is.
            unproven_ok = self._accept_unproven and (self.facts.plain_get_only or not self._use_stream)
        encoded, call = await self._call(
            self._get, groupcache_pb2.GetRequest(group=group, key=key), wait, proven=True, unproven_ok=unproven_ok
        )
        ttl = ttl_from_trailers(await call.trailing_metadata())
        try:
            return wire.normalize(encoded), ttl
        except Exception as exc:  # undecodable: treat the owner as failed
            raise errors.PeerError(f"{self.addr}: bad GetResponse: {exc}") from None

    async def get_many(self, group: str, keys: list[str], wait: float) -> dict:
        request = cache_pb2.GetManyRequest(group=group, keys=keys)
        response, _ = await self._call(self._get_many, request, wait, proven=True)
        out: dict[str, tuple[bytes, float] | errors.CacheError] = {}
        for r in response.results:
            out[r.key] = (r.value, r.ttl) if r.code == 0 else error_of(r.code, r.error)
        for key in set(keys) - set(out):
            out[key] = errors.PeerError(f"{self.addr} did not answer for {key!r}")
        return out

    async def set(self, group: str, key: str, value: bytes, ttl: float, wait: float) -> None:
        await self._call(self._set, cache_pb2.SetRequest(group=group, key=key, value=value, ttl=ttl), wait, scope=WRITE)

    async def remove(self, group: str, key: str, wait: float) -> None:
        await self._call(self._remove, cache_pb2.RemoveRequest(group=group, key=key), wait, scope=WRITE)

    async def peek(self, group: str, key: str, wait: float) -> tuple[bytes, float] | None:
        response, _ = await self._call(self._peek, cache_pb2.PeekRequest(group=group, key=key), wait, proven=True)
        if not response.found:
            return None
        try:
            return wire.normalize(response.response), response.ttl
        except Exception as exc:  # undecodable: as if it did not answer
            raise errors.PeerError(f"{self.addr}: bad PeekResponse: {exc}") from None

    async def handoff(
        self, source: str, group: str, entries: list[tuple[str, bytes, float]], wait: float
    ) -> tuple[int, int]:
        request = cache_pb2.HandoffRequest(source=source, group=group)
        add = request.entries.add
        for key, value, ttl in entries:
            add(key=key, value=value, ttl=ttl)
        response, _ = await self._call(self._handoff, request, wait, scope=WRITE)
        return response.accepted, response.refused

    async def close(self, grace: float | None = None) -> None:
        if self._stream is not None:
            self._stream.close()
        await self.channel.close(grace)


def channel(target: str, *, options: list, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)
