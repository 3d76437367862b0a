"""A python: origin for worker processes started by the tests
(`python:support.origin_values:sized`, with tests/ on PYTHONPATH)."""

from __future__ import annotations

import hashlib


def sized(key: str) -> bytes:
    """Key `<size>-<name>`: `size` deterministic bytes derived from the key."""
    size = int(key.split("-", 1)[0])
    block = hashlib.sha256(key.encode()).digest()
    return (block * (size // len(block) + 1))[:size]
