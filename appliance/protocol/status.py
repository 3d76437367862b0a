"""Cache errors <-> gRPC statuses with google.rpc.ErrorInfo details.

One table for every backend and every client: servers turn a CacheError
into a status (`failure`), peers and clients read it back (`from_rpc_error`,
`error_of`), so an owner's answer (key missing, origin down) is told apart
from a transport failure.
"""

from __future__ import annotations

import collections

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from ..cache import errors

DOMAIN = "groupcache-appliance"
DETAILS_KEY = "grpc-status-details-bin"

# The status of each error kind (cache/errors.py); fronts/http/api.py maps the
# same kinds to HTTP statuses.
CODES: dict[str, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "internal": grpc.StatusCode.INTERNAL,
}


def _known(cls: type[errors.CacheError]) -> list[type[errors.CacheError]]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _known(sub)]


BY_REASON = {cls.reason: cls for cls in _known(errors.CacheError)[1:]}
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
# What a per-key result code (GetMany, Forward) stands for when it carries
# no reason: only the owner's own answers keep their meaning.
_BY_CODE = {
    grpc.StatusCode.NOT_FOUND.value[0]: errors.KeyNotFound,
    grpc.StatusCode.UNAVAILABLE.value[0]: errors.OriginError,
    grpc.StatusCode.INVALID_ARGUMENT.value[0]: errors.InvalidRequest,
}


class Failure(collections.namedtuple("Failure", ("code", "details", "trailing_metadata")), grpc.Status):
    """A status to end a call with: usable as grpc.Status (abort_with_status)
    and by the engine backend (code, message, trailers)."""


def code_of(exc: errors.CacheError) -> grpc.StatusCode:
    return CODES[exc.kind]


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _details(*messages) -> list[any_pb2.Any]:
    packed = []
    for message in messages:
        detail = any_pb2.Any()
        detail.Pack(message)
        packed.append(detail)
    return packed


def _failure(code: grpc.StatusCode, message: str, details: list) -> Failure:
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return Failure(code, message, ((DETAILS_KEY, status.SerializeToString()),))


def failure(exc: errors.CacheError, group: str = "", key: str = "") -> Failure:
    """The status a server answers a CacheError with (ErrorInfo: reason, group, key)."""
    info = error_details_pb2.ErrorInfo(
        reason=exc.reason, domain=DOMAIN, metadata={"group": _clip(group), "key": _clip(key)}
    )
    return _failure(code_of(exc), str(exc) or exc.reason, _details(info))


def internal_failure(exc: BaseException) -> Failure:
    """A bug in a handler: INTERNAL naming the exception type, nothing else
    (no message: it may hold data that is not the caller's)."""
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata={"exception": type(exc).__name__})
    return _failure(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}", _details(info))


def rate_limited_failure(retry_after: float, client: str, rate: float, burst: float) -> Failure:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after * 1e9) + 1)
    info = error_details_pb2.ErrorInfo(
        reason="RATE_LIMITED", domain=DOMAIN, metadata={"client": client, "rate": f"{rate:g}", "burst": f"{burst:g}"}
    )
    text = (
        f"rate limit of {rate:g} requests/s (burst {burst:g}) per client address exceeded; retry in {retry_after:.3f}s"
    )
    return _failure(
        grpc.StatusCode.RESOURCE_EXHAUSTED, text, _details(info, error_details_pb2.RetryInfo(retry_delay=delay))
    )


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


def client_error(err: grpc.RpcError) -> errors.CacheError:
    """from_rpc_error for applications' clients, which keep a node's
    GroupNotFound: they try other nodes (one may lag behind a config
    change), then raise it."""
    if err.code() == grpc.StatusCode.NOT_FOUND and reason_of(err.trailing_metadata()) == errors.GroupNotFound.reason:
        return errors.GroupNotFound(err.details() or "group not found")
    return from_rpc_error(err)


def owner_error(reason: str, code: int, message: str) -> errors.CacheError:
    """The error an owner's (reason, status code) stands for. A missing group
    on the owner is not an answer about the key: PeerError, load locally."""
    cls = BY_REASON.get(reason)
    if cls is not None and cls is not errors.GroupNotFound and CODES[cls.kind].value[0] == code:
        return cls(message)
    return errors.PeerError(f"{_CODE_NAMES.get(code, code)}: {message}")


def error_of(code: int, message: str) -> errors.CacheError:
    """The error of one key's result (a GetMany KeyResult): its code alone."""
    return _BY_CODE.get(code, errors.PeerError)(message)
