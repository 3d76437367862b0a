"""Protobuf requests and replies of our services, built from the node's
answers (both backends use these; no RPC library here)."""

from __future__ import annotations

from typing import Callable, TypeVar

from google.protobuf.message import DecodeError, Message

from ..cache import errors
from ..cache.store import Entry
from ..node.instance import Change, NodeInstance
from ..pb import cache_pb2
from .status import code_of

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
