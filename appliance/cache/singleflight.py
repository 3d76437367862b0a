"""Singleflight for asyncio: concurrent calls for one key share one execution.

The shared work runs in its own task, so a caller that gives up (deadline,
cancel) does not cancel the load for the others waiting on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[V]] = {}

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(fn())
            self._calls[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        return await asyncio.shield(task)

    def in_flight(self, key: K) -> bool:
        """True when a call for key is in flight."""
        return key in self._calls

    def forget(self, key: K) -> None:
        """Let the next call for key start afresh; current waiters still
        get the old flight's result."""
        self._calls.pop(key, None)

    def __len__(self) -> int:
        return len(self._calls)

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter already has it
