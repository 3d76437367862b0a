"""Origins: where a group's owner node loads a value from on a miss.

An origin turns a key into bytes, or raises:

* ``KeyNotFound``   the origin says the key does not exist (NOT_FOUND)
* ``OriginError``   the origin failed, timed out or is misconfigured (UNAVAILABLE)
* ``InvalidRequest`` the key cannot be asked of this origin (file origin: path escapes)

Nothing here caches anything, failures included: the next ``load`` simply asks
the origin again. :func:`build_origin` turns a group's settings into an origin
wrapped in :class:`LimitedOrigin`, which bounds concurrency and time per load
and guarantees that no raw exception escapes.

Supported ``origin`` forms (the grammar is ``appliance.origins.grammar``;
``{state_dir}`` is expanded in all of them)::

    sqlite:///path/to.db              + query with :key   (SQLAlchemy)
    postgresql://user:pw@host/db      + query             (extra: [postgresql])
    mysql://user:pw@host/db           + query             (extra: [mysql])
    http(s)://host/path/{key}                             (aiohttp)
    file:///dir                                            (key = relative path)
    python:package.module:function                         (sync or async callable)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from appliance.cache.errors import CacheError, OriginError

from . import grammar

if TYPE_CHECKING:
    from appliance.config import GroupSettings

__all__ = [
    "LimitedOrigin",
    "Origin",
    "build_origin",
]


@runtime_checkable
class Origin(Protocol):
    """What the cache core calls on a miss."""

    async def load(self, key: str) -> bytes:
        """Return the value of ``key``; raise KeyNotFound or OriginError."""
        ...

    async def close(self) -> None:
        """Release pools, sessions and threads. Idempotent."""
        ...


class LimitedOrigin:
    """Wraps a concrete origin with the group's limits.

    * at most ``max_concurrent_loads`` loads run at once (an asyncio.Semaphore);
    * a load, including its wait for a free slot, takes at most ``timeout``
      seconds, then raises ``OriginError("group g: origin timed out after 5.0s")``;
    * the value must be ``bytes`` of at most ``max_value_bytes`` bytes;
    * any exception that is not a ``CacheError`` becomes an ``OriginError``
      carrying the cause (never a raw exception, never cached).
    """

    def __init__(
        self,
        inner: Origin,
        *,
        group_name: str,
        timeout: float,
        max_concurrent_loads: int,
        max_value_bytes: int,
    ) -> None:
        if max_concurrent_loads < 1:
            raise ValueError(f"group {group_name}: max_concurrent_loads must be >= 1, got {max_concurrent_loads}")
        if not timeout > 0:
            raise ValueError(f"group {group_name}: timeout must be > 0 seconds, got {timeout}")
        self.inner = inner
        self.group_name = group_name
        self.timeout = float(timeout)
        self.max_concurrent_loads = max_concurrent_loads
        self.max_value_bytes = max_value_bytes
        self._sem = asyncio.Semaphore(max_concurrent_loads)
        self._in_flight = 0  # loads holding a slot right now

    @property
    def in_flight(self) -> int:
        """Loads currently running against the origin (for stats)."""
        return self._in_flight

    def __repr__(self) -> str:
        return (
            f"LimitedOrigin({self.inner!r}, max_concurrent_loads={self.max_concurrent_loads}, timeout={self.timeout})"
        )

    async def load(self, key: str) -> bytes:
        started = time.monotonic()
        got_slot = False

        async def run() -> Any:
            nonlocal got_slot
            async with self._sem:
                got_slot = True
                self._in_flight += 1
                try:
                    return await self.inner.load(key)
                except TimeoutError as exc:
                    # A timeout of the inner origin's own (a socket, a driver):
                    # not ours, so say what it was.
                    raise OriginError(
                        f"group {self.group_name}: origin timed out after "
                        f"{time.monotonic() - started:.1f}s: {_describe(exc)}"
                    ) from None
                finally:
                    self._in_flight -= 1

        try:
            async with asyncio.timeout(self.timeout):  # no extra task per load
                value = await run()
        except TimeoutError:
            msg = f"group {self.group_name}: origin timed out after {self.timeout}s"
            if not got_slot:
                msg += f" (all {self.max_concurrent_loads} load slots were busy)"
            raise OriginError(msg) from None
        except CacheError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never leak a raw exception
            raise OriginError(f"group {self.group_name}: origin failed: {_describe(exc)}") from exc

        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if not isinstance(value, bytes):
            raise OriginError(f"group {self.group_name}: origin returned {type(value).__name__}, expected bytes")
        if len(value) > self.max_value_bytes:
            raise OriginError(
                f"group {self.group_name}: value of {len(value)} bytes is larger than "
                f"max_value_bytes ({self.max_value_bytes})"
            )
        return value

    async def close(self) -> None:
        await self.inner.close()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def build_origin(group_name: str, group: GroupSettings, *, state_dir: Path, max_value_bytes: int) -> LimitedOrigin:
    """Build the origin of one group from its (validated) ``GroupSettings``.

    The config has checked the origin's form and the group's limits. This
    raises ``ValueError`` (naming the group) for what only building can
    tell: a missing driver, an unimportable callable, a missing directory or
    environment variable, a query that binds more than ``:key``.
    """
    origin = grammar.expand(group.origin, state_dir)
    loads = group.max_concurrent_loads
    inner: Origin
    kind = grammar.kind(origin)
    if kind == "python":
        from appliance.origins.python import PythonOrigin

        inner = PythonOrigin(group_name, origin, max_concurrent_loads=loads)
    elif kind == "sql":
        from appliance.origins.sql import SqlOrigin

        inner = SqlOrigin(
            group_name,
            origin,
            group.query,
            timeout=group.timeout,
            max_concurrent_loads=loads,
            demo_seed=group.demo_seed,
        )
    elif kind == "http":
        from appliance.origins.http import HttpOrigin

        inner = HttpOrigin(
            group_name,
            origin,
            timeout=group.timeout,
            headers=dict(group.headers),
            headers_from_env=dict(group.headers_from_env),
            max_value_bytes=max_value_bytes,
        )
    else:
        from appliance.origins.files import FileOrigin

        inner = FileOrigin(group_name, origin, max_value_bytes=max_value_bytes, max_concurrent_loads=loads)
    return LimitedOrigin(
        inner,
        group_name=group_name,
        timeout=group.timeout,
        max_concurrent_loads=loads,
        max_value_bytes=max_value_bytes,
    )
