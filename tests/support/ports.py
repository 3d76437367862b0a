"""Free loopback ports for tests."""

from __future__ import annotations

import random
import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_range(n: int, host: str = "127.0.0.1", tries: int = 200) -> int:
    """First port of n consecutive free ports (worker i serves base + i)."""
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(20000, 60000 - n)
        if all(_bindable(host, base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports found")
