"""build_origin's dispatch and configuration errors, and LimitedOrigin's guarantees."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from appliance.cache.errors import InvalidRequest, KeyNotFound, OriginError
from appliance.config import GroupSettings
from appliance.origins import LimitedOrigin, build_origin
from appliance.origins.files import FileOrigin
from appliance.origins.http import HttpOrigin
from appliance.origins.python import PythonOrigin
from appliance.origins.sql import SqlOrigin


def group(**kw) -> GroupSettings:
    return GroupSettings(**{"timeout": 1.0, "max_concurrent_loads": 2, **kw})


async def test_dispatch(tmp_path):
    (tmp_path / "d").mkdir()
    cases = [
        (group(origin="sqlite:///{state_dir}/x.db", query="SELECT 1 WHERE :key = 'a'"), SqlOrigin),
        (group(origin="http://127.0.0.1:9/{key}"), HttpOrigin),
        (group(origin="file://{state_dir}/d"), FileOrigin),
        (group(origin="file:///{state_dir}/d"), FileOrigin),
        (group(origin="python:json:dumps"), PythonOrigin),
    ]
    for spec, cls in cases:
        o = build_origin("g", spec, state_dir=tmp_path, max_value_bytes=10)
        try:
            assert isinstance(o, LimitedOrigin)
            assert isinstance(o.inner, cls)
            assert (o.timeout, o.max_concurrent_loads) == (1.0, 2)
        finally:
            await o.close()
    # {state_dir} expanded, and no empty database file was created by building
    assert not (tmp_path / "x.db").exists()


async def test_build_uses_the_expansion_settings_report(tmp_path):
    # Production (build_origin) and Layout.expand_origin expand {state_dir} alike.
    from appliance.config import Layout, Settings

    (tmp_path / "files").mkdir()
    s = Settings(node={"state_dir": str(tmp_path)}, groups={"f": {"origin": "file:///{state_dir}/files"}})
    assert Layout(s).expand_origin("f") == f"file://{tmp_path}/files"
    o = build_origin("f", s.groups["f"], state_dir=Layout(s).state_path(), max_value_bytes=10)
    try:
        assert o.inner.root == tmp_path / "files"
    finally:
        await o.close()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(origin="ftp://host/x"), "got scheme 'ftp'"),
        (dict(origin="nonsense"), "expected an origin URL"),
        (dict(origin=""), "empty"),
        (dict(origin="sqlite:///x.db"), "expected a SQL query"),
        (dict(origin="sqlite:///x.db", query="SELECT 1"), 'bind parameter ":key"'),
        (dict(origin="sqlite://", query="SELECT :key"), "sqlite:///relative/file.db"),
        (dict(origin="http://127.0.0.1/items"), "containing {key}"),
        (dict(origin="http://u:p@127.0.0.1/{key}"), "without credentials"),
        (dict(origin="file://relative/dir"), "file:///absolute/dir"),
        (dict(origin="http://127.0.0.1/{key}", demo_seed=True), "demo_seed applies only to sqlite origins"),
        (dict(origin="python:origin_funcs"), "python:package.module:function"),
        (dict(origin="http://127.0.0.1/{key}", max_concurrent_loads=0), "max_concurrent_loads"),
        (dict(origin="http://127.0.0.1/{key}", timeout=0), "timeout"),
        (dict(origin="oracle://u@h/db", query="SELECT :key"), "got scheme 'oracle'"),
    ],
)
def test_settings_refuse_what_build_origin_need_not_check(kw, match):
    # build_origin takes validated GroupSettings: these never reach it.
    with pytest.raises(ValidationError, match=match):
        GroupSettings(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(origin="sqlite:///x.db", query="SELECT v FROM t WHERE k = :key AND j = :other"), "also uses :other"),
        (dict(origin="file:///definitely/not/here"), "does not exist"),
        (dict(origin="postgresql+nosuchdriver://u@h/db", query="SELECT :key"), "unsupported database URL"),
        (dict(origin="python:no_such_module_here:f"), "cannot import module"),
        (dict(origin="http://127.0.0.1/{key}", headers_from_env={"A": "NO_SUCH_VAR_FOR_TESTS"}), "is not set"),
    ],
)
def test_build_errors_are_value_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match) as ei:
        build_origin("grp", group(**kw), state_dir=tmp_path, max_value_bytes=10)
    assert "group grp" in str(ei.value)


class Scripted:
    """A stand-in inner origin: LimitedOrigin is the thing under test here."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.calls = 0
        self.closed = False

    async def load(self, key):
        self.calls += 1
        return await self.behaviour(key)

    async def close(self):
        self.closed = True


async def until(cond, timeout=2.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)


def limited(behaviour, **kw):
    opts = dict(group_name="g", timeout=1.0, max_concurrent_loads=1, max_value_bytes=10)
    opts.update(kw)
    return LimitedOrigin(Scripted(behaviour), **opts)


async def test_raw_exception_becomes_origin_error():
    async def bad(key):
        raise ZeroDivisionError("division by zero")

    o = limited(bad)
    with pytest.raises(OriginError, match="group g: origin failed: ZeroDivisionError: division by zero"):
        await o.load("k")


async def test_cache_errors_pass_through():
    for exc in (KeyNotFound("nope"), InvalidRequest("bad key"), OriginError("down")):

        async def b(key, exc=exc):
            raise exc

        with pytest.raises(type(exc)):
            await limited(b).load("k")


async def test_non_bytes_and_oversized_values_refused():
    async def s(key):
        return key

    async def ba(key):
        return bytearray(b"ok")

    with pytest.raises(OriginError, match="returned str, expected bytes"):
        await limited(s).load("k")
    assert await limited(ba).load("k") == b"ok"

    async def big(key):
        return b"x" * 11

    with pytest.raises(OriginError, match="11 bytes is larger than max_value_bytes \\(10\\)"):
        await limited(big).load("k")


async def test_inner_timeout_error_is_origin_error():
    async def t(key):
        raise TimeoutError("socket read timed out")

    with pytest.raises(OriginError, match="timed out.*socket read timed out"):
        await limited(t).load("k")


async def test_timeout_frees_the_slot_and_counts_queue_wait():
    gate = asyncio.Event()

    async def slow(key):
        if key == "slow":
            await asyncio.wait_for(gate.wait(), 5)
        return b"v"

    o = limited(slow, timeout=0.2, max_concurrent_loads=1)
    first = asyncio.create_task(o.load("slow"))
    await until(lambda: o.in_flight == 1)
    with pytest.raises(OriginError, match=r"group g: origin timed out after 0\.2s$"):
        await first
    assert o.in_flight == 0
    # the slot is free again, and nothing was remembered
    assert await o.load("fast") == b"v"

    # A load that waits for a slot the whole time says so.
    o.timeout = 5.0
    holder = asyncio.create_task(o.load("slow"))
    await until(lambda: o.in_flight == 1)
    o.timeout = 0.2
    with pytest.raises(OriginError, match=r"timed out after 0\.2s \(all 1 load slots were busy\)"):
        await o.load("fast")
    gate.set()
    assert await holder == b"v"


async def test_cancellation_propagates():
    gate = asyncio.Event()

    async def slow(key):
        await asyncio.wait_for(gate.wait(), 5)
        return b"v"

    o = limited(slow, timeout=5)
    t = asyncio.create_task(o.load("k"))
    await until(lambda: o.in_flight == 1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert o.in_flight == 0


async def test_close_closes_inner():
    async def ok(key):
        return b"v"

    o = limited(ok)
    await o.close()
    assert o.inner.closed
