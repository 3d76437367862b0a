"""Human units for the config: byte sizes ("64MiB") and durations ("1h30m").

Pure functions, no I/O. `ByteSize` and `Duration` are pydantic field types
that accept the human forms (and plain numbers) and validate to `int` bytes
and `float` seconds.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer

__all__ = [
    "ByteSize",
    "Duration",
    "format_bytes",
    "format_duration",
    "parse_bytes",
    "parse_duration",
]

BYTES_EXPECTED = 'expected a size like "64MiB", "512KiB", "10MB" or a number of bytes'
DURATION_EXPECTED = 'expected a duration like "500ms", "30s", "1h30m" or a number of seconds'

# Unit -> multiplier. Keys are lower case; matching is case-insensitive.
# "k", "m", "g", "t" alone are binary (as in systemd and most config files):
# nobody means 64,000,000 bytes when writing "64M" for a cache size.
_BYTE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtpe", start=1):
    _BYTE_UNITS[_p] = 1024**_i
    _BYTE_UNITS[_p + "ib"] = 1024**_i
    _BYTE_UNITS[_p + "b"] = 1000**_i

_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)

_DURATION_UNITS: dict[str, Decimal] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),
    "μs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|μs|ms|s|m|h|d)", re.IGNORECASE)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_bytes(v: Any) -> int:
    """Return a size in bytes.

    Accepts a non-negative int (bytes), a whole-valued float, or a string such
    as "100", "100B", "512KiB", "64 MiB", "1GiB", "10MB" (SI, 1000-based),
    "1.5GiB" (as long as it comes to whole bytes). Units are case-insensitive;
    k/m/g/t alone are binary (1024-based).
    """
    if isinstance(v, bool):
        raise ValueError(f"{BYTES_EXPECTED}, got {_show(v)}")
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"{BYTES_EXPECTED}, got a negative number {v}")
        return v
    if isinstance(v, float):
        if not math.isfinite(v) or v < 0 or not v.is_integer():
            raise ValueError(f"{BYTES_EXPECTED}, got {_show(v)} (a size must be a whole, non-negative number of bytes)")
        return int(v)
    if isinstance(v, str):
        m = _BYTES_RE.match(v)
        if m is None:
            if v.strip().startswith("-"):
                raise ValueError(f"{BYTES_EXPECTED}, got {_show(v)} (a size cannot be negative)")
            raise ValueError(f"{BYTES_EXPECTED}, got {_show(v)}")
        number, unit = m.group(1), m.group(2).lower()
        mult = _BYTE_UNITS.get(unit)
        if mult is None:
            raise ValueError(
                f"{BYTES_EXPECTED}, got {_show(v)} (unknown unit {m.group(2)!r}; "
                "use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB)"
            )
        try:
            total = Decimal(number) * mult
        except InvalidOperation:  # pragma: no cover - the regex only admits decimals
            raise ValueError(f"{BYTES_EXPECTED}, got {_show(v)}") from None
        if total != total.to_integral_value():
            raise ValueError(f"{BYTES_EXPECTED}, got {_show(v)} (that is not a whole number of bytes)")
        return int(total)
    raise ValueError(f"{BYTES_EXPECTED}, got {_show(v)}")


def parse_duration(v: Any) -> float:
    """Return a duration in seconds.

    Accepts a non-negative number (seconds) or a string such as "0", "0s",
    "250us", "500ms", "1.5s", "30s", "2m", "1h", "1h30m", "1d". A bare number
    in a string is seconds.
    """
    if isinstance(v, bool):
        raise ValueError(f"{DURATION_EXPECTED}, got {_show(v)}")
    if isinstance(v, (int, float)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{DURATION_EXPECTED}, got {_show(v)} (a duration must be finite and not negative)")
        return float(v)
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("-"):
            raise ValueError(f"{DURATION_EXPECTED}, got {_show(v)} (a duration cannot be negative)")
        if re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)", s):
            return float(Decimal(s))
        pos, total, seen = 0, Decimal(0), False
        while pos < len(s):
            m = _DURATION_PART_RE.match(s, pos)
            if m is None:
                break
            total += Decimal(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
            seen = True
            pos = m.end()
            while pos < len(s) and s[pos] == " ":
                pos += 1
        if not seen or pos != len(s):
            raise ValueError(f"{DURATION_EXPECTED}, got {_show(v)} (units: ns, us, ms, s, m, h, d)")
        return float(total)
    raise ValueError(f"{DURATION_EXPECTED}, got {_show(v)}")


def format_bytes(n: int | float) -> str:
    """Human form with binary units: 64 MiB -> "64.0 MiB", 100 -> "100 B"."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{sign}{n:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_duration(seconds: float) -> str:
    """Short human form: 0 -> "0s", 0.5 -> "500ms", 90 -> "1m30s", 5400 -> "1h30m"."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        if ms >= 1:
            return f"{ms:g}ms"
        return f"{seconds * 1e6:g}us"
    if seconds < 60:
        return f"{seconds:g}s"
    whole = int(seconds)
    frac = seconds - whole
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    out = ""
    if h:
        out += f"{h}h"
    if m:
        out += f"{m}m"
    if s or frac:
        out += f"{s + frac:g}s"
    return out


# Field types. The serializer writes the plain number back (JSON, model_dump);
# the JSON schema's "format" tells the config's error messages what they are.
ByteSize = Annotated[
    int,
    BeforeValidator(parse_bytes),
    PlainSerializer(int, return_type=int),
    Field(json_schema_extra={"format": "byte-size"}),
]
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(float, return_type=float),
    Field(json_schema_extra={"format": "human-duration"}),
]
