"""The peer picker: the ring names a key's owner, pooled channels reach it."""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from .. import addr as addrs
from ..cache import errors
from ..cache.ring import HashRing
from ..pb import cache_pb2, groupcache_pb2
from . import wire
from .status import from_rpc_error, owner_error

log = logging.getLogger(__name__)

# Marks a call as forwarded: the receiver serves it itself, so rings that
# disagree during a membership change cannot bounce a request around.
FORWARDED = ("x-groupcache-forwarded", "1")


def is_forwarded(context) -> bool:
    """Whether a server-side call came from a peer (see FORWARDED)."""
    return FORWARDED in (context.invocation_metadata() or ())
# Remaining TTL of the owner's entry, so a hot copy never outlives it.
TTL_MS = "x-groupcache-ttl-ms"
_METADATA = (FORWARDED,)


class ForwardStream:
    """One long-lived Peer.Forward stream to an owner, shared by every Get
    this node forwards there: in grpc.aio a message on an open stream costs
    a fraction of a unary call. Answers are matched to requests by id."""

    def __init__(self, method) -> None:
        self._call = method(metadata=_METADATA)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: asyncio.Queue = asyncio.Queue()
        self.broken: BaseException | None = None
        self.answered = False  # a response came: the peer serves Peer.Forward
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
        self.close()

    async def unanswered_code(self) -> grpc.StatusCode | None:
        """For a stream that broke before any response: the status it ended
        with (None if it answered, or has not failed).

        A peer without Peer.Forward (a Go node) ends the stream at once with
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
        if self.answered or self.broken is None:
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


# A stream that ends with one of these before any answer may be a peer
# without Peer.Forward (INTERNAL: see ForwardStream.unanswered_code).
_NO_STREAM_CODES = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL)


class PeerClient:
    """A Peer (see appliance.cache.group) over one pooled gRPC channel.

    `unary_only` holds the addresses known to serve only the seed's plain
    GroupCache/Get (Go nodes). It is shared by every client of one Peers, so
    the answer outlives a client that a ring change drops and recreates."""

    def __init__(
        self,
        addr: str,
        channel: grpc.aio.Channel,
        *,
        max_wait: float,
        share: float = 0.5,
        unary_only: set[str] | None = None,
    ) -> None:
        self.addr = addr
        self.channel = channel
        self._max_wait = max_wait
        self._share = share
        self._unary_only = unary_only if unary_only is not None else set()
        self._forward = channel.stream_stream(
            "/appliance.cache.Peer/Forward",
            request_serializer=cache_pb2.ForwardRequest.SerializeToString,
            response_deserializer=cache_pb2.ForwardResponse.FromString,
        )
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

    def _wait(self, timeout: float | None) -> float:
        # Leave part of the caller's time for a local load if the owner fails.
        return self._max_wait if timeout is None else min(self._max_wait, timeout * self._share)

    async def _call(self, method, request, timeout: float):
        call = method(request, timeout=timeout, metadata=_METADATA)
        try:
            return await call, call
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        except asyncio.CancelledError:
            raise
        except Exception as err:  # channel closed under us by a ring change
            raise errors.PeerError(f"{self.addr}: {err}") from None

    @property
    def _streaming(self) -> bool:
        """False for a peer known to lack the Peer service."""
        return self.addr not in self._unary_only

    async def get(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float]:
        wait = self._wait(timeout)
        if not self._streaming:
            return await self._get_unary(group, key, wait)
        stream = self._stream
        if stream is None or stream.broken is not None:
            stream = self._stream = ForwardStream(self._forward)
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
            # (raises PeerError if the peer is down). If the peer answers,
            # and the stream's end is what a server without Peer.Forward
            # gives (see ForwardStream.unanswered_code), it is a Go node or
            # an older one: plain Gets from now on, for this address.
            try:
                result = await self._get_unary(group, key, left)
            except errors.CacheError as exc:
                if not isinstance(exc, errors.PeerError):  # the owner's own answer (NOT_FOUND, …)
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
        if code in _NO_STREAM_CODES and self.addr not in self._unary_only:
            self._unary_only.add(self.addr)
            log.info("%s has no Peer.Forward stream (%s): plain Gets from now on", self.addr, code.name)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    async def _get_unary(self, group: str, key: str, wait: float) -> tuple[bytes, float]:
        encoded, call = await self._call(self._get, groupcache_pb2.GetRequest(group=group, key=key), wait)
        ttl = 0.0
        for k, v in await call.trailing_metadata() or ():
            if k == TTL_MS:
                ttl = max(int(v), 1) / 1000.0
        try:
            return wire.normalize(encoded), ttl
        except Exception as exc:  # undecodable: treat the owner as failed
            raise errors.PeerError(f"{self.addr}: bad GetResponse: {exc}") from None

    async def get_many(self, group: str, keys: list[str], timeout: float | None) -> dict:
        response, _ = await self._call(
            self._get_many, cache_pb2.GetManyRequest(group=group, keys=keys), self._wait(timeout)
        )
        out: dict[str, tuple[bytes, float] | errors.CacheError] = {}
        for r in response.results:
            out[r.key] = (r.value, r.ttl) if r.code == 0 else error_of(r.code, r.error)
        missing = set(keys) - set(out)
        for key in missing:
            out[key] = errors.PeerError(f"{self.addr} did not answer for {key!r}")
        return out

    async def set(self, group: str, key: str, value: bytes, ttl: float, timeout: float | None) -> None:
        await self._call(self._set, cache_pb2.SetRequest(group=group, key=key, value=value, ttl=ttl), self._wait(timeout))

    async def remove(self, group: str, key: str, timeout: float | None) -> None:
        await self._call(self._remove, cache_pb2.RemoveRequest(group=group, key=key), self._wait(timeout))


# A forwarded GetMany answers per key; only the owner's own answers come back.
_BY_CODE = {
    grpc.StatusCode.NOT_FOUND.value[0]: errors.KeyNotFound,
    grpc.StatusCode.UNAVAILABLE.value[0]: errors.OriginError,
    grpc.StatusCode.INVALID_ARGUMENT.value[0]: errors.InvalidRequest,
}


def error_of(code: int, message: str) -> errors.CacheError:
    return _BY_CODE.get(code, errors.PeerError)(message)


# A peer that comes back must be reachable at once. grpc shares subchannels
# between channels to one address, so without a local pool the channel made
# for a peer that rejoins the ring inherits the old one's reconnect backoff
# (it grows to 2 min) and fails fast meanwhile: each Get then loads locally.
# Seen with the seed's Go nodes: a Get that found one down, and for ~4 s
# after it restarted, every forward to it from that worker was a peer error.
_PEER_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Peers:
    """PeerPicker of one node. set_peers swaps ring and clients atomically:
    a request that already picked its owner keeps the client it picked."""

    def __init__(
        self,
        *,
        replicas: int = 50,
        scheme: str = "seed",
        max_wait: float = 5.0,
        channel_options: list[tuple[str, object]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.self_addr = ""
        self.replicas = replicas
        self.scheme = scheme
        self.max_wait = max_wait
        self.revision = -1
        self.ring = HashRing((), replicas, scheme)
        self._clients: dict[str, PeerClient] = {}
        self._options = channel_options or []
        self._credentials = credentials
        self._closing: set[asyncio.Task] = set()
        self._unary_only: set[str] = set()  # peers without Peer.Forward (see PeerClient)

    def pick(self, key: str) -> PeerClient | None:
        owner = self.ring.owner(key)
        if owner is None or owner == self.self_addr:
            return None
        return self._clients.get(owner)

    def owner(self, key: str) -> str | None:
        return self.ring.owner(key)

    def client(self, addr: str) -> PeerClient | None:
        return self._clients.get(addr)

    def clients(self) -> list[PeerClient]:
        return list(self._clients.values())

    def set_peers(self, peers: list[str], revision: int) -> bool:
        """Install a ring; False (and no change) for a stale revision."""
        if revision <= self.revision:
            return False
        for peer in peers:
            addrs.split(peer)  # raises ValueError naming the bad entry
        ring = HashRing(peers, self.replicas, self.scheme)
        clients = {}
        for peer in ring.nodes:
            if peer == self.self_addr:
                continue
            clients[peer] = self._clients.get(peer) or PeerClient(
                peer, self._channel(peer), max_wait=self.max_wait, unary_only=self._unary_only
            )
        dropped = [c for a, c in self._clients.items() if a not in clients]
        self.ring, self._clients, self.revision = ring, clients, revision
        for client in dropped:
            client.close()
            self._close_later(client.channel)
        return True

    def _channel(self, target: str) -> grpc.aio.Channel:
        options = [*_PEER_CHANNEL_OPTIONS, *self._options]
        if self._credentials is not None:
            return grpc.aio.secure_channel(target, self._credentials, options=options)
        return grpc.aio.insecure_channel(target, options=options)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        # Calls in flight on the old ring get the peer timeout to finish.
        task = asyncio.ensure_future(channel.close(grace=self.max_wait))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()
        await asyncio.gather(*(c.channel.close() for c in clients.values()), *self._closing, return_exceptions=True)
