"""appliance.cache.Peer/{Peek,Handoff} as grpc.aio handlers around a
NodeRules: what keeps the cache warm across membership changes. Both
backends' servers register these methods (the engine's serves them
from its events, with the same instance calls)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from ...cache import errors
from ...pb import cache_pb2
from ...protocol import codec
from ...protocol.methods import PEER_SERVICE
from ...protocol.status import failure, internal_failure
from ...rules.ratelimit import client_address
from .services import ServicerContext, credentials

if TYPE_CHECKING:
    from ...rules.node_rules import NodeRules

log = logging.getLogger(__name__)


class WarmPeerService:
    def __init__(self, instance: NodeRules) -> None:
        self.instance = instance

    async def peek(self, request: cache_pb2.PeekRequest | None, context: ServicerContext):
        if request is None:
            await context.abort_with_status(failure(errors.InvalidRequest("malformed PeekRequest")))
        creds = credentials(context)
        try:
            reply = codec.peek_response(self.instance.peek(request.group, request.key, creds))
            context.set_trailing_metadata(self.instance.auth.reply_proof(creds))
            return reply
        except errors.CacheError as exc:
            status = failure(exc, request.group, request.key)
        except Exception as exc:  # a bug: answer INTERNAL and keep serving
            log.exception("Peek %s/%r failed", request.group, request.key[:64])
            status = internal_failure(exc)
        await context.abort_with_status(status)

    async def handoff(self, request: cache_pb2.HandoffRequest | None, context: ServicerContext):
        if request is None:
            await context.abort_with_status(failure(errors.InvalidRequest("malformed HandoffRequest")))
        try:
            accepted, refused = self.instance.receive_handoff(
                request.source,
                client_address(context.peer() or ""),
                request.group,
                codec.handoff_entries(request),
                credentials(context),
            )
            return codec.handoff_response(accepted, refused)
        except errors.CacheError as exc:
            status = failure(exc, request.group)
        except Exception as exc:
            log.exception("Handoff %s from %r failed", request.group, request.source[:64])
            status = internal_failure(exc)
        await context.abort_with_status(status)

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The methods, to register under PEER_SERVICE (beside Forward)."""

        def unary(fn, request_type):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=codec.parser(request_type))

        return {
            "Peek": unary(self.peek, cache_pb2.PeekRequest),  # replies encoded by codec
            "Handoff": unary(self.handoff, cache_pb2.HandoffRequest),
        }


__all__ = ["PEER_SERVICE", "WarmPeerService"]
