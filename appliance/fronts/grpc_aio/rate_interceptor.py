"""The rate limit (appliance.rules.ratelimit) as a grpc.aio interceptor on
every call of the table (fronts/calls.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from ...protocol.codec import call_cost
from ...protocol.metadata import is_forwarded
from ...protocol.status import rate_limited_failure
from ...rules.ratelimit import RateLimiter, client_address
from ..calls import BY_PATH


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limiter: RateLimiter, is_peer: Callable[[Any], bool] = lambda metadata: True) -> None:
        """`is_peer(metadata)`: whether a call proves it is a peer's (the
        cluster token): only such calls may go free from ring addresses."""
        self.limiter = limiter
        self._is_peer = is_peer
        self._wrapped: dict[tuple[str, bool], grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        call = BY_PATH.get(method)
        if handler is None or call is None:
            return handler
        metadata = handler_call_details.invocation_metadata
        # A peer call goes free from a ring member as a forward does.
        forwarded = (is_forwarded(metadata) or call.peer_call) and self._is_peer(metadata)
        key = (method, forwarded)
        wrapped = self._wrapped.get(key)
        if wrapped is None or wrapped.request_deserializer is not handler.request_deserializer:
            wrapped = self._wrapped[key] = self._wrap(handler, forwarded)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, forwarded: bool) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        limiter = self.limiter

        async def limited(request, context):
            client = client_address(context.peer() or "")
            wait = limiter.admit(client, forwarded=forwarded, cost=call_cost(request))
            if wait:
                buckets = limiter.buckets
                await context.abort_with_status(rate_limited_failure(wait, client, buckets.rate, buckets.burst))
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            limited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
