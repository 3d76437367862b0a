"""Free loopback ports for tests.

Ports are picked below the kernel's ephemeral range: outgoing connections
take their source ports from that range, so a port picked free there (as
port 0 picks) can be taken by another test's client before the server we
start binds it (an etcd fixture failed so in CI)."""

from __future__ import annotations

import random
import socket

_LOW = 10000
# Every port handed out in this process: a port free now may belong to a
# server of this run that is stopped for a moment (an appliance's worker
# between stop-node and its restart), so it is never handed out twice.
_GIVEN: set[int] = set()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


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
    top = _ephemeral_start()
    if top - n <= _LOW:
        top = 60000  # no room below the ephemeral range: take the old risk
    for _ in range(tries):
        base = rng.randrange(_LOW, top - n)
        ports = range(base, base + n)
        if _GIVEN.isdisjoint(ports) and all(_bindable(host, p) for p in ports):
            _GIVEN.update(ports)
            return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def free_port(host: str = "127.0.0.1") -> int:
    return free_range(1, host)
