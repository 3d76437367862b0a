"""SQL origin against a private, throwaway PostgreSQL server.

Runs when Debian's PostgreSQL server binaries (``apt-get install postgresql``)
and psycopg (``pip install groupcache-appliance[postgresql]``) are present;
skips with the reason otherwise. It never uses a system postgres service: it
runs initdb into a temporary directory, listens on 127.0.0.1 on a free port
with its unix socket in that directory, and stops the server (pg_ctl stop -m
immediate) at the end.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from appliance.cache.errors import KeyNotFound, OriginError
from appliance.config import GroupSettings
from appliance.origins import build_origin


def _pg_bin() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[3]) if Path(p).parts[3].isdigit() else 0,
    )
    for initdb in reversed(found):
        bindir = Path(initdb).parent
        if (bindir / "pg_ctl").exists():
            return bindir
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("postgresql server binaries not found: apt-get install postgresql")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg not installed: pip install groupcache-appliance[postgresql]")
    import psycopg

    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="origins-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(base, ignore_errors=True)
            pytest.skip("running as root and runuser is missing")
        os.chown(base, pg.pw_uid, pg.pw_gid)
        prefix = [runuser, "-u", "postgres", "--"]
    data = base / "data"
    log = base / "server.log"
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def run(*args: str, timeout: float = 60) -> None:
        proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=base)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr or proc.stdout}")

    started = False
    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "appliance",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c full_page_writes=off"
        # -w waits (with pg_ctl's own deadline, -t) until the server accepts connections.
        for attempt in range(3):
            try:
                run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "30", "-o", opts, "start")
                started = True
                break
            except RuntimeError:
                if attempt == 2:
                    raise RuntimeError(f"postgres did not start: {log.read_text() if log.exists() else ''}") from None
                port = _free_port()  # the port was taken in between: try another
                opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c full_page_writes=off"
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = psycopg.connect(
                    host="127.0.0.1", port=port, user="appliance", dbname="postgres", autocommit=True, connect_timeout=2
                )
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with conn:
            conn.execute(
                "CREATE TABLE scores (name TEXT PRIMARY KEY, score INTEGER, data BYTEA, note TEXT, amount NUMERIC)"
            )
            conn.execute(
                "INSERT INTO scores VALUES (%s, %s, %s, %s, %s), (%s, %s, %s, %s, %s)",
                ("张三", 100, b"\x00\xff", "中文", "12.50", "nulls", None, None, None, None),
            )
        yield f"postgresql://appliance@127.0.0.1:{port}/postgres"
    finally:
        if started:
            try:
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "20", "stop", timeout=30)
            except Exception:
                pass
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def make(postgres, tmp_path):
    made = []

    def _make(query, **kw):
        spec = GroupSettings(origin=postgres, query=query, timeout=5.0, **kw)
        o = build_origin("scores", spec, state_dir=tmp_path, max_value_bytes=1 << 20)
        made.append(o)
        return o

    yield _make
    for o in made:
        await o.close()


def q(col):
    return f"SELECT {col} FROM scores WHERE name = :key"


async def test_postgres_values(make):
    assert await make(q("score")).load("张三") == b"100"
    assert await make(q("data")).load("张三") == b"\x00\xff"
    assert await make(q("note")).load("张三") == "中文".encode()
    assert await make(q("amount")).load("张三") == b"12.50"


async def test_postgres_missing_and_null(make):
    o = make(q("score"))
    with pytest.raises(KeyNotFound):
        await o.load("nobody")
    with pytest.raises(KeyNotFound):
        await o.load("nulls")
    with pytest.raises(KeyNotFound):
        await o.load("' OR '1'='1")


async def test_postgres_shape_and_sql_errors(make):
    with pytest.raises(
        OriginError, match="group scores: query returned 2 columns; expected exactly one row with one column"
    ):
        await make(q("score, note")).load("张三")
    with pytest.raises(OriginError, match="group scores: database error: UndefinedTable"):
        await make("SELECT v FROM nope WHERE k = :key").load("张三")


async def test_postgres_concurrent_loads_share_a_small_pool(make):
    o = make(q("score"), max_concurrent_loads=3)
    results = await asyncio.gather(*(o.load("张三") for _ in range(30)))
    assert results == [b"100"] * 30
    pool = o.inner.engine.pool
    assert pool.size() == 3
    assert pool.checkedin() <= 3


async def test_postgres_unreachable_is_origin_error(tmp_path):
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg not installed: pip install groupcache-appliance[postgresql]")
    port = _free_port()  # nothing listens there
    spec = GroupSettings(origin=f"postgresql://appliance@127.0.0.1:{port}/postgres", query=q("score"), timeout=5.0)
    o = build_origin("scores", spec, state_dir=tmp_path, max_value_bytes=100)
    try:
        with pytest.raises(OriginError, match="group scores: database error: OperationalError"):
            await o.load("张三")
    finally:
        await o.close()
