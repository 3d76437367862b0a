"""The demo database: the seed's students and scores, in SQLite.

``ensure_demo_db`` is what a group with ``demo_seed = true`` runs at build
time, so that a fresh appliance answers ``appliance get scores 张三`` with
``100`` out of the box.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path

DEMO_QUERY = "SELECT score FROM students WHERE name = :key"

# The seed's sample rows and a few more in the same pattern.
DEMO_ROWS: tuple[tuple[str, int], ...] = (
    ("张三", 100),
    ("李四", 1000),
    ("王五", 10000),
    ("赵六", 100000),
    ("孙七", 1000000),
    ("周八", 10000000),
    ("吴九", 100000000),
)


def ensure_demo_db(path: Path) -> bool:
    """Create the demo SQLite database at ``path`` if it is missing.

    Returns True if this call created it. Idempotent, and safe when several
    workers start at once: the file is built under a temporary name in the
    same directory and then hard-linked into place, which fails instead of
    overwriting when another worker won the race. An existing file is never
    touched, whatever it contains.
    """
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp_name)
        try:
            with conn:
                conn.execute("CREATE TABLE students (name TEXT PRIMARY KEY, score INTEGER)")
                conn.executemany("INSERT INTO students (name, score) VALUES (?, ?)", DEMO_ROWS)
        finally:
            conn.close()
        os.chmod(tmp_name, 0o644)
        try:
            os.link(tmp_name, path)  # atomic, never clobbers
            return True
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: an atomic rename. Both racers
            # wrote identical content, so whichever lands last is fine.
            if path.exists():
                return False
            os.replace(tmp_name, path)
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
