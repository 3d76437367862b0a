"""Protobuf requests and replies of our services, built from the node's
answers (both backends use these; no RPC library here)."""

from __future__ import annotations

import struct
import time
from typing import Callable, TypeVar

from google.protobuf.message import DecodeError, Message

from ..cache import errors
from ..cache.store import Entry
from ..node.instance import Change, NodeInstance
from ..pb import cache_pb2
from .status import code_of
from .wire import varint

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


def get_many_response(keys: list[str], results: list[Entry | errors.CacheError]) -> cache_pb2.GetManyResponse:
    out = cache_pb2.GetManyResponse()
    ttl_left = NodeInstance.ttl_left
    for key, r in zip(keys, results):
        if isinstance(r, errors.CacheError):
            out.results.add(key=key, code=code_of(r).value[0], error=str(r) or r.reason)
        else:
            out.results.add(key=key, value=r.value, ttl=ttl_left(r))
    return out


_PACK_DOUBLE = struct.Struct("<d").pack


def encode_get_many_response(keys: list[str], results: list[Entry | errors.CacheError]) -> bytes:
    """get_many_response(...).SerializeToString(), byte for byte, without
    building a message per key: the values go from the cache into the reply
    with one copy (tests/unit/test_wire.py checks the equality)."""
    parts: list = []
    add = parts.append
    now = time.monotonic()
    for key, r in zip(keys, results):
        kb = key.encode("utf-8", "surrogatepass")
        body = [b"\x0a", varint(len(kb)), kb] if kb else []
        if isinstance(r, errors.CacheError):
            eb = (str(r) or r.reason).encode()
            body += [b"\x18", varint(code_of(r).value[0])]
            if eb:
                body += [b"\x22", varint(len(eb)), eb]
        else:
            n = len(r.data) - r.offset
            if n:
                body += [b"\x12", varint(n), memoryview(r.data)[r.offset :] if r.offset else r.data]
            if r.expires:
                body += [b"\x29", _PACK_DOUBLE(max(r.expires - now, 0.001))]
        size = 0
        for b in body:
            size += len(b)
        add(b"\x0a")
        add(varint(size))
        parts += body
    return b"".join(parts)


def change_response(change: Change) -> cache_pb2.ChangeResponse:
    out = cache_pb2.ChangeResponse(owner=change.owner)
    for ack in change.acks:
        out.peers.add(addr=ack.addr, confirmed=ack.confirmed, error=ack.error)
    return out


def forward_response(request_id: int, entry: Entry) -> cache_pb2.ForwardResponse:
    return cache_pb2.ForwardResponse(id=request_id, response=entry.data, ttl=NodeInstance.ttl_left(entry))


def forward_error(request_id: int, exc: errors.CacheError) -> cache_pb2.ForwardResponse:
    return cache_pb2.ForwardResponse(
        id=request_id, code=code_of(exc).value[0], reason=exc.reason, error=str(exc) or exc.reason
    )
