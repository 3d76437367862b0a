"""Hot-cache admission: which values fetched from an owner get a hot copy.

`RatePromoter` (the default) tracks the request rate of recently seen keys
in a bounded table, with exponential decay. While the hot cache has room it
keeps any fetched value (free bytes cost nothing, and the table forgets
the rarer keys of a large data set before their second Get); once full, a
key must have been asked for more than once and beat the rate of the hot
entry that would be evicted for it. So the hot cache holds the keys that
are hot now, not whatever was fetched last, and a stream of cold keys
cannot flush it. `RandomPromoter` is the old behaviour
(admit a fetched value with a fixed probability). Pure logic, no I/O.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class Promoter(Protocol):
    def seen(self, key: str, times: float = 1.0) -> None:
        """`times` Gets of `key` that the main cache did not answer."""

    def admit(self, key: str, victim: str | None, room: bool = False) -> bool:
        """Whether a value of `key` fetched from its owner gets a hot copy.
        `room`: it fits without evicting anything; otherwise `victim` is the
        hot entry it would displace (None: the policy names none)."""


class RandomPromoter:
    def __init__(self, probability: float, rand: Callable[[], float] = random.random) -> None:
        if not 0 <= probability <= 1:
            raise ValueError("probability must be in [0, 1]")
        self.probability = probability
        self._rand = rand

    def seen(self, key: str, times: float = 1.0) -> None:
        pass

    def admit(self, key: str, victim: str | None, room: bool = False) -> bool:
        return self._rand() < self.probability


class RatePromoter:
    """Decayed per-key request counts (`half_life` seconds) for at most
    `capacity` keys, the least recently seen dropped first."""

    def __init__(
        self,
        *,
        half_life: float = 10.0,
        capacity: int = 16384,
        min_hits: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if half_life <= 0 or capacity < 1:
            raise ValueError("half_life must be > 0 and capacity >= 1")
        self._decay = math.log(2) / half_life
        self.capacity = capacity
        self.min_hits = min_hits
        self._clock = clock
        # key -> (decayed count, when it was last updated)
        self._rates: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def rate(self, key: str) -> float:
        """Decayed count of `key` now (0 when not tracked)."""
        got = self._rates.get(key)
        if got is None:
            return 0.0
        count, at = got
        return count * math.exp(-self._decay * (self._clock() - at))

    def seen(self, key: str, times: float = 1.0) -> None:
        now = self._clock()
        rates = self._rates
        got = rates.get(key)
        count = times if got is None else got[0] * math.exp(-self._decay * (now - got[1])) + times
        rates[key] = (count, now)
        rates.move_to_end(key)
        if len(rates) > self.capacity:
            rates.popitem(last=False)

    def admit(self, key: str, victim: str | None, room: bool = False) -> bool:
        rate = self.rate(key)
        if room:
            return rate > 0  # asked for lately
        if rate < self.min_hits:
            return False  # a one-off: never worth a hot copy
        return victim is None or rate > self.rate(victim)

    def forget(self, key: str) -> None:
        self._rates.pop(key, None)

    def __len__(self) -> int:
        return len(self._rates)


class OwnedHotKeys:
    """Which of an owner's keys are hot, so that its replies can say so and
    clients spread them (each node's hot cache then serves them). One Get in
    `every` is counted (a counter is all the other hits cost); a key is hot
    while its decayed count reaches `rate` Gets a second."""

    def __init__(
        self,
        *,
        rate: float = 32.0,
        every: int = 8,
        half_life: float = 1.0,
        capacity: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or every < 1:
            raise ValueError("rate must be > 0 and every >= 1")
        self.every = every
        # A steady r Gets/s settles at r * half_life / ln 2 counted hits, 1 in `every` of them counted.
        self._threshold = rate * half_life / math.log(2) / every
        self._rates = RatePromoter(half_life=half_life, capacity=capacity, clock=clock)
        self._tick = 0
        self._samples = 0
        self.hot: set[str] = set()

    def hit(self, key: str) -> None:
        self._tick += 1
        if self._tick % self.every == 0:
            self.counted(key)

    def counted(self, key: str, times: int = 1) -> None:
        """`times` counted hits of `key` (1 in `every` of its hits): what
        hit() counts, and what a server that samples hits itself reports."""
        rates = self._rates
        rates.seen(key, times)
        if rates.rate(key) >= self._threshold:
            self.hot.add(key)
        else:
            self.hot.discard(key)
        self._samples += 1
        if self._samples % 1024 == 0:  # keys no longer asked for leave too
            self.hot = {k for k in self.hot if rates.rate(k) >= self._threshold}

    def forget(self, key: str) -> None:
        self._rates.forget(key)
        self.hot.discard(key)
