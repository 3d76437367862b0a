"""Errors of the cache core.

Each error has a `kind`, the one thing every front needs to answer it: gRPC
maps a kind to a status code (protocol/status.py), HTTP to a status
(fronts/http/api.py). A subclass inherits its parent's kind, so a new error is
answered right by every front without an entry in any table.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base class; `reason` is a stable machine-readable word."""

    reason = "CACHE_ERROR"
    kind = "internal"


class InvalidRequest(CacheError):
    """Empty or oversized group or key (INVALID_ARGUMENT)."""

    reason = "INVALID_REQUEST"
    kind = "invalid_argument"


class GroupNotFound(CacheError):
    """No group of that name on this node (NOT_FOUND)."""

    reason = "GROUP_NOT_FOUND"
    kind = "not_found"


class KeyNotFound(CacheError):
    """The origin says the key does not exist (NOT_FOUND). Not cached."""

    reason = "KEY_NOT_FOUND"
    kind = "not_found"


class OriginError(CacheError):
    """The origin failed or timed out (UNAVAILABLE). Never cached."""

    reason = "ORIGIN_ERROR"
    kind = "unavailable"


class PeerError(CacheError):
    """The owner could not be reached in time; the caller loads locally."""

    reason = "PEER_ERROR"
    kind = "unavailable"


class Unauthenticated(CacheError):
    """A write (or a read where reads need a credential) without a valid one."""

    reason = "UNAUTHENTICATED"
    kind = "unauthenticated"


class PermissionDenied(CacheError):
    """A valid credential without the scope the call needs."""

    reason = "PERMISSION_DENIED"
    kind = "permission_denied"


class TooLarge(CacheError):
    """A reply would exceed its byte limit; refused before it is built."""

    reason = "TOO_LARGE"
    kind = "resource_exhausted"


class Draining(CacheError):
    """This node is stopping: it takes no handed-off entries (UNAVAILABLE)."""

    reason = "DRAINING"
    kind = "unavailable"


class NotServing(PeerError):
    """This node holds no ring yet (it just started): a client tries another
    node (UNAVAILABLE). Unlike a node that owns every key, it loads nothing."""

    reason = "NOT_SERVING"
