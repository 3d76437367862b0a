"""A node's client for one peer, over one grpc.aio channel.

Both server backends use it: pygrpc-native has no client. Gets go to the
owner over one long-lived `appliance.cache.Peer/Forward` stream (a message
on an open stream costs a fraction of a unary call in grpc.aio), or as
unary calls; a peer without our services (a seed Go node) gets the seed's
plain `groupcachepb.GroupCache/Get`, and that answer is remembered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from ...cache import errors
from ...pb import cache_pb2, groupcache_pb2
from .. import wire
from ..metadata import FORWARDED, ttl_from_trailers
from ..status import error_of, from_rpc_error, owner_error

log = logging.getLogger(__name__)

_METADATA = (FORWARDED,)
# How long to wait for a failed stream's final status: the answer decides
# between "a peer without our services" and "a broken connection".
_STATUS_WAIT = 1.0


class ForwardStream:
    """One long-lived Peer.Forward stream to an owner, shared by every Get
    this node forwards there. Answers are matched to requests by id."""

    def __init__(self, method, metadata) -> None:
        self._call = method(metadata=metadata)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: asyncio.Queue = asyncio.Queue()
        self.broken: BaseException | None = None
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

    async def unimplemented(self) -> bool:
        """Whether the peer ended the stream with UNIMPLEMENTED: it lacks the
        service. Decided by the call's own final status, not by whichever of
        the writer or reader failed first: a Go server's UNIMPLEMENTED often
        reaches the writer as INTERNAL ("Failed execute_batch") before the
        reader sees the status."""
        if self.broken is None:
            return False
        try:
            code = await asyncio.wait_for(self._call.code(), _STATUS_WAIT)
        except (asyncio.TimeoutError, asyncio.CancelledError, grpc.RpcError):
            return False
        return code == grpc.StatusCode.UNIMPLEMENTED

    def close(self) -> None:
        if self.broken is None:
            self.broken = EOFError("closed")
        self._call.cancel()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()


class GrpcPeerClient:
    """appliance.node.peers.PeerClient over one grpc.aio channel.

    `forward` picks how Gets reach the owner: "stream" (Peer.Forward) or
    "unary" (GroupCache/Get marked as forwarded)."""

    def __init__(
        self, addr: str, channel: grpc.aio.Channel, *, max_wait: float, share: float = 0.5, forward: str = "stream",
        metadata: tuple = (),
    ) -> None:
        self.addr = addr
        self.channel = channel
        self._max_wait = max_wait
        self._share = share
        self._metadata = _METADATA + tuple(metadata)
        self._forward = channel.stream_stream(
            "/appliance.cache.Peer/Forward",
            request_serializer=cache_pb2.ForwardRequest.SerializeToString,
            response_deserializer=cache_pb2.ForwardResponse.FromString,
        )
        self._stream: ForwardStream | None = None
        self.streaming = forward == "stream"  # False: unary Gets (also for a peer without Peer/Forward)
        self.seed_only = False  # True once the peer proved to lack our services
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
        call = method(request, timeout=timeout, metadata=self._metadata)
        try:
            return await call, call
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        except asyncio.CancelledError:
            raise
        except Exception as err:  # channel closed under us by a ring change
            raise errors.PeerError(f"{self.addr}: {err}") from None

    async def get(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float]:
        if not self.streaming:
            return await self._get_unary(group, key, timeout)
        stream = self._stream
        if stream is None or stream.broken is not None:
            if stream is not None:
                stream.close()
            stream = self._stream = ForwardStream(self._forward, self._metadata)
        try:
            response = await stream.request(group, key, self._wait(timeout))
        except errors.PeerError:
            if not await stream.unimplemented():
                raise
            # A seed Go node, or an older one: plain Gets from now on.
            log.info("peer %s has no Peer/Forward service: forwarding with plain GroupCache/Get", self.addr)
            self.streaming, self.seed_only = False, True
            return await self._get_unary(group, key, timeout)
        if response.code:
            raise owner_error(response.reason, response.code, response.error or response.reason)
        try:
            return wire.normalize(response.response), response.ttl
        except Exception as exc:  # undecodable: treat the owner as failed
            raise errors.PeerError(f"{self.addr}: bad GetResponse: {exc}") from None

    async def _get_unary(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float]:
        encoded, call = await self._call(self._get, groupcache_pb2.GetRequest(group=group, key=key), self._wait(timeout))
        ttl = ttl_from_trailers(await call.trailing_metadata())
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
        for key in set(keys) - set(out):
            out[key] = errors.PeerError(f"{self.addr} did not answer for {key!r}")
        return out

    async def set(self, group: str, key: str, value: bytes, ttl: float, timeout: float | None) -> None:
        await self._call(self._set, cache_pb2.SetRequest(group=group, key=key, value=value, ttl=ttl), self._wait(timeout))

    async def remove(self, group: str, key: str, timeout: float | None) -> None:
        await self._call(self._remove, cache_pb2.RemoveRequest(group=group, key=key), self._wait(timeout))

    async def close(self, grace: float | None = None) -> None:
        if self._stream is not None:
            self._stream.close()
        await self.channel.close(grace)


def channel(target: str, *, options: list, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)
