"""The data service clients and peers call: groupcachepb.GroupCache/Get."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from ..cache import errors
from ..pb import groupcache_pb2
from .peers import FORWARDED, TTL_MS
from .status import to_status

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
        forwarded = FORWARDED in (context.invocation_metadata() or ())
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
            return groupcache_pb2.GetResponse(value=entry.value)
        await context.abort_with_status(status)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Get": grpc.unary_unary_rpc_method_handler(
                    self.get,
                    request_deserializer=_parse_get,
                    response_serializer=groupcache_pb2.GetResponse.SerializeToString,
                )
            },
        )
