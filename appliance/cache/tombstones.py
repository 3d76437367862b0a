"""Short-lived records of keys a node saw removed or overwritten.

A handoff (a stopping node's entries) or a peek (a previous owner's entry)
carries a value read on another node some time ago. A Remove or Set fans
out to every live node, so the receiver has seen it if it happened since:
it keeps the key here for `window` seconds and refuses such values. The
window must cover the longest a value can travel (handoff or peek timeout)
plus the longest a fan-out can lag behind (the peer timeout).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


class Tombstones:
    """Keys seen removed or set in the last `window` seconds. Past
    `max_keys` it forgets them all and refuses every key for a window,
    which is never wrong, only colder."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if window < 0 or max_keys < 1:
            raise ValueError("window must be >= 0 and max_keys >= 1")
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._at: dict[str, float] = {}  # key -> when last seen removed
        self._order: collections.deque[tuple[float, str]] = collections.deque()
        self._all_until = float("-inf")

    def add(self, key: str) -> None:
        if not self.window:
            return
        now = self._clock()
        self._expire(now)
        self._at[key] = now
        self._order.append((now, key))
        if len(self._at) > self.max_keys:
            self._at.clear()
            self._order.clear()
            self._all_until = now + self.window

    def __contains__(self, key: str) -> bool:
        now = self._clock()
        if now < self._all_until:
            return True
        at = self._at.get(key)
        return at is not None and now - at < self.window

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._at)

    def _expire(self, now: float) -> None:
        order, at = self._order, self._at
        while order and now - order[0][0] >= self.window:
            when, key = order.popleft()
            if at.get(key) == when:  # not seen again since
                del at[key]
