"""Protobuf requests and replies of our services, built from the node's
answers (both backends use these; no RPC library here)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ..cache import errors
from ..cache.store import Entry
from ..pb import cache_pb2
from ..rules.node_rules import Change, NodeRules
from .framing import varint
from .status import Failure, code_of

M = TypeVar("M", bound=Message)


def parser(message_type: type[M]) -> Callable[[bytes], M | None]:
    """A deserializer that turns a malformed body (bad wire format,
    non-UTF-8 string) into None: the handler answers INVALID_ARGUMENT
    instead of grpc's opaque INTERNAL."""

    def parse(data: bytes) -> M | None:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return None

    return parse


def call_cost(request: Message | None) -> int:
    """Rate-limit tokens a call takes: a GetMany one per distinct key (it
    does what as many Gets would), every other call one."""
    if isinstance(request, cache_pb2.GetManyRequest):
        return max(1, len(set(request.keys)))
    return 1


def get_many_response(keys: list[str], results: list[Entry | errors.CacheError]) -> cache_pb2.GetManyResponse:
    out = cache_pb2.GetManyResponse()
    ttl_left = NodeRules.ttl_left
    for key, r in zip(keys, results, strict=True):
        if isinstance(r, errors.CacheError):
            out.results.add(key=key, code=code_of(r).value[0], error=str(r) or r.reason)
        else:
            out.results.add(key=key, value=r.value, ttl=ttl_left(r))
    return out


_PACK_DOUBLE = struct.Struct("<d").pack
_BYTE = [bytes((i,)) for i in range(128)]
_VIEW_FROM = (
    4096  # values this large join the reply as views (no intermediate copy)  # the varint of a length below 128
)


def _varint(n: int) -> bytes:
    return _BYTE[n] if n < 128 else varint(n)


def encode_get_many_response(keys: list[str], results: list[Entry | errors.CacheError]) -> bytes:
    """get_many_response(...).SerializeToString(), byte for byte, without
    building a message per key (tests/unit/test_wire.py checks the
    equality). A stored value is already `0x0a <length> value` (framing.py);
    as a KeyResult's field 2 it is `0x12 <length> value`: the same bytes but
    the first, so it goes into the reply as a view, with no length to work
    out and one copy (the join)."""
    parts: list = []
    add = parts.append
    now = time.monotonic()
    for key, r in zip(keys, results, strict=True):
        kb = key.encode("utf-8", "surrogatepass")
        kl = len(kb)
        head = b"\x0a" + _varint(kl) + kb if kl else b""
        if isinstance(r, errors.CacheError):
            eb = (str(r) or r.reason).encode()
            tail = b"\x18" + _varint(code_of(r).value[0]) + (b"\x22" + _varint(len(eb)) + eb if eb else b"")
            body = head + tail
            add(b"\x0a" + _varint(len(body)) + body)
            continue
        data, offset = r.data, r.offset
        ttl = b"\x29" + _PACK_DOUBLE(max(r.expires - now, 0.001)) if r.expires else b""
        if offset:  # framed: data[0] is GetResponse's tag, then the length and the value
            size = len(head) + len(data) + len(ttl)
            if size < _VIEW_FROM:  # small: one concatenation beats a view and a second part
                add(b"\x0a" + _varint(size) + head + b"\x12" + data[1:])
            else:
                add(b"\x0a" + _varint(size) + head + b"\x12")
                add(memoryview(data)[1:])
        elif data:  # unframed (not what a node keeps, but a valid Entry)
            field = b"\x12" + _varint(len(data))
            size = len(head) + len(field) + len(data) + len(ttl)
            add(b"\x0a" + _varint(size) + head + field)
            add(data)
        else:  # an empty value: proto3 leaves the field out
            add(b"\x0a" + _varint(len(head) + len(ttl)) + head)
        if ttl:
            add(ttl)
    return b"".join(parts)


def change_response(change: Change) -> cache_pb2.ChangeResponse:
    out = cache_pb2.ChangeResponse(owner=change.owner)
    for ack in change.acks:
        out.peers.add(addr=ack.addr, confirmed=ack.confirmed, error=ack.error)
    return out


def forward_response(request_id: int, entry: Entry) -> cache_pb2.ForwardResponse:
    return cache_pb2.ForwardResponse(id=request_id, response=entry.data, ttl=NodeRules.ttl_left(entry))


def forward_error(request_id: int, exc: errors.CacheError) -> cache_pb2.ForwardResponse:
    return cache_pb2.ForwardResponse(
        id=request_id, code=code_of(exc).value[0], reason=exc.reason, error=str(exc) or exc.reason
    )


def forward_rate_limited(request_id: int, refusal: Failure) -> cache_pb2.ForwardResponse:
    """A stream's Get refused by the rate limit before it ran (status.rate_limited_failure)."""
    return cache_pb2.ForwardResponse(
        id=request_id, code=refusal.code.value[0], reason="RATE_LIMITED", error=refusal.details
    )


def peek_response(entry: Entry | None) -> bytes:
    if entry is None:
        return cache_pb2.PeekResponse(found=False).SerializeToString()
    return cache_pb2.PeekResponse(found=True, response=entry.data, ttl=NodeRules.ttl_left(entry)).SerializeToString()


def handoff_entries(request: cache_pb2.HandoffRequest) -> list[tuple[str, bytes, float]]:
    return [(e.key, e.value, e.ttl) for e in request.entries]


def handoff_response(accepted: int, refused: int) -> bytes:
    return cache_pb2.HandoffResponse(accepted=accepted, refused=refused).SerializeToString()
