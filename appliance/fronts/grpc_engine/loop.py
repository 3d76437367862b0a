"""An asyncio event loop that another thread can briefly run "inside".

The loop holds `lock` whenever it runs Python code (callbacks, task steps)
and releases it only while it waits for I/O in select(). A thread that takes
the lock therefore runs between two of the loop's steps: everything the
loop's code touches is consistent and still, without being handed to the
loop (no wakeup write, no callback, no hop).

The engine backend's receiving thread uses it to answer cache hits itself
(appliance.fronts.grpc_engine.server). That thread never awaits or blocks
while holding the lock, and never touches asyncio objects under it; what
needs the loop (a miss, a cancel) still goes through call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _ReleasingSelector(selectors.DefaultSelector):
    """The loop's selector: the lock is free while it waits."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self._lock = lock

    def select(self, timeout=None):
        self._lock.release()
        try:
            return super().select(timeout)
        finally:
            self._lock.acquire()


class SharedLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        super().__init__(_ReleasingSelector(self.lock))

    def run_forever(self) -> None:
        with self.lock:
            super().run_forever()


def lock_of(loop: asyncio.AbstractEventLoop) -> threading.Lock | None:
    """The lock of a SharedLoop, or None for any other loop."""
    return loop.lock if isinstance(loop, SharedLoop) else None


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on a SharedLoop."""
    with asyncio.Runner(loop_factory=SharedLoop) as runner:
        return runner.run(main)


class SharedLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """A policy whose new loops are SharedLoops (for frameworks and tests
    that make their own loops)."""

    def new_event_loop(self) -> SharedLoop:
        return SharedLoop()
