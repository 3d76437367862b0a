"""Consistent-hash ring that places keys exactly where the Go nodes do.

Design contract 3: a Python node and a Go node given the same peer list must
agree on every key's owner, so this mirrors the Go code quirk for quirk
rather than being a "better" ring (no jump hash, no dedup of colliding
virtual nodes). tests/unit/test_ring.py checks it against a Go build.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left
from collections.abc import Iterable

__all__ = ["BALANCE_LIMIT", "SCHEMES", "HashRing", "balance_warning"]

# "seed": the seed's ConsistentHash, virtual node i of N is hashed as N + str(i).
# "groupcache": golang/groupcache consistenthash.Map, hashed as str(i) + N.
SCHEMES = ("seed", "groupcache")


class HashRing:
    """Immutable ring; build a new one when the peer list changes.

    Immutability lets request handlers read `owner()` without a lock while
    a SetPeers handler swaps in a whole new ring with one assignment.
    """

    __slots__ = ("_nodes", "_replicas", "_scheme", "_members", "_hashes", "_owners")

    def __init__(self, nodes: Iterable[str] = (), replicas: int = 50, scheme: str = "seed") -> None:
        if isinstance(nodes, (str, bytes)):
            # A bare "host:port" would otherwise become one node per character.
            raise TypeError(f"nodes must be an iterable of node names, not a single {type(nodes).__name__}")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown ring scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")

        node_tuple = tuple(nodes)
        for node in node_tuple:
            if not isinstance(node, str):
                raise TypeError(f"node names must be str, got {node!r}")

        crc32 = zlib.crc32  # crc32 IEEE, same as Go's crc32.ChecksumIEEE
        hashes: list[int] = []
        owner_of: dict[int, str] = {}
        for node in node_tuple:
            for i in range(replicas):
                vnode = node + str(i) if scheme == "seed" else str(i) + node
                h = crc32(vnode.encode("utf-8"))
                hashes.append(h)
                # On a crc collision the later node wins, as with Go's
                # `hashmap[h] = node`; that is why node order is kept.
                owner_of[h] = node
        # Duplicate hashes stay in the list, as in Go; bisect_left lands on the
        # first of them and all of them map to the same (last-written) owner.
        hashes.sort()

        self._nodes = node_tuple
        self._replicas = replicas
        self._scheme = scheme
        self._members = frozenset(node_tuple)
        self._hashes = hashes
        # Aligned with _hashes so owner() is one bisect plus one list index.
        self._owners = [owner_of[h] for h in hashes]

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    @property
    def replicas(self) -> int:
        return self._replicas

    @property
    def scheme(self) -> str:
        return self._scheme

    def owner(self, key: str) -> str | None:
        """The node that owns `key`, or None when the ring has no nodes."""
        hashes = self._hashes
        if not hashes:
            return None
        # Go: sort.Search(len(ring), func(i) bool { return ring[i] >= h }).
        idx = bisect_left(hashes, zlib.crc32(key.encode("utf-8")))
        if idx == len(hashes):
            idx = 0  # past the last virtual node: wrap to the first
        return self._owners[idx]

    def points(self) -> list[tuple[int, str]]:
        """(hash, node) of every point, in ring order: what owner() searches."""
        return list(zip(self._hashes, self._owners, strict=True))

    def shares(self) -> dict[str, float]:
        """Each node's share of the key space (the crc32 range it owns)."""
        out = dict.fromkeys(self._nodes, 0.0)
        hashes, owners = self._hashes, self._owners
        if not hashes:
            return out
        # Node i owns (hashes[i-1], hashes[i]]; the first also owns the wrap.
        out[owners[0]] += (hashes[0] + (1 << 32) - hashes[-1]) / (1 << 32)
        for i in range(1, len(hashes)):
            out[owners[i]] += (hashes[i] - hashes[i - 1]) / (1 << 32)
        return out

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, node: object) -> bool:
        try:
            return node in self._members
        except TypeError:  # unhashable
            return False

    def __eq__(self, other: object) -> bool:
        # Same inputs give the same placement; handy to skip no-op SetPeers.
        if not isinstance(other, HashRing):
            return NotImplemented
        return (self._nodes, self._replicas, self._scheme) == (other._nodes, other._replicas, other._scheme)

    def __hash__(self) -> int:
        return hash((self._nodes, self._replicas, self._scheme))

    def __repr__(self) -> str:
        return f"HashRing(nodes={list(self._nodes)!r}, replicas={self._replicas}, scheme={self._scheme!r})"


# A node owning more than this times its fair share of the key space gets a warning.
BALANCE_LIMIT = 1.25


def balance_warning(shares: dict[str, float], replicas: int, limit: float = BALANCE_LIMIT) -> str | None:
    """A warning when one node owns more than `limit` times its fair share."""
    if len(shares) < 2:
        return None
    node, share = max(shares.items(), key=lambda item: item[1])
    ratio = share * len(shares)
    if ratio <= limit:
        return None
    return (
        f"ring imbalance: {node} owns {share:.1%} of the keys, {ratio:.2f}x its fair share "
        f"(limit {limit}x); raise node.replicas (now {replicas}) for a more even ring, "
        "unless the seed's Go nodes share it (they need replicas = 50)"
    )
