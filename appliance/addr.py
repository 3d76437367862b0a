"""host:port strings, IPv6 included ("[::1]:9999")."""

from __future__ import annotations

import ipaddress


def split(addr: str) -> tuple[str, int]:
    """Split host:port; ValueError with the reason when it is not one."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{addr!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{addr!r}: write IPv6 addresses as [host]:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{addr!r}: port must be a number from 1 to 65535")
    return host, int(port)


def join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
