"""Stand-ins for peers: a peer client for the pure tests of Peers, and a
real gRPC server that takes every call and answers none (a frozen owner)."""

import asyncio

import grpc
from grpc_health.v1 import health_pb2


class FakeClient:
    """What Peers needs of a client: its address, its PeerFacts, and close()."""

    def __init__(self, addr, facts):
        self.addr, self.facts = addr, facts
        self.closed = None

    async def close(self, grace=None):
        self.closed = grace


class FrozenPeer:
    """A gRPC server that takes every call (Peer/Forward, Get, Health/Check,
    ...) and answers none, as a frozen (SIGSTOP'd) owner whose connection is
    still up; or, with `health_answers`, one that answers that many health
    checks (SERVING) first and freezes after."""

    def __init__(self, health_answers: int = 0) -> None:
        self.health_answers = health_answers
        self.health_answered = 0
        self.calls: list[str] = []
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        self.addr = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def service(self, details):
        method = details.method
        if method.endswith("/Forward"):

            async def stream(requests, context):
                async for _ in requests:
                    self.calls.append(method)
                await asyncio.Event().wait()  # until the caller cancels
                yield b""  # pragma: no cover

            return grpc.stream_stream_rpc_method_handler(stream)

        async def unary(request, context):
            self.calls.append(method)
            if method == "/grpc.health.v1.Health/Check" and self.health_answered < self.health_answers:
                self.health_answered += 1
                return health_pb2.HealthCheckResponse(status=1).SerializeToString()
            await asyncio.Event().wait()  # until the caller's deadline

        return grpc.unary_unary_rpc_method_handler(unary)
