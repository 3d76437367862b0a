"""Cache errors <-> gRPC statuses with google.rpc.ErrorInfo details.

The same mapping is read back by peers and clients, so an owner's answer
(key missing, origin down) can be told apart from a transport failure.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..cache import errors

DOMAIN = "groupcache-appliance"
DETAILS_KEY = "grpc-status-details-bin"

CODES: dict[type[errors.CacheError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.GroupNotFound: grpc.StatusCode.NOT_FOUND,
    errors.KeyNotFound: grpc.StatusCode.NOT_FOUND,
    errors.OriginError: grpc.StatusCode.UNAVAILABLE,
    errors.PeerError: grpc.StatusCode.UNAVAILABLE,
}
BY_REASON = {cls.reason: cls for cls in CODES}
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def to_status(exc: errors.CacheError, group: str = "", key: str = "") -> grpc.Status:
    code = CODES.get(type(exc), grpc.StatusCode.INTERNAL)
    info = error_details_pb2.ErrorInfo(
        reason=exc.reason, domain=DOMAIN, metadata={"group": _clip(group), "key": _clip(key)}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    message = str(exc) or exc.reason
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


def reason_of(trailing_metadata) -> str | None:
    """The ErrorInfo reason in a failed call's trailers, if we sent one."""
    for key, value in trailing_metadata or ():
        if key != DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a foreign server's garbage is not ours to explain
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == DOMAIN:
                return info.reason
    return None


def from_rpc_error(err: grpc.RpcError) -> errors.CacheError:
    """Turn a failed call into the cache error it stands for.

    Only answers the owner gave on purpose keep their meaning; anything
    else (refused, timed out, reset) is a PeerError."""
    code = err.code()
    message = err.details() or code.name
    return owner_error(reason_of(err.trailing_metadata()) or "", code.value[0], message)


def owner_error(reason: str, code: int, message: str) -> errors.CacheError:
    """The error an owner's (reason, status code) stands for. A missing group
    on the owner is not an answer about the key: PeerError, load locally."""
    cls = BY_REASON.get(reason)
    if cls is not None and cls is not errors.GroupNotFound and CODES[cls].value[0] == code:
        return cls(message)
    return errors.PeerError(f"{_CODE_NAMES.get(code, code)}: {message}")
