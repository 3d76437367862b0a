"""Byte-bounded key/value stores under one eviction policy (lru, lfu, fifo).

The policies come from cachetools; this module adds what a cache node needs
on top: sizes counted as key + value bytes, per-entry expiry, and eviction
counters.
"""

from __future__ import annotations

import builtins
import copy
import heapq
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import cachetools

POLICIES: dict[str, type[cachetools.Cache]] = {
    "lru": cachetools.LRUCache,
    "lfu": cachetools.LFUCache,
    "fifo": cachetools.FIFOCache,
}


class Entry(NamedTuple):
    data: bytes  # the value, behind `offset` bytes of framing (see Group)
    expires: float  # monotonic deadline; 0 = never
    size: int  # key + value bytes, what the budget counts
    offset: int = 0

    @property
    def value(self) -> bytes:
        return self.data[self.offset :] if self.offset else self.data


# Makes a store: (policy, max_bytes, clock) -> a Store, or the engine's
# (appliance_engine.Store, the same API; cache/native_store.py).
StoreFactory = Callable[[str, int, Callable[[], float]], "Store"]


def entry_size(key: str, value: bytes) -> int:
    return len(key.encode("utf-8", "surrogatepass")) + len(value)


if TYPE_CHECKING:

    class _CountingCache(cachetools.Cache[str, Entry]):
        """What _counting makes: a policy that counts its evictions, and
        whose sizes are ints (the entries' sizes)."""

        evictions: int

        @property
        def currsize(self) -> int: ...


def _counting(base: type[cachetools.Cache]) -> type[_CountingCache]:
    class Counting(base):  # type: ignore[misc, valid-type]
        evictions = 0

        def popitem(self):  # called by cachetools when it needs room
            item = super().popitem()
            self.evictions += 1
            return item

    Counting.__name__ = f"Counting{base.__name__}"
    return Counting


_COUNTING = {name: _counting(cls) for name, cls in POLICIES.items()}


class Store:
    """One cache (main or hot) of a group."""

    def __init__(self, policy: str, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if policy not in _COUNTING:
            raise ValueError(f"unknown eviction policy {policy!r}; expected one of {', '.join(POLICIES)}")
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.policy = policy
        self.max_bytes = max_bytes
        self._clock = clock
        self._data = _COUNTING[policy](maxsize=max(max_bytes, 1), getsizeof=_size)
        # (expires, key) of entries with a TTL: expired ones are found
        # from the top of the heap instead of by scanning the cache.
        self._expiry: list[tuple[float, str]] = []
        self.expirations = 0

    # Reads -----------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires and entry.expires <= self._clock():
            self._discard(key, entry)
            return None
        return entry

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def ranked(self) -> list[tuple[str, Entry]]:
        """Live entries, the one the policy would evict last first (lru: the
        most recently used first). Read from a copy, so the store's own
        order and counters stay as they are; O(n)."""
        snapshot = copy.copy(self._data)
        order = []
        while snapshot:
            order.append(snapshot.popitem())  # eviction order, through cachetools' public API
        order.reverse()
        now = self._clock()
        return [(k, e) for k, e in order if not e.expires or e.expires > now]

    def fits(self, size: int) -> bool:
        """Whether an entry of `size` bytes fits without evicting one."""
        return self._data.currsize + size <= self.max_bytes

    def victim(self, size: int) -> str | None:
        """The entry a new one of `size` bytes would evict first (None: it
        fits). Exact for lru; other policies name no victim."""
        if self.fits(size):
            return None
        order = getattr(self._data, "_LRUCache__order", None)  # cachetools' LRU order
        return next(iter(order), None) if order else None

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        return self._data.currsize

    @property
    def evictions(self) -> int:
        return self._data.evictions

    # Writes ----------------------------------------------------------------

    # `builtins.bytes`: in the class body, `bytes` is the property above.
    def set(self, key: str, data: builtins.bytes, expires: float = 0.0, offset: int = 0) -> bool:
        """Store; False when the entry alone exceeds the budget (not stored).

        The value is data[offset:]; only its bytes count against the budget."""
        size = entry_size(key, data) - offset
        if size > self.max_bytes:
            self.remove(key)
            return False
        self.reclaim_expired()
        self._data[key] = Entry(data, expires, size, offset)
        if expires:
            heapq.heappush(self._expiry, (expires, key))
            if len(self._expiry) > 2 * len(self._data) + 64:
                self._rebuild_expiry()
        return True

    def remove(self, key: str) -> bool:
        return self._data.pop(key, None) is not None

    def evict_one(self) -> bool:
        """Evict one entry by policy (used to hold a budget shared by two stores)."""
        if not self._data:
            return False
        self._data.popitem()
        return True

    def clear(self) -> None:
        self._data.clear()
        self._expiry.clear()

    def reclaim_expired(self, limit: int = 64) -> int:
        """Drop up to `limit` expired entries; cost is O(limit log n)."""
        now = self._clock()
        heap = self._expiry
        done = 0
        while heap and heap[0][0] <= now and done < limit:
            expires, key = heapq.heappop(heap)
            # Read past the policy: reclaiming is not a use (no LRU/LFU touch).
            entry = cachetools.Cache.__getitem__(self._data, key) if key in self._data else None
            if entry is not None and entry.expires == expires:
                self._discard(key, entry)
                done += 1
        return done

    def _discard(self, key: str, entry: Entry) -> None:
        if self._data.get(key) is entry:
            del self._data[key]
            self.expirations += 1

    def _rebuild_expiry(self) -> None:
        # Overwritten and evicted entries leave stale heap items behind.
        self._expiry = [(e.expires, k) for k, e in self._data.items() if e.expires]
        heapq.heapify(self._expiry)


def _size(entry: Entry) -> int:
    return entry.size
