"""The call metadata nodes put on the calls they make to each other."""

from __future__ import annotations

# Marks a call as forwarded: the receiver serves it itself, so rings that
# disagree during a membership change cannot bounce a request around.
FORWARDED = ("x-groupcache-forwarded", "1")
# On a Get's reply from the key's owner: the key is hot, spread its reads
# over every node (their hot caches serve it).
HOT = ("x-groupcache-hot", "1")
# Remaining TTL of the owner's entry, so a hot copy never outlives it.
TTL_MS = "x-groupcache-ttl-ms"


def is_forwarded(metadata) -> bool:
    """Whether a call's invocation metadata marks it as forwarded by a peer."""
    return FORWARDED in (metadata or ())


def ttl_trailer(ttl_left: float) -> tuple[tuple[str, str], ...]:
    return ((TTL_MS, str(max(int(ttl_left * 1000), 1))),)


def ttl_from_trailers(trailing_metadata) -> float:
    for key, value in trailing_metadata or ():
        if key == TTL_MS:
            try:
                return max(int(value), 1) / 1000.0
            except ValueError:
                return 0.0
    return 0.0
