"""A python: origin for worker processes started by the tests
(`python:support.origin_values:sized`, with tests/ on PYTHONPATH)."""

from __future__ import annotations

import hashlib


def sized(key: str) -> bytes:
    """Key `<size>-<name>`: `size` deterministic bytes derived from the key."""
    size = int(key.split("-", 1)[0])
    block = hashlib.sha256(key.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def logged(key: str) -> bytes:
    """`"v-" + key`, the value the seed harness's Go loader returns, so both
    sides of a mixed cluster agree; one JSON line `[pid, key]` per load is
    appended to the file named by $SEED_INTEROP_LOADS (one write, O_APPEND)."""
    import json
    import os

    path = os.environ.get("SEED_INTEROP_LOADS")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps([os.getpid(), key]) + "\n").encode())
        finally:
            os.close(fd)
    return ("v-" + key).encode()


def counted(key: str) -> bytes:
    """`sized` values, and one line per load (the key) appended to the file
    named by $APPLIANCE_TEST_LOADS (one O_APPEND write), so that loads are
    counted exactly across worker restarts."""
    import os

    path = os.environ.get("APPLIANCE_TEST_LOADS")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, key.encode() + b"\n")
        finally:
            os.close(fd)
    return sized(key)
