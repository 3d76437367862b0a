"""Our gRPC services as grpc.aio method handlers around a NodeRules: every
call of the table (fronts/calls.py: Get, GetMany, Set, Remove, Peek,
Handoff) and appliance.cache.Peer/Forward, a peer's Gets on one stream.

The grpcio front serves all of them; the engine front serves Peer/Forward
(a bidirectional stream) through these on its fallback server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import NoReturn, Protocol

import grpc

from ...cache import errors
from ...pb import cache_pb2
from ...protocol import codec
from ...protocol.metadata import is_forwarded
from ...protocol.methods import PEER_SERVICE
from ...protocol.status import Failure, failure, rate_limited_failure
from ...rules.auth import Credentials
from ...rules.node_rules import NodeRules
from ...rules.ratelimit import RateLimiter, client_address
from .. import calls
from ..calls import CallContext

log = logging.getLogger(__name__)


class ServicerContext(Protocol):
    """What the handlers use of a grpc.aio.ServicerContext, typed (grpc
    publishes no types): abort_with_status raises, it never returns."""

    async def abort_with_status(self, status: grpc.Status) -> NoReturn: ...
    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None: ...
    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None: ...
    def time_remaining(self) -> float | None: ...
    def auth_context(self) -> Mapping[str, Sequence[bytes]]: ...
    def peer(self) -> str: ...


def credentials(context) -> Credentials:
    """The call's bearer token and, with mTLS, its certificate's names."""
    auth = context.auth_context() or {}
    identities = [
        v.decode(errors="replace")
        for key in ("x509_common_name", "x509_subject_alternative_name")
        for v in auth.get(key, ())
    ]
    return Credentials.from_metadata(context.invocation_metadata(), identities)


def call_context(rules: NodeRules, context: ServicerContext) -> CallContext:
    creds = credentials(context)
    return CallContext(
        creds,
        rules.from_peer(is_forwarded(context.invocation_metadata()), creds),
        context.time_remaining(),
        client_address(context.peer() or ""),
    )


def unary_handlers(rules: NodeRules) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
    """Every call of the table (calls.METHODS), by service and name."""
    services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for method in calls.METHODS:
        # No response serializer: every reply is already bytes.
        handler = grpc.unary_unary_rpc_method_handler(_handler(rules, method), request_deserializer=method.parse)
        services.setdefault(method.service, {})[method.name] = handler
    return services


def _handler(rules: NodeRules, method: calls.Method):
    async def handle(request, context: ServicerContext) -> bytes:
        if request is None:
            await context.abort_with_status(method.malformed())
        outcome = await calls.answer(method, rules, request, call_context(rules, context))
        if isinstance(outcome, Failure):
            await context.abort_with_status(outcome)
        if outcome.trailers:
            context.set_trailing_metadata(outcome.trailers)
        return outcome.data

    return handle


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
    """appliance.cache.Peer/Forward: a peer's Gets on one long-lived stream."""

    def __init__(self, rules: NodeRules, limiter: RateLimiter | None = None) -> None:
        """`limiter`: each Get on a stream that is not a proven peer's takes
        a token, as a Get call would."""
        self.rules = rules
        self.limiter = limiter
        self._streams: set[_ServerStream] = set()

    async def forward(self, requests, context):
        creds = None
        if not self.rules.reads_open:
            creds = credentials(context)  # the stream's, for each Get on it
            try:
                self.rules.authorize("read", "Forward", creds)
            except errors.CacheError as exc:
                await context.abort_with_status(failure(exc))
        # A peer's stream proves the cluster token; anyone else's marker is ignored.
        stream_creds = creds if creds is not None else credentials(context)
        peer = self.rules.from_peer(True, stream_creds)
        proof = self.rules.auth.reply_proof(stream_creds)
        if proof:  # before any answer: the peer takes none without it
            await context.send_initial_metadata(proof)
        stream = _ServerStream()
        self._streams.add(stream)
        # Answers not yet taken by the caller hold their values: past the
        # window, no more requests are read (the caller's sends then wait on
        # HTTP/2 flow control), so an unread stream costs a bounded memory.
        window = asyncio.Semaphore(self.rules.node_settings.forward_window)
        limiter = None if peer else self.limiter
        client = client_address(context.peer() or "")

        async def answer(request: cache_pb2.ForwardRequest) -> None:
            stream.out.put_nowait(await self._answer(request, creds, peer))

        async def take() -> None:
            try:
                async for request in requests:
                    if request is None:
                        continue  # undecodable: without an id it cannot be answered
                    await window.acquire()
                    wait = limiter.admit(client) if limiter is not None else 0.0
                    if wait and limiter is not None:
                        buckets = limiter.buckets
                        refusal = rate_limited_failure(wait, client, buckets.rate, buckets.burst)
                        stream.out.put_nowait(codec.forward_rate_limited(request.id, refusal))
                        continue
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
                window.release()
        finally:
            self._streams.discard(stream)
            stream.reader.cancel()
            for task in stream.tasks:
                task.cancel()

    async def _answer(
        self, request: cache_pb2.ForwardRequest, creds: Credentials | None, peer: bool
    ) -> cache_pb2.ForwardResponse:
        try:
            entry = await self.rules.get(
                request.group, request.key, forwarded=peer, timeout=request.timeout or None, credentials=creds
            )
        except errors.CacheError as exc:
            return codec.forward_error(request.id, exc)
        except Exception as exc:  # a bug: answer and keep serving
            log.exception("Forward %s/%r failed", request.group, request.key[:64])
            return cache_pb2.ForwardResponse(
                id=request.id, code=grpc.StatusCode.INTERNAL.value[0], reason="INTERNAL", error=type(exc).__name__
            )
        return codec.forward_response(request.id, entry)

    async def close(self) -> None:
        """End every open stream once its requests are answered (a graceful
        server stop would otherwise wait its whole grace on idle streams)."""
        await asyncio.gather(*(s.close() for s in list(self._streams)), return_exceptions=True)

    def handlers(self) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
        return {
            PEER_SERVICE: {
                "Forward": grpc.stream_stream_rpc_method_handler(
                    self.forward,
                    request_deserializer=codec.parser(cache_pb2.ForwardRequest),
                    response_serializer=cache_pb2.ForwardResponse.SerializeToString,
                )
            }
        }
