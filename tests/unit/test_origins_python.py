"""python: origin, with real sync and async callables from tests/fixtures/origin_funcs.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from appliance.cache.errors import KeyNotFound, OriginError
from appliance.config import GroupSettings
from appliance.origins import LimitedOrigin, Origin, build_origin

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(autouse=True)
def funcs(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    import origin_funcs

    origin_funcs.reset()
    return origin_funcs


@pytest.fixture
async def make(tmp_path):
    made = []

    def _make(func: str, **kw) -> LimitedOrigin:
        kw.setdefault("timeout", 2.0)
        limit = kw.pop("max_value_bytes", 1024)
        spec = GroupSettings(origin=f"python:origin_funcs:{func}", **kw)
        o = build_origin("pyg", spec, state_dir=tmp_path, max_value_bytes=limit)
        made.append(o)
        return o

    yield _make
    for o in made:
        await o.close()


async def test_sync_function_str_is_utf8(make):
    o = make("sync_upper")
    assert isinstance(o, Origin)
    assert await o.load("abc") == b"ABC"
    assert await o.load("张三") == "张三".encode()


async def test_async_function_bytes(make):
    assert await make("async_bytes").load("k") == b"async:k"


async def test_async_callable_object(make):
    o = make("async_object")
    assert o.inner.is_async
    assert await o.load("k") == b"obj:k"


async def test_none_and_keynotfound_mean_missing(make):
    with pytest.raises(KeyNotFound):
        await make("sync_none").load("k")
    with pytest.raises(KeyNotFound):
        await make("async_missing").load("k")


async def test_wrong_return_type_is_origin_error(make):
    with pytest.raises(OriginError, match="returned int; expected bytes, str or None"):
        await make("returns_int").load("k")


async def test_exception_becomes_origin_error_with_cause(make):
    with pytest.raises(OriginError, match="RuntimeError: boom for k") as ei:
        await make("raises").load("k")
    assert "group pyg" in str(ei.value)


async def test_failure_is_not_sticky(make, funcs):
    o = make("flaky")
    with pytest.raises(OriginError, match="ConnectionError: backend down"):
        await o.load("k")
    assert await o.load("k") == b"recovered"
    assert funcs.calls["flaky"] == 2


async def test_sync_function_does_not_block_the_loop(make):
    o = make("sync_sleepy")
    ticks = 0
    stop = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    t = asyncio.create_task(ticker())
    started = time.monotonic()
    assert await o.load("k") == b"slept:k"
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.wait_for(t, 1)
    assert elapsed >= 0.3
    # A blocked loop would have ticked once or twice in 0.3 s.
    assert ticks >= 10, ticks


async def test_timeout(make):
    o = make("async_slow", timeout=0.2)
    started = time.monotonic()
    with pytest.raises(OriginError, match=r"origin timed out after 0\.2s"):
        await o.load("k")
    assert time.monotonic() - started < 1.5


async def test_value_size_limit(make):
    o = make("big", max_value_bytes=100)
    assert await o.load("100") == b"x" * 100
    with pytest.raises(OriginError, match="larger than max_value_bytes"):
        await o.load("101")


async def test_concurrency_limit(make, funcs):
    o = make("async_tracked", max_concurrent_loads=2)
    results = await asyncio.gather(*(o.load(f"k{i}") for i in range(8)))
    assert results == [f"k{i}".encode() for i in range(8)]
    assert funcs.tracked["max"] == 2


@pytest.mark.parametrize(
    "origin, match",
    [
        ("python:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'.*ModuleNotFoundError"),
        ("python:origin_funcs:nope", "has no attribute 'nope'"),
        ("python:origin_funcs:NOT_CALLABLE", "is not callable"),
    ],
)
def test_bad_python_path_is_value_error_at_build(tmp_path, origin, match):
    spec = GroupSettings(origin=origin)
    with pytest.raises(ValueError, match=match):
        build_origin("pyg", spec, state_dir=tmp_path, max_value_bytes=100)
