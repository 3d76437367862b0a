"""appliance.units: sizes and durations for humans."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from appliance.units import (
    ByteSize,
    Duration,
    format_bytes,
    format_duration,
    parse_bytes,
    parse_duration,
)

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (100, 100),
        (4096.0, 4096),
        ("0", 0),
        ("100", 100),
        ("100B", 100),
        ("100 b", 100),
        ("512KiB", 512 * KiB),
        ("512kib", 512 * KiB),
        ("64MiB", 64 * MiB),
        ("64 MiB", 64 * MiB),
        (" 64mib ", 64 * MiB),
        ("1GiB", GiB),
        ("2TiB", 2 * TiB),
        ("64M", 64 * MiB),
        ("8k", 8 * KiB),
        ("1g", GiB),
        ("10MB", 10_000_000),
        ("10mb", 10_000_000),
        ("1KB", 1000),
        ("1GB", 1_000_000_000),
        ("1.5KiB", 1536),
        ("0.5GiB", GiB // 2),
    ],
)
def test_parse_bytes_ok(text, expected):
    assert parse_bytes(text) == expected
    assert isinstance(parse_bytes(text), int)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "64XiB",
        "MiB",
        "-1",
        "-64MiB",
        "1.5",
        "1.3B",
        "0.1KiB",
        "64 Mi B",
        "1e3",
        -1,
        1.5,
        float("nan"),
        float("inf"),
        True,
        None,
        [64],
        "64MiB!",
    ],
)
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match='expected a size like "64MiB"') as info:
        parse_bytes(bad)
    assert "number of bytes" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("0", 0.0),
        ("0s", 0.0),
        ("12", 12.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1H30M", 5400.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("100ns", 1e-7),
        ("1d", 86400.0),
        ("1m30s500ms", 90.5),
    ],
)
def test_parse_duration_ok(text, expected):
    assert parse_duration(text) == pytest.approx(expected)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    "bad", ["", "s", "abc", "-1s", "-5", "5 parsecs", "1h30", "1x", "ms500", -1, -0.5, float("inf"), True, None, [1]]
)
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError, match="expected a duration like") as info:
        parse_duration(bad)
    assert "number of seconds" in str(info.value)


def test_error_messages_show_the_input():
    with pytest.raises(ValueError, match="'64XB'"):
        parse_bytes("64XB")
    with pytest.raises(ValueError, match="negative"):
        parse_bytes("-5MiB")
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-5s")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (100, "100 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 * MiB, "64.0 MiB"),
        (GiB, "1.0 GiB"),
        (3 * TiB, "3.0 TiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("s", "text"),
    [(0, "0s"), (0.5, "500ms"), (0.00025, "250us"), (5, "5s"), (90, "1m30s"), (5400, "1h30m"), (3600, "1h")],
)
def test_format_duration(s, text):
    assert format_duration(s) == text
    assert parse_duration(text) == pytest.approx(s)


@given(st.integers(min_value=0, max_value=2**60))
def test_bytes_int_and_str_agree(n):
    assert parse_bytes(n) == n
    assert parse_bytes(str(n)) == n
    assert parse_bytes(f"{n}B") == n


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["KiB", "MiB", "GiB", "KB", "MB", "GB"]))
def test_bytes_units_multiply(n, unit):
    mult = {"KiB": KiB, "MiB": MiB, "GiB": GiB, "KB": 1000, "MB": 10**6, "GB": 10**9}[unit]
    assert parse_bytes(f"{n}{unit}") == n * mult
    assert parse_bytes(f"{n} {unit.lower()}") == n * mult


@given(st.integers(min_value=0, max_value=1000), st.integers(min_value=0, max_value=59), st.integers(0, 59))
def test_duration_combinations(h, m, s):
    assert parse_duration(f"{h}h{m}m{s}s") == h * 3600 + m * 60 + s


class _M(BaseModel):
    size: ByteSize = 0
    wait: Duration = 0.0


def test_pydantic_types():
    m = _M(size="64MiB", wait="1h30m")
    assert m.size == 64 * MiB and isinstance(m.size, int)
    assert m.wait == 5400.0 and isinstance(m.wait, float)
    assert _M(size=10, wait=2).model_dump() == {"size": 10, "wait": 2.0}


def test_pydantic_types_reject():
    with pytest.raises(ValidationError) as info:
        _M(size="lots", wait="soon")
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [("size",), ("wait",)]
    assert 'expected a size like "64MiB"' in errors[0]["msg"]
    assert "expected a duration like" in errors[1]["msg"]
