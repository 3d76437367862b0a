"""The calls into the rules that every front serves, as one table.

A Method names a call (service, name, request type), says how it runs
against the rules (`now`: without waiting, `later`: awaited) and how its
result is encoded (a Reply: bytes and trailers). A gRPC front parses the
body (Method.parse), makes a CallContext from its own call, and hands the
rest to `answer_now` / `answer_later` / `answer`, which also map errors to
a status (protocol.status). The HTTP front runs the same Get (`run`) and
maps the same error kinds to HTTP statuses.

Health, the Peer/Forward stream and reflection are not calls into the
rules: each front serves those itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..cache import errors
from ..cache.store import Entry
from ..pb import cache_pb2, groupcache_pb2
from ..protocol import codec
from ..protocol.metadata import HOT, ttl_trailer
from ..protocol.methods import CACHE_SERVICE, GET_SERVICE, PEER_SERVICE
from ..protocol.status import Failure, failure, internal_failure
from ..rules.auth import Credentials
from ..rules.node_rules import NodeRules, told, told_all

log = logging.getLogger(__name__)

Trailers = tuple[tuple[str, str | bytes], ...]


class CallContext(NamedTuple):
    """What a front knows of one call, in the rules' terms."""

    creds: Credentials
    forwarded: bool  # a proven peer's forward (NodeRules.from_peer)
    timeout: float | None  # seconds left before the caller's deadline
    client: str  # the caller's address (ratelimit.client_address)


class Key(NamedTuple):
    """A Get's request where a front has no protobuf message (HTTP)."""

    group: str
    key: str


class Reply(NamedTuple):
    data: bytes
    trailers: Trailers = ()


# What `now` returns when the call must wait (then `later` runs).
PENDING: Any = object()


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request: type
    # The result without suspending, or PENDING; None: the call always waits.
    now: Callable[[NodeRules, Any, CallContext], Any] | None
    # The result, awaited; None: `now` always answers.
    later: Callable[[NodeRules, Any, CallContext], Awaitable[Any]] | None
    encode: Callable[[NodeRules, Any, CallContext, Any], Reply]
    # What an error names: the group, and the key where there is one.
    names: Callable[[Any], tuple[str, ...]]
    # A peer's call: free from ring members' addresses under the rate limit.
    peer_call: bool = False
    parse: Callable[[bytes], Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parse", codec.parser(self.request))

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    def malformed(self) -> Failure:
        return failure(errors.InvalidRequest(f"malformed {self.request.__name__}"))


async def run(method: Method, rules: NodeRules, request: Any, ctx: CallContext) -> Any:
    """The call's result; a CacheError for the caller is raised."""
    result = method.now(rules, request, ctx) if method.now is not None else PENDING
    if result is PENDING:
        assert method.later is not None  # a method that waits has `later`
        result = await method.later(rules, request, ctx)
    return result


def answer_now(method: Method, rules: NodeRules, request: Any, ctx: CallContext) -> Reply | Failure | None:
    """The reply if the call needs no wait, else None (then `answer_later`)."""
    if method.now is None:
        return None
    try:
        result = method.now(rules, request, ctx)
        return None if result is PENDING else method.encode(rules, request, ctx, result)
    except Exception as exc:
        return refusal(method, rules, request, ctx, exc)


async def answer_later(method: Method, rules: NodeRules, request: Any, ctx: CallContext) -> Reply | Failure:
    """The reply of a call `answer_now` left waiting."""
    assert method.later is not None  # only a waiting call gets here
    try:
        return method.encode(rules, request, ctx, await method.later(rules, request, ctx))
    except Exception as exc:
        return refusal(method, rules, request, ctx, exc)


async def answer(method: Method, rules: NodeRules, request: Any, ctx: CallContext) -> Reply | Failure:
    """The reply, waiting if the call must."""
    now = answer_now(method, rules, request, ctx)
    return now if now is not None else await answer_later(method, rules, request, ctx)


def refusal(method: Method, rules: NodeRules, request: Any, ctx: CallContext, exc: Exception) -> Failure:
    """The status a failed call ends with. A bug answers INTERNAL and is
    logged; the front keeps serving."""
    names = method.names(request)
    if isinstance(exc, errors.CacheError):
        return failure(told(exc, rules.shows_cause(ctx.creds)), *names)
    log.error("%s %s failed", method.name, "/".join(repr(n[:64]) for n in names), exc_info=exc)
    return internal_failure(exc)


# The calls ---------------------------------------------------------------------


def _proof(rules: NodeRules, ctx: CallContext) -> Trailers:
    """Our proof to a peer that forwarded (it takes no answer without it)."""
    return rules.auth.reply_proof(ctx.creds) if ctx.forwarded else ()


def peer_trailers(rules: NodeRules, creds: Credentials, entry: Entry) -> Trailers:
    """A forwarded Get's trailers: our proof to the peer, the entry's TTL left."""
    trailers = rules.auth.reply_proof(creds)
    return trailers + ttl_trailer(rules.ttl_left(entry)) if entry.expires else trailers


def _get_now(rules: NodeRules, request: groupcache_pb2.GetRequest, ctx: CallContext) -> Any:
    # With reads open the rules need no credentials (a front may skip them).
    creds = None if rules.reads_open else ctx.creds
    entry = rules.hit(request.group, request.key, ctx.forwarded, creds)
    return PENDING if entry is None else entry


async def _get_later(rules: NodeRules, request: groupcache_pb2.GetRequest, ctx: CallContext) -> Entry:
    return await rules.fill(request.group, request.key, forwarded=ctx.forwarded, timeout=ctx.timeout)


def _get_reply(rules: NodeRules, request: groupcache_pb2.GetRequest, ctx: CallContext, entry: Entry) -> Reply:
    if ctx.forwarded:
        return Reply(entry.data, peer_trailers(rules, ctx.creds, entry))
    if rules.hot_owned(request.group, request.key):
        return Reply(entry.data, (HOT,))
    return Reply(entry.data)  # already an encoded GetResponse (protocol.framing)


async def _get_many(rules: NodeRules, request: cache_pb2.GetManyRequest, ctx: CallContext) -> list:
    return await rules.get_many(
        request.group, list(request.keys), forwarded=ctx.forwarded, timeout=ctx.timeout, credentials=ctx.creds
    )


def _get_many_reply(rules: NodeRules, request: cache_pb2.GetManyRequest, ctx: CallContext, results: list) -> Reply:
    shown = told_all(results, rules.shows_cause(ctx.creds))
    return Reply(codec.encode_get_many_response(list(request.keys), shown), _proof(rules, ctx))


async def _set(rules: NodeRules, request: cache_pb2.SetRequest, ctx: CallContext) -> Any:
    return await rules.set(
        request.group,
        request.key,
        request.value,
        request.ttl,
        forwarded=ctx.forwarded,
        timeout=ctx.timeout,
        credentials=ctx.creds,
    )


async def _remove(rules: NodeRules, request: cache_pb2.RemoveRequest, ctx: CallContext) -> Any:
    return await rules.remove(
        request.group, request.key, forwarded=ctx.forwarded, timeout=ctx.timeout, credentials=ctx.creds
    )


def _change_reply(rules: NodeRules, request: Any, ctx: CallContext, change: Any) -> Reply:
    return Reply(codec.change_response(change).SerializeToString(), _proof(rules, ctx))


def _peek(rules: NodeRules, request: cache_pb2.PeekRequest, ctx: CallContext) -> Entry | None:
    return rules.peek(request.group, request.key, ctx.creds)


def _peek_reply(rules: NodeRules, request: Any, ctx: CallContext, entry: Entry | None) -> Reply:
    # Always proven: only a peer peeks, and it checks every answer.
    return Reply(codec.peek_response(entry), rules.auth.reply_proof(ctx.creds))


def _handoff(rules: NodeRules, request: cache_pb2.HandoffRequest, ctx: CallContext) -> tuple:
    return rules.receive_handoff(request.source, ctx.client, request.group, codec.handoff_entries(request), ctx.creds)


def _handoff_reply(rules: NodeRules, request: Any, ctx: CallContext, outcome: tuple) -> Reply:
    return Reply(codec.handoff_response(*outcome))


def _group_key(request: Any) -> tuple[str, ...]:
    return (request.group, request.key)


def _group(request: Any) -> tuple[str, ...]:
    return (request.group,)


GET = Method(GET_SERVICE, "Get", groupcache_pb2.GetRequest, _get_now, _get_later, _get_reply, _group_key)
GET_MANY = Method(CACHE_SERVICE, "GetMany", cache_pb2.GetManyRequest, None, _get_many, _get_many_reply, _group)
SET = Method(CACHE_SERVICE, "Set", cache_pb2.SetRequest, None, _set, _change_reply, _group_key)
REMOVE = Method(CACHE_SERVICE, "Remove", cache_pb2.RemoveRequest, None, _remove, _change_reply, _group_key)
PEEK = Method(PEER_SERVICE, "Peek", cache_pb2.PeekRequest, _peek, None, _peek_reply, _group_key, peer_call=True)
HANDOFF = Method(
    PEER_SERVICE, "Handoff", cache_pb2.HandoffRequest, _handoff, None, _handoff_reply, _group, peer_call=True
)

# Every front serves these; a new call is one more line here.
METHODS: tuple[Method, ...] = (GET, GET_MANY, SET, REMOVE, PEEK, HANDOFF)
BY_PATH: dict[str, Method] = {m.path: m for m in METHODS}
