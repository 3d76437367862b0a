"""The grammar of a group's ``origin`` string, shared by the config (which
validates it) and ``build_origin`` (which dispatches on it).

Pure string handling: no drivers, no I/O, so the config can import it cheaply.

    sqlite:///path/to.db              (also sqlite:////abs.db, sqlite:///{state_dir}/x.db)
    postgresql://user:pw@host/db      (postgres://, postgresql+driver://)
    mysql://user:pw@host/db           (mariadb://, mysql+driver://)
    http(s)://host/path/{key}
    file:///dir                       (file://{state_dir}/dir)
    python:package.module:function
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ..quoting import show

__all__ = ["EXPECTED", "SQL_SCHEMES", "Kind", "expand", "kind", "validate"]

Kind = Literal["sql", "http", "file", "python"]

# URL schemes (the part before "+driver") of the SQL origin; postgres and
# mariadb are aliases that appliance.origins.sql rewrites for SQLAlchemy.
SQL_SCHEMES = frozenset({"sqlite", "postgresql", "postgres", "mysql", "mariadb"})
EXPECTED = (
    "an origin URL: sqlite:///path.db, postgresql://…, mysql://…, "
    "http(s)://host/…{key}…, file:///dir or python:package.module:function"
)
PLACEHOLDERS = ("state_dir", "key")

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_PYTHON = re.compile(r"python:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def kind(origin: str) -> Kind:
    """``"sql"``, ``"http"``, ``"file"`` or ``"python"``; ValueError for any other form."""
    if origin.startswith("python:"):
        return "python"
    scheme = origin.split(":", 1)[0].lower()
    if scheme.split("+", 1)[0] in SQL_SCHEMES:
        return "sql"
    if scheme in ("http", "https"):
        return "http"
    if scheme == "file":
        return "file"
    raise ValueError(f"expected {EXPECTED}, got {show(origin)}")


def validate(origin: str) -> str:
    """The origin, stripped; ValueError saying what was expected otherwise."""
    origin = origin.strip()
    if not origin:
        raise ValueError(f"expected {EXPECTED}, got an empty string")
    for name in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", origin):
        if name not in PLACEHOLDERS:
            raise ValueError(
                f"unknown placeholder {{{name}}} in {show(origin)} "
                "(expected {state_dir}, or {key} in an http(s) origin)"
            )
    if origin.startswith("python:"):
        if not _PYTHON.fullmatch(origin):
            raise ValueError(f'expected "python:package.module:function", got {show(origin)}')
        return origin
    m = _SCHEME.match(origin)
    if m is None:
        raise ValueError(f"expected {EXPECTED}, got {show(origin)}")
    scheme = m.group(1).lower()
    rest = origin[m.end() :]
    if scheme.split("+", 1)[0] in SQL_SCHEMES:
        _check_sql(origin, scheme, rest)
    elif scheme in ("http", "https"):
        _check_http(origin, scheme)
    elif scheme == "file":
        if not (rest.startswith("/") or rest.startswith("{state_dir}")) or rest.strip("/") == "":
            raise ValueError(f'expected "file:///absolute/dir" or "file://{{state_dir}}/dir", got {show(origin)}')
    else:
        hint = ""
        if scheme in ("pg", "psql", "pgsql"):
            hint = " (did you mean postgresql://?)"
        elif scheme == "sqlite3":
            hint = " (did you mean sqlite:///?)"
        raise ValueError(f"expected {EXPECTED}, got scheme {scheme!r}{hint}")
    return origin


def _check_sql(origin: str, scheme: str, rest: str) -> None:
    if scheme.split("+", 1)[0] == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                'expected "sqlite:///relative/file.db" or "sqlite:////absolute/file.db" '
                f'(or "sqlite:///{{state_dir}}/file.db"), got {show(origin)}'
            )
    elif not rest or rest.startswith("/"):
        raise ValueError(f'expected "{scheme}://user:password@host/database", got {show(origin)}')


def _check_http(origin: str, scheme: str) -> None:
    parts = urlsplit(origin.replace("{key}", "KEY").replace("{state_dir}", "state"))
    if not parts.hostname:
        raise ValueError(f'expected "{scheme}://host[:port]/path/{{key}}", got {show(origin)} (no host)')
    if parts.username or parts.password:
        raise ValueError(
            f"expected an {scheme} URL without credentials, got {show(origin)} "
            "(put them in headers or headers_from_env)"
        )
    if "{key}" not in origin:
        raise ValueError(
            f"expected an {scheme} URL containing {{key}} where the key goes, like "
            f'"{scheme}://api.example.com/items/{{key}}", got {show(origin)}'
        )
    if "{key}" in urlsplit(origin).netloc:
        raise ValueError(
            f"expected {{key}} in the {scheme} URL's path or query, not in its host, got {show(origin)} "
            "(a key must not choose where the origin's headers go)"
        )


def expand(origin: str, state_dir: Path | str) -> str:
    """``origin`` with ``{state_dir}`` replaced; ``{key}`` is left for each load.

    A file origin written ``file:///{state_dir}/x`` keeps three slashes, not four.
    """
    expanded = origin.replace("{state_dir}", str(state_dir))
    if kind(origin) == "file":
        expanded = re.sub(r"^file:/{3,}", "file:///", expanded, flags=re.IGNORECASE)
    return expanded
