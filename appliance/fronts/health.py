"""gRPC health checking (grpc.health.v1) for both backends.

One status for the whole node, reported for "" and for the data service.
Our own small implementation instead of grpc_health's servicer: its Watch
streams stay open through a server stop and hold it for the whole grace
period, while `close()` here ends them at once. The protos still come
from grpcio-health-checking.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SERVICE = "grpc.health.v1.Health"


class Health:
    def __init__(self, services: tuple[str, ...]) -> None:
        self.services = ("",) + tuple(services)
        self.status = NOT_SERVING
        self.closed = False
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def check(self, service: str) -> int | None:
        """The status of `service`, or None when it is not one of ours."""
        return self.status if service in self.services else None

    async def set(self, serving: bool) -> None:
        status = SERVING if serving and not self.closed else NOT_SERVING
        if status != self.status:
            self.status = status
            async with self._condition():
                self._condition().notify_all()

    async def watch(self, service: str) -> AsyncIterator[int]:
        """Each new status of `service` (the current one first, SERVICE_UNKNOWN
        for a service not ours); after close(), a last NOT_SERVING, then the end."""

        def current() -> int:
            status = self.check(service)
            return SERVICE_UNKNOWN if status is None else status

        last = None
        condition = self._condition()
        while True:
            status = current()
            if status != last:
                last = status
                yield status
            if self.closed:
                return

            def changed(last: int | None = last) -> bool:
                return self.closed or current() != last

            async with condition:
                await condition.wait_for(changed)

    async def close(self) -> None:
        """NOT_SERVING, and end every Watch."""
        self.closed = True
        self.status = NOT_SERVING
        async with self._condition():
            self._condition().notify_all()


def response(status: int) -> bytes:
    return health_pb2.HealthCheckResponse(status=status).SerializeToString()


def grpc_handlers(
    health: Health, prove: Callable[[Any], tuple[tuple[str, str], ...]] | None = None
) -> dict[str, grpc.RpcMethodHandler]:
    """Method handlers of grpc.health.v1.Health for a grpc.aio server.
    `prove(context)`: the trailers proving this worker to a peer that asked
    with a proof (how a controller tells a worker of its cluster)."""

    async def check(request, context):
        status = health.check(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        if prove is not None:
            context.set_trailing_metadata(prove(context))
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(request, context):
        async for status in health.watch(request.service):
            yield health_pb2.HealthCheckResponse(status=status)

    return {
        "Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            watch,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
    }
