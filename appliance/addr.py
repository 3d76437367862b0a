"""host:port strings, IPv6 included ("[::1]:9999")."""

from __future__ import annotations

import ipaddress
import re

EXPECTED = 'expected "host:port" like "127.0.0.1:2379" (IPv6 as "[::1]:2379")'
HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def split(addr: str) -> tuple[str, int]:
    """ "127.0.0.1:2379" -> ("127.0.0.1", 2379); "[::1]:2379" -> ("::1", 2379).

    ValueError with what was expected and why this is not it."""
    if not isinstance(addr, str):
        raise ValueError(f"{EXPECTED}, got {addr!r}")
    text = addr.strip()
    if "://" in text:
        raise ValueError(f"{EXPECTED} without a scheme, got {addr!r}")
    m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", text)
    if m:
        host, port_s = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{EXPECTED}, got {addr!r} ({host!r} is not an IPv6 address)") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host or not port_s.isdigit() or len(port_s) > 5:
            raise ValueError(f"{EXPECTED}, got {addr!r}")
        if ":" in host:
            raise ValueError(f"{EXPECTED}, got {addr!r} (put an IPv6 address in brackets)")
        if not HOSTNAME.match(host):
            raise ValueError(f"{EXPECTED}, got {addr!r} ({host!r} is not a host name or address)")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ValueError(f"{EXPECTED}, got {addr!r} (the port must be from 1 to 65535)")
    return host, port


def join(host: str, port: int | str) -> str:
    """("::1", 9999) -> "[::1]:9999"; ("127.0.0.1", 9999) -> "127.0.0.1:9999"."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
