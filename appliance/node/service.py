"""The data service clients and peers call: groupcachepb.GroupCache/Get."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from ..cache import errors
from ..pb import cache_pb2, groupcache_pb2
from .peers import TTL_MS, is_forwarded
from .status import CODES, to_status

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)
SERVICE = "groupcachepb.GroupCache"


def _parse_get(data: bytes) -> groupcache_pb2.GetRequest | None:
    # A malformed body (bad wire format, non-UTF-8 string) becomes None and
    # gets INVALID_ARGUMENT, instead of grpc's opaque INTERNAL.
    try:
        return groupcache_pb2.GetRequest.FromString(data)
    except DecodeError:
        return None


class GroupCacheService:
    def __init__(self, node: Node) -> None:
        self.node = node
        limits = node.settings.node
        self.max_key = limits.max_key_bytes
        self.max_group = limits.max_group_bytes

    def validate(self, group: str, key: str) -> None:
        if not group:
            raise errors.InvalidRequest("group is required")
        if not key:
            raise errors.InvalidRequest("key is required")
        if len(group) > self.max_group or len(group.encode("utf-8", "surrogatepass")) > self.max_group:
            raise errors.InvalidRequest(f"group name longer than {self.max_group} bytes")
        if len(key) > self.max_key or len(key.encode("utf-8", "surrogatepass")) > self.max_key:
            raise errors.InvalidRequest(f"key longer than {self.max_key} bytes")

    async def get(self, request: groupcache_pb2.GetRequest | None, context: grpc.aio.ServicerContext):
        if request is None:
            await context.abort_with_status(to_status(errors.InvalidRequest("malformed GetRequest")))
        group_name, key = request.group, request.key
        forwarded = is_forwarded(context)
        try:
            self.validate(group_name, key)
            group = self.node.groups.get(group_name)
            if group is None:
                raise errors.GroupNotFound(f"group {group_name!r} not found")
            entry = await group.get(key, forwarded=forwarded, timeout=context.time_remaining())
        except errors.CacheError as exc:
            status = to_status(exc, group_name, key)
        except Exception as exc:  # a bug: answer INTERNAL and keep serving
            log.exception("Get %s/%r failed", group_name, key[:64])
            status = grpc.Status(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}", ())
        else:
            if forwarded and entry.expires:
                ttl_ms = int((entry.expires - time.monotonic()) * 1000)
                context.set_trailing_metadata(((TTL_MS, str(max(ttl_ms, 1))),))
            return entry.data  # already an encoded GetResponse (wire.py)
        await context.abort_with_status(status)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Get": grpc.unary_unary_rpc_method_handler(self.get, request_deserializer=_parse_get)
            },
        )


# The Cache service: GetMany, Set, Remove ----------------------------------

CACHE_SERVICE = "appliance.cache.Cache"
MAX_BATCH_KEYS = 10_000


class CacheService:
    """Operations beyond the seed's Get, on the same data port."""

    def __init__(self, node: Node, data: GroupCacheService) -> None:
        self.node = node
        self.validate = data.validate
        self.max_value = node.settings.node.max_value_bytes

    def _group(self, name: str):
        group = self.node.groups.get(name)
        if group is None:
            raise errors.GroupNotFound(f"group {name!r} not found")
        return group

    async def get_many(self, request: cache_pb2.GetManyRequest, context: grpc.aio.ServicerContext):
        forwarded = is_forwarded(context)
        try:
            if not request.group:
                raise errors.InvalidRequest("group is required")
            if len(request.keys) > MAX_BATCH_KEYS:
                raise errors.InvalidRequest(f"at most {MAX_BATCH_KEYS} keys per GetMany")
            group = self._group(request.group)
        except errors.CacheError as exc:
            await context.abort_with_status(to_status(exc, request.group))
        keys = list(request.keys)
        results: list = [None] * len(keys)
        valid: list[int] = []
        for i, key in enumerate(keys):
            try:
                self.validate(request.group, key)
                valid.append(i)
            except errors.InvalidRequest as exc:
                results[i] = exc
        entries = await group.get_many([keys[i] for i in valid], forwarded=forwarded, timeout=context.time_remaining())
        for i, entry in zip(valid, entries):
            results[i] = entry
        now = time.monotonic()
        out = cache_pb2.GetManyResponse()
        for key, r in zip(keys, results):
            if isinstance(r, errors.CacheError):
                out.results.add(key=key, code=CODES[type(r)].value[0], error=str(r) or r.reason)
            else:
                out.results.add(key=key, value=r.value, ttl=max(r.expires - now, 0.001) if r.expires else 0.0)
        return out

    async def set(self, request: cache_pb2.SetRequest, context: grpc.aio.ServicerContext):
        try:
            self.validate(request.group, request.key)
            if len(request.value) > self.max_value:
                raise errors.InvalidRequest(f"value larger than {self.max_value} bytes")
            if request.ttl < 0:
                raise errors.InvalidRequest("ttl must be >= 0")
            group = self._group(request.group)
            ttl = request.ttl or None
            if is_forwarded(context):
                group.set(request.key, request.value, ttl)
                return cache_pb2.ChangeResponse(owner=self.node.addr)

            async def at_owner(client):
                if client is None:
                    group.set(request.key, request.value, ttl)
                else:
                    await client.set(request.group, request.key, request.value, request.ttl, context.time_remaining())

            return await self._change(group, request.key, at_owner, context, owner_required=True)
        except errors.CacheError as exc:
            status = to_status(exc, request.group, request.key)
        await context.abort_with_status(status)

    async def remove(self, request: cache_pb2.RemoveRequest, context: grpc.aio.ServicerContext):
        try:
            self.validate(request.group, request.key)
            group = self._group(request.group)
            if is_forwarded(context):
                group.remove(request.key)
                return cache_pb2.ChangeResponse(owner=self.node.addr)

            async def at_owner(client):
                if client is None:
                    group.remove(request.key)
                else:
                    await client.remove(request.group, request.key, context.time_remaining())

            return await self._change(group, request.key, at_owner, context, owner_required=False)
        except errors.CacheError as exc:
            status = to_status(exc, request.group, request.key)
        await context.abort_with_status(status)

    async def _change(self, group, key: str, at_owner, context, *, owner_required: bool) -> cache_pb2.ChangeResponse:
        """Apply at the owner first, then drop every other copy: on this node
        and on every live peer. Returns when each confirmed or failed."""
        peers = self.node.peers
        owner = peers.owner(key) or self.node.addr
        response = cache_pb2.ChangeResponse(owner=owner)
        owner_client = None if owner == self.node.addr else peers.client(owner)
        try:
            await at_owner(owner_client)
            response.peers.add(addr=owner, confirmed=True)
        except errors.PeerError as exc:
            if owner_required:
                raise errors.PeerError(f"owner {owner} unreachable, nothing stored: {exc}") from None
            response.peers.add(addr=owner, confirmed=False, error=str(exc))
        if owner != self.node.addr:
            group.remove(key)
            response.peers.add(addr=self.node.addr, confirmed=True)
        others = [c for c in peers.clients() if c.addr != owner]
        outcomes = await asyncio.gather(
            *(c.remove(group.name, key, context.time_remaining()) for c in others), return_exceptions=True
        )
        for client, outcome in zip(others, outcomes):
            if isinstance(outcome, BaseException):
                response.peers.add(addr=client.addr, confirmed=False, error=str(outcome) or type(outcome).__name__)
            else:
                response.peers.add(addr=client.addr, confirmed=True)
        return response

    def handler(self) -> grpc.GenericRpcHandler:
        def method(fn, request_type, response_type):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=_safe(request_type), response_serializer=response_type.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            CACHE_SERVICE,
            {
                "GetMany": method(self._guard(self.get_many), cache_pb2.GetManyRequest, cache_pb2.GetManyResponse),
                "Set": method(self._guard(self.set), cache_pb2.SetRequest, cache_pb2.ChangeResponse),
                "Remove": method(self._guard(self.remove), cache_pb2.RemoveRequest, cache_pb2.ChangeResponse),
            },
        )

    @staticmethod
    def _guard(fn):
        async def guarded(request, context):
            if request is None:
                await context.abort_with_status(to_status(errors.InvalidRequest("malformed request")))
            return await fn(request, context)

        return guarded


def _safe(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError:
            return None

    return parse


# The Peer service: forwarded Gets on one long-lived stream per peer -------

PEER_SERVICE = "appliance.cache.Peer"


class _ServerStream:
    """One peer's open Forward stream: requests are answered concurrently,
    answers go back in the order they are ready."""

    def __init__(self) -> None:
        self.out: asyncio.Queue = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.reader: asyncio.Task | None = None

    async def close(self) -> None:
        # Stop taking requests, answer those already taken, then end.
        if self.reader is not None:
            self.reader.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.out.put_nowait(None)


class PeerService:
    def __init__(self, node: Node, data: GroupCacheService) -> None:
        self.node = node
        self.validate = data.validate
        self._streams: set[_ServerStream] = set()

    async def forward(self, requests, context):
        stream = _ServerStream()
        self._streams.add(stream)

        async def answer(request: cache_pb2.ForwardRequest) -> None:
            stream.out.put_nowait(await self._answer(request))

        async def take() -> None:
            try:
                async for request in requests:
                    if request is None:
                        continue  # undecodable: without an id it cannot be answered
                    task = asyncio.ensure_future(answer(request))
                    stream.tasks.add(task)
                    task.add_done_callback(stream.tasks.discard)
            finally:  # the peer is done sending: end once all are answered
                if stream.tasks:
                    done = asyncio.gather(*stream.tasks, return_exceptions=True)
                    done.add_done_callback(lambda _: stream.out.put_nowait(None))
                else:
                    stream.out.put_nowait(None)

        stream.reader = asyncio.ensure_future(take())
        try:
            while (response := await stream.out.get()) is not None:
                yield response
        finally:
            self._streams.discard(stream)
            stream.reader.cancel()
            for task in stream.tasks:
                task.cancel()

    async def _answer(self, request: cache_pb2.ForwardRequest) -> cache_pb2.ForwardResponse:
        try:
            self.validate(request.group, request.key)
            group = self.node.groups.get(request.group)
            if group is None:
                raise errors.GroupNotFound(f"group {request.group!r} not found")
            entry = await group.get(request.key, forwarded=True, timeout=request.timeout or None)
        except errors.CacheError as exc:
            return cache_pb2.ForwardResponse(
                id=request.id, code=CODES[type(exc)].value[0], reason=exc.reason, error=str(exc) or exc.reason
            )
        except Exception as exc:  # a bug: answer and keep serving
            log.exception("Forward %s/%r failed", request.group, request.key[:64])
            return cache_pb2.ForwardResponse(
                id=request.id, code=grpc.StatusCode.INTERNAL.value[0], reason="INTERNAL", error=type(exc).__name__
            )
        ttl = max(entry.expires - time.monotonic(), 0.001) if entry.expires else 0.0
        return cache_pb2.ForwardResponse(id=request.id, response=entry.data, ttl=ttl)

    async def close(self) -> None:
        """End every open stream once its requests are answered (a graceful
        server stop would otherwise wait its whole grace on idle streams)."""
        await asyncio.gather(*(s.close() for s in list(self._streams)), return_exceptions=True)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            PEER_SERVICE,
            {
                "Forward": grpc.stream_stream_rpc_method_handler(
                    self.forward,
                    request_deserializer=_safe(cache_pb2.ForwardRequest),
                    response_serializer=cache_pb2.ForwardResponse.SerializeToString,
                )
            },
        )
