"""Our gRPC services as grpc.aio method handlers around a NodeRules:
groupcachepb.GroupCache/Get (the seed's), appliance.cache.Cache (GetMany,
Set, Remove) and appliance.cache.Peer/Forward (node to node).

The grpcio backend serves all of them; the engine backend serves Peer/Forward
(a bidirectional stream) through these on its fallback server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn, Protocol

import grpc

from ...cache import errors
from ...pb import cache_pb2, groupcache_pb2
from ...protocol import codec
from ...protocol.metadata import HOT, is_forwarded, ttl_trailer
from ...protocol.methods import CACHE_SERVICE, GET_SERVICE, PEER_SERVICE
from ...protocol.status import failure, internal_failure, rate_limited_failure
from ...rules.auth import Credentials
from ...rules.node_rules import told, told_all
from ...rules.ratelimit import RateLimiter, client_address

if TYPE_CHECKING:
    from ...rules.node_rules import NodeRules

log = logging.getLogger(__name__)

_MALFORMED = errors.InvalidRequest("malformed request")


class ServicerContext(Protocol):
    """What the handlers use of a grpc.aio.ServicerContext, typed (grpc
    publishes no types): abort_with_status raises, it never returns."""

    async def abort_with_status(self, status: grpc.Status) -> NoReturn: ...
    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None: ...
    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None: ...
    def time_remaining(self) -> float | None: ...
    def auth_context(self) -> Mapping[str, Sequence[bytes]]: ...
    def peer(self) -> str: ...


def _remaining(context) -> float | None:
    return context.time_remaining()


def peer_trailers(instance: NodeRules, creds: Credentials, entry) -> tuple[tuple[str, str], ...]:
    """A forwarded Get's trailers: our proof to the peer, the entry's TTL left."""
    trailers = instance.auth.reply_proof(creds)
    return trailers + ttl_trailer(instance.ttl_left(entry)) if entry.expires else trailers


def credentials(context) -> Credentials:
    """The call's bearer token and, with mTLS, its certificate's names."""
    auth = context.auth_context() or {}
    identities = [
        v.decode(errors="replace")
        for key in ("x509_common_name", "x509_subject_alternative_name")
        for v in auth.get(key, ())
    ]
    return Credentials.from_metadata(context.invocation_metadata(), identities)


class DataServices:
    """GroupCache/Get and the Cache service."""

    def __init__(self, instance: NodeRules) -> None:
        self.instance = instance

    async def get(self, request: groupcache_pb2.GetRequest | None, context: ServicerContext):
        if request is None:
            await context.abort_with_status(failure(errors.InvalidRequest("malformed GetRequest")))
        group, key = request.group, request.key
        instance = self.instance
        creds = credentials(context)
        forwarded = instance.from_peer(is_forwarded(context.invocation_metadata()), creds)
        # The reply is built inside the try too: a bug there would reach
        # grpc's own catch-all, UNKNOWN with the exception's message.
        try:
            entry = instance.hit(group, key, forwarded, None if instance.reads_open else creds)
            if entry is None:
                entry = await instance.fill(group, key, forwarded=forwarded, timeout=_remaining(context))
            if forwarded:
                context.set_trailing_metadata(peer_trailers(instance, creds, entry))
            elif instance.hot_owned(group, key):
                context.set_trailing_metadata((HOT,))
            return entry.data  # already an encoded GetResponse (wire.py)
        except errors.CacheError as exc:
            status = failure(told(exc, instance.shows_cause(creds)), group, key)
        except Exception as exc:  # a bug: answer INTERNAL and keep serving
            log.exception("Get %s/%r failed", group, key[:64])
            status = internal_failure(exc)
        await context.abort_with_status(status)

    async def get_many(self, request: cache_pb2.GetManyRequest | None, context: ServicerContext):
        if request is None:
            await context.abort_with_status(failure(_MALFORMED))
        keys = list(request.keys)
        creds = credentials(context)
        try:
            forwarded = self.instance.from_peer(is_forwarded(context.invocation_metadata()), creds)
            results = await self.instance.get_many(
                request.group, keys, forwarded=forwarded, timeout=_remaining(context), credentials=creds
            )
            if forwarded:
                context.set_trailing_metadata(self.instance.auth.reply_proof(creds))
            return codec.encode_get_many_response(keys, told_all(results, self.instance.shows_cause(creds)))
        except errors.CacheError as exc:
            status = failure(told(exc, self.instance.shows_cause(creds)), request.group)
        except Exception as exc:
            log.exception("GetMany %s failed", request.group)
            status = internal_failure(exc)
        await context.abort_with_status(status)

    async def set(self, request: cache_pb2.SetRequest | None, context: ServicerContext):
        if request is None:
            await context.abort_with_status(failure(_MALFORMED))
        try:
            change = await self.instance.set(
                request.group,
                request.key,
                request.value,
                request.ttl,
                forwarded=self.instance.from_peer(is_forwarded(context.invocation_metadata()), credentials(context)),
                timeout=_remaining(context),
                credentials=credentials(context),
            )
            return codec.change_response(change)
        except errors.CacheError as exc:
            status = failure(exc, request.group, request.key)
        except Exception as exc:
            log.exception("Set %s/%r failed", request.group, request.key[:64])
            status = internal_failure(exc)
        await context.abort_with_status(status)

    async def remove(self, request: cache_pb2.RemoveRequest | None, context: ServicerContext):
        if request is None:
            await context.abort_with_status(failure(_MALFORMED))
        try:
            change = await self.instance.remove(
                request.group,
                request.key,
                forwarded=self.instance.from_peer(is_forwarded(context.invocation_metadata()), credentials(context)),
                timeout=_remaining(context),
                credentials=credentials(context),
            )
            return codec.change_response(change)
        except errors.CacheError as exc:
            status = failure(exc, request.group, request.key)
        except Exception as exc:
            log.exception("Remove %s/%r failed", request.group, request.key[:64])
            status = internal_failure(exc)
        await context.abort_with_status(status)

    def handlers(self) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
        def unary(fn, request_type, response_type=None):
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=codec.parser(request_type),
                response_serializer=response_type.SerializeToString if response_type else None,
            )

        return {
            GET_SERVICE: {"Get": unary(self.get, groupcache_pb2.GetRequest)},
            CACHE_SERVICE: {
                "GetMany": unary(self.get_many, cache_pb2.GetManyRequest),  # encoded by messages
                "Set": unary(self.set, cache_pb2.SetRequest, cache_pb2.ChangeResponse),
                "Remove": unary(self.remove, cache_pb2.RemoveRequest, cache_pb2.ChangeResponse),
            },
        }


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

    def __init__(self, instance: NodeRules, limiter: RateLimiter | None = None) -> None:
        """`limiter`: each Get on a stream that is not a proven peer's takes
        a token, as a Get call would."""
        self.instance = instance
        self.limiter = limiter
        self._streams: set[_ServerStream] = set()

    async def forward(self, requests, context):
        creds = None
        if not self.instance.reads_open:
            creds = credentials(context)  # the stream's, for each Get on it
            try:
                self.instance.authorize("read", "Forward", creds)
            except errors.CacheError as exc:
                await context.abort_with_status(failure(exc))
        # A peer's stream proves the cluster token; anyone else's marker is ignored.
        stream_creds = creds if creds is not None else credentials(context)
        peer = self.instance.from_peer(True, stream_creds)
        proof = self.instance.auth.reply_proof(stream_creds)
        if proof:  # before any answer: the peer takes none without it
            await context.send_initial_metadata(proof)
        stream = _ServerStream()
        self._streams.add(stream)
        # Answers not yet taken by the caller hold their values: past the
        # window, no more requests are read (the caller's sends then wait on
        # HTTP/2 flow control), so an unread stream costs a bounded memory.
        window = asyncio.Semaphore(self.instance.settings.node.forward_window)
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
            entry = await self.instance.get(
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
