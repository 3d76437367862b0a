"""Errors of the cache core. The gRPC layer maps each to one status code."""

from __future__ import annotations


class CacheError(Exception):
    """Base class; `reason` is a stable machine-readable word."""

    reason = "CACHE_ERROR"


class InvalidRequest(CacheError):
    """Empty or oversized group or key (INVALID_ARGUMENT)."""

    reason = "INVALID_REQUEST"


class GroupNotFound(CacheError):
    """No group of that name on this node (NOT_FOUND)."""

    reason = "GROUP_NOT_FOUND"


class KeyNotFound(CacheError):
    """The origin says the key does not exist (NOT_FOUND). Not cached."""

    reason = "KEY_NOT_FOUND"


class OriginError(CacheError):
    """The origin failed or timed out (UNAVAILABLE). Never cached."""

    reason = "ORIGIN_ERROR"


class PeerError(CacheError):
    """The owner could not be reached in time; the caller loads locally."""

    reason = "PEER_ERROR"


class Unauthenticated(CacheError):
    """A write (or a read where reads need a credential) without a valid one."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(CacheError):
    """A valid credential without the scope the call needs."""

    reason = "PERMISSION_DENIED"


class Draining(CacheError):
    """This node is stopping: it takes no handed-off entries (UNAVAILABLE)."""

    reason = "DRAINING"


class NotServing(PeerError):
    """This node holds no ring yet (it just started): a client tries another
    node (UNAVAILABLE). Unlike a node that owns every key, it loads nothing."""

    reason = "NOT_SERVING"
