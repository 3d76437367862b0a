"""SQL origin against real SQLite files (and the demo database)."""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
import sys
import threading

import pytest

from appliance.cache.errors import KeyNotFound, OriginError
from appliance.config import GroupSettings
from appliance.origins import build_origin
from appliance.origins.demo import DEMO_QUERY, DEMO_ROWS, ensure_demo_db


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "kv.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT, b BLOB, n INTEGER, f REAL)")
        conn.executemany(
            "INSERT INTO kv VALUES (?, ?, ?, ?, ?)",
            [
                ("a", "apple", b"\x00\x01\xff", 42, 2.5),
                ("张三", "中文值", None, 100, None),
                ("nullv", None, None, None, None),
                ("x' OR '1'='1", "tricky", None, 0, 0.0),
            ],
        )
    conn.close()
    return path


@pytest.fixture
async def make(tmp_path):
    made = []

    def _make(origin, query, **kw):
        spec = GroupSettings(origin=origin, query=query, timeout=kw.pop("timeout", 5.0), **kw)
        o = build_origin("scores", spec, state_dir=tmp_path, max_value_bytes=1 << 20)
        made.append(o)
        return o

    yield _make
    for o in made:
        await o.close()


def q(col):
    return f"SELECT {col} FROM kv WHERE k = :key"


async def test_hit_miss_null(db, make):
    o = make(f"sqlite:///{db}", q("v"))
    assert await o.load("a") == b"apple"
    assert await o.load("张三") == "中文值".encode()
    with pytest.raises(KeyNotFound):
        await o.load("missing")
    with pytest.raises(KeyNotFound):
        await o.load("nullv")


async def test_bytes_and_number_columns(db, make):
    assert await make(f"sqlite:///{db}", q("b")).load("a") == b"\x00\x01\xff"
    assert await make(f"sqlite:///{db}", q("n")).load("a") == b"42"
    assert await make(f"sqlite:///{db}", q("f")).load("a") == b"2.5"
    assert await make(f"sqlite:///{db}", "SELECT CAST(n AS TEXT) || '!' FROM kv WHERE k = :key").load("a") == b"42!"


async def test_two_columns_is_origin_error_at_first_load(db, make):
    o = make(f"sqlite:///{db}", q("v, n"))
    msg = "group scores: query returned 2 columns; expected exactly one row with one column"
    with pytest.raises(OriginError, match=msg):
        await o.load("a")
    with pytest.raises(OriginError, match=msg):  # even for a key with no row
        await o.load("missing")


async def test_two_rows_is_origin_error(db, make):
    o = make(f"sqlite:///{db}", "SELECT v FROM kv WHERE k >= :key")
    with pytest.raises(OriginError, match="group scores: query returned more than one row"):
        await o.load("a")


async def test_injection_looking_key_is_just_a_key(db, make):
    o = make(f"sqlite:///{db}", q("v"))
    assert await o.load("x' OR '1'='1") == b"tricky"
    for key in ("' OR '1'='1", "a'; DROP TABLE kv; --", 'a" OR 1=1 --'):
        with pytest.raises(KeyNotFound):
            await o.load(key)
    assert await o.load("a") == b"apple"  # the table is still there


async def test_database_errors_are_origin_errors(db, make, tmp_path):
    o = make(f"sqlite:///{db}", "SELECT v FROM no_such_table WHERE k = :key")
    with pytest.raises(OriginError, match=r"group scores: database error: OperationalError: no such table"):
        await o.load("a")
    missing = tmp_path / "missing.db"
    o = make(f"sqlite:///{missing}", q("v"))
    with pytest.raises(OriginError, match="unable to open database file"):
        await o.load("a")
    assert not missing.exists()  # no empty database file was created
    # Failures are not sticky: once the file exists, the same origin works.
    conn = sqlite3.connect(missing)
    with conn:
        conn.execute("CREATE TABLE kv (k TEXT, v TEXT)")
        conn.execute("INSERT INTO kv VALUES ('a', 'late')")
    conn.close()
    assert await o.load("a") == b"late"


async def test_concurrent_readers(db, make):
    o = make(f"sqlite:///{db}", q("n"), max_concurrent_loads=4)
    keys = ["a", "张三", "missing"] * 20
    results = await asyncio.gather(*(o.load(k) for k in keys), return_exceptions=True)
    for k, r in zip(keys, results, strict=True):
        if k == "missing":
            assert isinstance(r, KeyNotFound)
        else:
            assert r == {"a": b"42", "张三": b"100"}[k]


async def test_state_dir_placeholder_and_relative_to_it(db, make, tmp_path):
    assert db.parent == tmp_path
    o = make("sqlite:///{state_dir}/kv.db", q("v"))
    assert await o.load("a") == b"apple"


async def test_demo_database(make, tmp_path):
    path = tmp_path / "state" / "sub" / "demo.db"
    o = make("sqlite:///{state_dir}/state/sub/demo.db", DEMO_QUERY, demo_seed=True)
    assert path.exists()
    assert await o.load("张三") == b"100"
    assert await o.load("李四") == b"1000"
    assert await o.load("王五") == b"10000"
    with pytest.raises(KeyNotFound):
        await o.load("nobody")


def test_ensure_demo_db_is_idempotent_and_race_safe(tmp_path):
    path = tmp_path / "a" / "demo.db"
    barrier = threading.Barrier(8)
    created = []
    errors = []

    def worker():
        try:
            barrier.wait(timeout=5)
            created.append(ensure_demo_db(path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors
    assert created.count(True) == 1
    assert ensure_demo_db(path) is False
    conn = sqlite3.connect(path)
    rows = dict(conn.execute("SELECT name, score FROM students"))
    conn.close()
    assert rows == dict(DEMO_ROWS)
    assert rows["张三"] == 100
    assert [p.name for p in path.parent.iterdir()] == ["demo.db"]  # no temp files left


def test_ensure_demo_db_never_touches_an_existing_file(tmp_path):
    path = tmp_path / "demo.db"
    path.write_bytes(b"not a database")
    assert ensure_demo_db(path) is False
    assert path.read_bytes() == b"not a database"


def sql_group(origin: str) -> GroupSettings:
    return GroupSettings(origin=origin, query="SELECT v FROM kv WHERE k = :key", timeout=1.0, max_concurrent_loads=2)


def test_missing_postgres_driver_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    with pytest.raises(ValueError, match=r"groupcache-appliance\[postgresql\]") as ei:
        build_origin("scores", sql_group("postgresql://u:pw@127.0.0.1/db"), state_dir=tmp_path, max_value_bytes=10)
    assert "pw" not in str(ei.value)


@pytest.mark.skipif(importlib.util.find_spec("pymysql") is not None, reason="pymysql is installed")
def test_missing_mysql_driver_names_the_extra(tmp_path):
    with pytest.raises(ValueError, match=r"groupcache-appliance\[mysql\]"):
        build_origin("scores", sql_group("mysql://u:pw@127.0.0.1/db"), state_dir=tmp_path, max_value_bytes=10)
