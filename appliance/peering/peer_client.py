"""A node's client for one peer, over one grpc.aio channel or the engine's.

Every server backend uses it: the engine's transport on the engine's own
client (transport/engine_channel.py), the others on grpc.aio. Gets go to the
owner over one long-lived `appliance.cache.Peer/Forward` stream (a message
on an open stream costs a fraction of a unary call in grpc.aio), or as
unary calls; a peer without our services (a seed Go node) gets the seed's
plain `groupcachepb.GroupCache/Get`, and that answer is remembered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

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
T = TypeVar("T")

_METADATA = (FORWARDED,)
# A stream that ends with one of these before any answer may be a peer
# without Peer/Forward (INTERNAL: see ForwardStream.unanswered_code).
_NO_STREAM_CODES = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL)
# A health check is answered by the peer's server, not its origin: a peer
# that is up answers one in milliseconds even while its loads are slow.
PROBE_S = 1.0
# A read the owner has not answered this soon (or within half its first
# wait) starts a health probe, unless the owner answered something since
# the read was sent: by the half-deadline point the forwarder then knows
# whether the owner's server is alive (slow origin: keep waiting) or silent
# (frozen, cut off: load locally, as before).
ALIVE_AFTER_S = 0.1
# What a forwarder waiting out a live owner leaves of the caller's deadline
# (at most this share of it): the reply still has to travel back.
PATIENCE_MARGIN_S = 0.1
PATIENCE_MARGIN_SHARE = 0.05
# While waiting out a live owner, it is asked again this often (a probe
# takes up to PROBE_S): one that froze after its last answer is left then.
REPROBE_S = PROBE_S * 1.5
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
    """appliance.rules.peers.PeerClient over one grpc.aio channel, or the
    engine's (engine_channel.AioEngineChannel: unary calls only).

    `forward` picks how Gets reach the owner: "stream" (Peer.Forward) or
    "unary" (GroupCache/Get marked as forwarded)."""

    def __init__(
        self,
        addr: str,
        channel: grpc.aio.Channel,
        *,
        max_wait: float,
        share: float = 0.5,
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
        self._max_wait = max_wait
        self._share = share
        self._proofs = proofs
        self._accept_unproven = accept_unproven_plain_get
        # Made at the first streamed Get: the engine's channel has unary calls only.
        self._forward: Any = None
        self._stream: ForwardStream | None = None
        # The reply stays encoded: it is what we cache and send on (wire.py).
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
        self._probe: asyncio.Future | None = None

    def _wait(self, timeout: float | None) -> float:
        # Leave part of the caller's time for a local load if the owner fails.
        return self._max_wait if timeout is None else min(self._max_wait, timeout * self._share)

    def _patience(self, timeout: float | None, first: float, wait: float) -> float:
        """How long a read may wait for an owner whose server is alive, from
        when it is sent: the caller's deadline less a margin, at most the
        peer timeout (never less than `wait`, what is left of `first` after
        _admit)."""
        if timeout is None:
            return wait
        spent = first - wait  # waiting on a probe in _admit
        margin = min(PATIENCE_MARGIN_S, timeout * PATIENCE_MARGIN_SHARE)
        return max(wait, min(self._max_wait, timeout - margin) - spent)

    async def _patiently(
        self, fetch: Callable[[float], Awaitable[T]], started: float, wait: float, patience: float
    ) -> T:
        """fetch(patience)'s answer. At `wait` without one, the read goes on
        only if the owner's server answered anything since `started` (a
        probe started after ALIVE_AFTER_S asks): an owner that is alive and
        loading the key is waited for up to `patience`, so the cluster
        loads it once; a silent one (frozen, cut off, not connected) is
        left at `wait`, and the caller loads locally in the time left."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(fetch(patience))
        span = wait
        try:
            if patience > wait:
                await asyncio.wait([task], timeout=min(ALIVE_AFTER_S, wait / 2))
                if not task.done() and not self.facts.heard_since(started) and not self.facts.probing:
                    if self.facts.read_allowed() and self._connected():
                        self._start_probe()
            await asyncio.wait([task], timeout=max(0.0, started + wait - loop.time()))
            if not task.done() and patience > wait and self.facts.heard_since(started):
                span = patience  # alive: its answer is worth the wait, while it stays alive
                await self._while_alive(task, started + patience)
            if not task.done():
                raise errors.PeerError(f"{self.addr}: no answer within {span:.3f}s")
            result = task.result()
        except errors.CacheError as exc:
            self._settle(started, span, exc)
            raise
        finally:
            if not task.done():
                task.cancel()
        self._settle(started, span, None)
        return result

    async def _while_alive(self, task: asyncio.Future, until: float) -> None:
        """Wait for `task` until `until` (the loop's clock), asking the owner
        again about every REPROBE_S: an owner that stops answering (frozen
        after its last answer) is left at once, so the caller loads the key
        locally in the time that is left."""
        loop = asyncio.get_running_loop()
        while not task.done() and (left := until - loop.time()) > 0:
            asked = loop.time()
            if not self.facts.probing and self.facts.read_allowed() and self._connected():
                self._start_probe()
            await asyncio.wait([task], timeout=min(left, REPROBE_S))
            if not task.done() and loop.time() < until and not self.facts.heard_since(asked):
                return  # silent since we asked: no longer worth waiting for

    def _connected(self) -> bool:
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

    async def _admit(self, wait: float) -> tuple[float, float]:
        """(now on the loop's clock, what is left of the read's `wait`);
        PeerError at once while the breaker is open (PeerFacts): the caller
        loads locally without waiting, and a probe in the background finds
        out when the peer answers again."""
        facts, probe = self.facts, self._probe
        if facts.probing and probe is not None and not probe.done():
            # A read just went unanswered and a probe is asking: its answer
            # decides this read, not another timeout. The wait counts.
            before = asyncio.get_running_loop().time()
            await asyncio.wait([probe], timeout=min(PROBE_S, wait))
            wait -= asyncio.get_running_loop().time() - before
            if not probe.done() and wait <= 0.01:
                raise errors.PeerError(f"{self.addr}: no answer yet to a probe, and this read's time is up")
        now = asyncio.get_running_loop().time()
        if facts.read_allowed():
            return now, wait
        if facts.probe_due(now):
            self._start_probe()
        raise errors.PeerError(f"{self.addr}: not answering (asked again in the background)")

    def _start_probe(self) -> None:
        self.facts.probing = True
        self._probe = asyncio.ensure_future(self._run_probe())

    async def _run_probe(self) -> None:
        facts = self.facts
        try:
            await self._health(health_pb2.HealthCheckRequest(), timeout=min(self._max_wait, PROBE_S))
            answered = True
        except grpc.aio.AioRpcError as err:  # any status but no answer is an answer
            answered = err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        except asyncio.CancelledError:
            facts.probing = False
            raise
        except Exception:  # the channel closed under us
            answered = False
        was_open = not facts.read_allowed()
        facts.probed(asyncio.get_running_loop().time(), answered)
        if was_open and answered:
            log.info("%s answers again: forwarding to it", self.addr)
        elif not was_open and not answered:
            log.warning("%s does not answer: loading its keys locally until it does", self.addr)

    def _settle(self, started: float, wait: float, error: errors.CacheError | None) -> None:
        """Tell the breaker how a read went: answered (any owner answer), or
        unanswered (timed out, or the channel is not connected)."""
        now = asyncio.get_running_loop().time()
        if error is None or not isinstance(error, errors.PeerError):
            self.facts.read_answered(now)
            return
        connected = self._connected()
        if connected and now - started < 0.9 * wait:
            return  # an answer of sorts (a reset stream, a refused call): not silence
        was_open = not self.facts.read_allowed()
        if self.facts.read_unanswered(now, connected):
            self._start_probe()
        elif not was_open and not self.facts.read_allowed():
            log.warning("%s is not connected: loading its keys locally until it answers", self.addr)

    async def get(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float]:
        first = self._wait(timeout)
        started, wait = await self._admit(first)
        return await self._patiently(
            lambda budget: self._get_any(group, key, budget), started, wait, self._patience(timeout, first, wait)
        )

    async def _get_any(self, group: str, key: str, wait: float) -> tuple[bytes, float]:
        if not self.streaming:
            return await self._get_unary(group, key, wait)
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

    async def get_many(self, group: str, keys: list[str], timeout: float | None) -> dict:
        first = self._wait(timeout)
        started, wait = await self._admit(first)
        request = cache_pb2.GetManyRequest(group=group, keys=keys)
        response, _ = await self._patiently(
            lambda budget: self._call(self._get_many, request, budget, proven=True),
            started,
            wait,
            self._patience(timeout, first, wait),
        )
        out: dict[str, tuple[bytes, float] | errors.CacheError] = {}
        for r in response.results:
            out[r.key] = (r.value, r.ttl) if r.code == 0 else error_of(r.code, r.error)
        for key in set(keys) - set(out):
            out[key] = errors.PeerError(f"{self.addr} did not answer for {key!r}")
        return out

    async def set(self, group: str, key: str, value: bytes, ttl: float, timeout: float | None) -> None:
        await self._call(
            self._set,
            cache_pb2.SetRequest(group=group, key=key, value=value, ttl=ttl),
            self._wait(timeout),
            scope=WRITE,
        )

    async def remove(self, group: str, key: str, timeout: float | None) -> None:
        await self._call(self._remove, cache_pb2.RemoveRequest(group=group, key=key), self._wait(timeout), scope=WRITE)

    async def peek(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float] | None:
        # The caller's own short deadline, not a share of it: a peek has no fallback to leave time for.
        wait = timeout if timeout is not None else self._max_wait
        response, _ = await self._call(self._peek, cache_pb2.PeekRequest(group=group, key=key), wait, proven=True)
        if not response.found:
            return None
        try:
            return wire.normalize(response.response), response.ttl
        except Exception as exc:  # undecodable: as if it did not answer
            raise errors.PeerError(f"{self.addr}: bad PeekResponse: {exc}") from None

    async def handoff(
        self, source: str, group: str, entries: list[tuple[str, bytes, float]], timeout: float | None
    ) -> tuple[int, int]:
        request = cache_pb2.HandoffRequest(source=source, group=group)
        add = request.entries.add
        for key, value, ttl in entries:
            add(key=key, value=value, ttl=ttl)
        wait = timeout if timeout is not None else self._max_wait
        response, _ = await self._call(self._handoff, request, wait, scope=WRITE)
        return response.accepted, response.refused

    async def close(self, grace: float | None = None) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._stream is not None:
            self._stream.close()
        await self.channel.close(grace)


def channel(target: str, *, options: list, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)
