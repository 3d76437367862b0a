"""SQL origin: one SQLAlchemy engine (with a connection pool) per group.

The group's ``query`` is run as ``text(query)`` with ``{"key": key}`` bound as a
parameter, never formatted into the SQL. The blocking DB-API call runs in a
small thread pool of the group's own, sized to ``max_concurrent_loads``, so the
event loop never blocks and a hung database holds at most that many threads
and connections.

Result rules: zero rows or NULL -> KeyNotFound; exactly one row with one
column -> the value (bytes as-is, str as UTF-8, anything else as
``str(v).encode()``); any other shape -> OriginError naming the group.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import QueuePool

from appliance.cache.errors import CacheError, KeyNotFound, OriginError
from appliance.origins.demo import DEMO_QUERY, ensure_demo_db

# Bare scheme -> the driver we use for it, and the extra that installs it.
_DEFAULT_DRIVERS: dict[str, tuple[str, str | None, str]] = {
    # backend: (drivername, extra, pip package)
    "postgresql": ("postgresql+psycopg", "postgresql", "psycopg[binary]"),
    "postgres": ("postgresql+psycopg", "postgresql", "psycopg[binary]"),
    "mysql": ("mysql+pymysql", "mysql", "pymysql"),
    "mariadb": ("mariadb+pymysql", "mysql", "pymysql"),
}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _db_error(exc: BaseException) -> str:
    """A short, single-line description of a database error (no SQL, no URL)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        orig = exc.orig
        return f"{type(orig).__name__}: {_first_line(orig)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def to_bytes(value: Any) -> bytes:
    """The cache value of one SQL column value (None is handled by the caller)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


class SqlOrigin:
    """Loads ``key`` with one parameterised query through a pooled engine."""

    def __init__(
        self,
        group_name: str,
        url: str,
        query: str | None,
        *,
        timeout: float,
        max_concurrent_loads: int,
        demo_seed: bool = False,
    ) -> None:
        self.group_name = group_name
        g = group_name
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise ValueError(f"group {g}: cannot parse database URL: {exc}") from None

        backend, _, driver = parsed.drivername.partition("+")
        backend = backend.lower()
        extra: str | None = None
        package: str | None = driver or None
        if backend == "postgres":  # the Heroku-style alias SQLAlchemy no longer accepts
            parsed = parsed.set(drivername="postgresql" + (f"+{driver}" if driver else ""))
            backend = "postgresql"
        if not driver and backend in _DEFAULT_DRIVERS:
            drivername, extra, package = _DEFAULT_DRIVERS[backend]
            parsed = parsed.set(drivername=drivername)
        self.url: URL = parsed
        self.backend = backend

        # The query: must bind :key and nothing else.
        if query is None or not str(query).strip():
            if demo_seed:
                query = DEMO_QUERY
            else:
                raise ValueError(
                    f"group {g}: a SQL origin needs a query with :key, e.g. "
                    f'query = "SELECT value FROM items WHERE id = :key"'
                )
        try:
            stmt = text(query)
            params = set(stmt.compile().params)
        except SQLAlchemyError as exc:
            raise ValueError(f"group {g}: cannot parse query: {_first_line(exc)}") from None
        if "key" not in params:
            raise ValueError(f"group {g}: query must contain the bound parameter :key: {query!r}")
        others = sorted(params - {"key"})
        if others:
            raise ValueError(
                f"group {g}: query may bind only :key, but it also uses " + ", ".join(":" + p for p in others)
            )
        self.query = query
        self._stmt = stmt

        n = max_concurrent_loads
        pool_kw: dict[str, Any] = {
            "poolclass": QueuePool,
            "pool_size": n,
            "max_overflow": 0,  # the executor never runs more than n loads
            "pool_timeout": max(timeout, 1.0),
        }
        self.sqlite_path: Path | None = None
        try:
            if backend == "sqlite":
                self.engine = self._sqlite_engine(parsed, timeout, demo_seed, pool_kw)
            else:
                self.engine = create_engine(
                    parsed,
                    pool_pre_ping=True,  # survive a database restart
                    pool_recycle=1800,
                    connect_args=self._connect_args(backend, parsed, timeout),
                    **pool_kw,
                )
        except ImportError as exc:
            if extra:
                hint = f"pip install 'groupcache-appliance[{extra}]'"
            else:
                hint = f"pip install {package or driver}"
            raise ValueError(
                f"group {g}: the {backend} origin needs the database driver "
                f"{getattr(exc, 'name', None) or package} ({_first_line(exc)}): {hint}"
            ) from None
        except ArgumentError as exc:  # includes NoSuchModuleError (unknown dialect/driver)
            raise ValueError(
                f"group {g}: unsupported database URL "
                f"{parsed.render_as_string(hide_password=True)!r}: {_first_line(exc)}"
            ) from None

        self._executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"origin-sql-{group_name}")
        self._closed = False

    def _sqlite_engine(self, parsed: URL, timeout: float, demo_seed: bool, pool_kw: dict[str, Any]) -> Engine:
        g = self.group_name
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:") or parsed.query.get("uri"):
            if demo_seed:
                raise ValueError(f"group {g}: demo_seed needs a sqlite file path, e.g. sqlite:///{{state_dir}}/demo.db")
            if database in ("", ":memory:"):
                raise ValueError(
                    f"group {g}: a sqlite origin needs a database file, e.g. sqlite:////var/lib/x.db "
                    "(an in-memory database would always be empty)"
                )
            # A URI form chosen by the user: let SQLAlchemy handle it as written.
            return create_engine(parsed, connect_args={"check_same_thread": False, "timeout": timeout}, **pool_kw)
        path = Path(database).expanduser().absolute()
        self.sqlite_path = path
        if demo_seed:
            ensure_demo_db(path)
        # mode=rw: never create an empty database file where the user's file
        # is missing (a load then fails with a clear "unable to open").
        uri = "file:" + quote(str(path)) + "?mode=rw"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=timeout)

        return create_engine(parsed.set(database=str(path)), creator=connect, **pool_kw)

    @staticmethod
    def _connect_args(backend: str, parsed: URL, timeout: float) -> dict[str, Any]:
        """Driver timeouts so a dead database does not hold a thread forever.

        Only set what the user did not set in the URL's query string.
        """
        args: dict[str, Any] = {}
        q = parsed.query
        driver = parsed.get_driver_name()
        if backend == "postgresql" and driver in ("psycopg", "psycopg2"):
            if "connect_timeout" not in q:
                args["connect_timeout"] = max(2, math.ceil(timeout))
        elif backend in ("mysql", "mariadb") and driver == "pymysql":
            if "connect_timeout" not in q:
                args["connect_timeout"] = max(1.0, timeout)
            if "read_timeout" not in q:
                args["read_timeout"] = max(1.0, timeout)
        return args

    def __repr__(self) -> str:
        return f"SqlOrigin({self.group_name!r}, {self.url.render_as_string(hide_password=True)!r})"

    async def load(self, key: str) -> bytes:
        if self._closed:
            raise OriginError(f"group {self.group_name}: origin is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._load_sync, key)

    def _load_sync(self, key: str) -> bytes:
        g = self.group_name
        try:
            with self.engine.connect() as conn:  # rolled back on exit: a load never writes
                result = conn.execute(self._stmt, {"key": key})
                if not result.returns_rows:
                    raise OriginError(
                        f"group {g}: query returned no result set; expected exactly one row with one column"
                    )
                ncols = len(result.keys())
                if ncols != 1:
                    raise OriginError(
                        f"group {g}: query returned {ncols} columns; expected exactly one row with one column"
                    )
                rows = result.fetchmany(2)
                result.close()
        except CacheError:
            raise
        except SQLAlchemyError as exc:
            raise OriginError(f"group {g}: database error: {_db_error(exc)}") from exc
        except sqlite3.Error as exc:  # from our creator, before SQLAlchemy wraps it
            raise OriginError(f"group {g}: database error: {type(exc).__name__}: {_first_line(exc)}") from exc
        if not rows:
            raise KeyNotFound(f"group {g}: key {key!r} not found")
        if len(rows) > 1:
            raise OriginError(
                f"group {g}: query returned more than one row for key {key!r}; expected exactly one row with one column"
            )
        value = rows[0][0]
        if value is None:
            raise KeyNotFound(f"group {g}: key {key!r} not found (NULL)")
        return to_bytes(value)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.engine.dispose)
