"""Python origin: ``python:package.module:function``.

The callable is imported when the origin is built (a ValueError with the
cause if it cannot be). It takes the key and returns ``bytes`` (also
bytearray/memoryview), ``str`` (sent as UTF-8) or ``None`` (KeyNotFound); it
may raise ``appliance.cache.errors.KeyNotFound`` itself. Any other result
type, or any other exception, is an OriginError.

A coroutine function is awaited in the loop. A plain function runs in a
thread pool of the group's own (``max_concurrent_loads`` threads) so it never
blocks the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from appliance.cache.errors import CacheError, KeyNotFound, OriginError

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _is_async(func: Any) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    # an object with `async def __call__`
    return callable(func) and not inspect.isfunction(func) and inspect.iscoroutinefunction(func.__call__)


def import_callable(group_name: str, spec: str) -> Callable[[str], Any]:
    """Import ``package.module:attr[.attr…]`` (the part after ``python:``)."""
    g = group_name
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not _DOTTED.match(module_name) or not _DOTTED.match(attr_path):
        raise ValueError(f"group {g}: bad python origin 'python:{spec}'; expected python:package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises at import
        raise ValueError(
            f"group {g}: cannot import module {module_name!r} for its python origin: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"group {g}: module {module_name!r} has no attribute {attr_path!r} (python origin)"
            ) from None
    if not callable(obj):
        raise ValueError(f"group {g}: python origin {module_name}:{attr_path} is not callable")
    return obj


class PythonOrigin:
    def __init__(self, group_name: str, origin: str, *, max_concurrent_loads: int = 4) -> None:
        if not origin.startswith("python:"):
            raise ValueError(f"group {group_name}: not a python origin: {origin!r}")
        self.group_name = group_name
        self.target = origin[len("python:") :].strip()
        self.func = import_callable(group_name, self.target)
        self.is_async = _is_async(self.func)
        self._executor: ThreadPoolExecutor | None = None
        if not self.is_async:
            self._executor = ThreadPoolExecutor(
                max_workers=max(1, max_concurrent_loads),
                thread_name_prefix=f"origin-py-{group_name}",
            )
        self._closed = False

    def __repr__(self) -> str:
        return f"PythonOrigin({self.group_name!r}, {self.target!r})"

    async def load(self, key: str) -> bytes:
        g = self.group_name
        if self._closed:
            raise OriginError(f"group {g}: origin is closed")
        try:
            if self.is_async:
                result = await self.func(key)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, self.func, key)
            if inspect.isawaitable(result):  # a sync function that returned a coroutine
                result = await result
        except CacheError:
            raise  # KeyNotFound (or OriginError) raised on purpose by the function
        except Exception as exc:
            raise OriginError(f"group {g}: {self.target} raised {type(exc).__name__}: {exc}") from exc
        if result is None:
            raise KeyNotFound(f"group {g}: key {key!r} not found")
        if isinstance(result, bytes):
            return result
        if isinstance(result, (bytearray, memoryview)):
            return bytes(result)
        if isinstance(result, str):
            return result.encode("utf-8")
        raise OriginError(f"group {g}: {self.target} returned {type(result).__name__}; expected bytes, str or None")

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
