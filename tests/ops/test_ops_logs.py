"""Structured logs: logfmt lines, one per event; origin errors and slow loads."""

from __future__ import annotations

import asyncio
import logging

import pytest

from appliance.cache.errors import KeyNotFound, OriginError
from appliance.logs import LogfmtFormatter, event, quote
from appliance.node.metrics import LogThrottle, NodeMetrics, instrument_loader


def test_logfmt_line_quotes_and_never_spans_lines():
    record = logging.LogRecord("appliance.x", logging.WARNING, __file__, 1, "origin load failed", (), None)
    record.fields = {"group": "scores", "key": 'a b"c\nd', "n": 3}
    line = LogfmtFormatter("worker-0").format(record)
    assert "\n" not in line
    assert line.startswith("time=") and " level=WARNING role=worker-0 logger=appliance.x " in line
    assert line.endswith('msg="origin load failed" group=scores key="a b\\"c\\nd" n=3')
    try:
        raise ValueError("two\nlines")
    except ValueError:
        import sys

        record = logging.LogRecord("appliance.x", logging.ERROR, __file__, 1, "bug", (), sys.exc_info())
    line = LogfmtFormatter("worker-0").format(record)
    assert "\n" not in line and "Traceback" in line and "ValueError: two\\nlines" in line
    assert quote("") == '""' and quote("127.0.0.1:9999") == "127.0.0.1:9999"


def test_throttle_counts_what_it_left_out():
    now = [0.0]
    t = LogThrottle(10, clock=lambda: now[0])
    assert t.allow("g", "error") == 0
    assert t.allow("g", "error") is None and t.allow("g", "error") is None
    assert t.allow("h", "error") == 0 and t.allow("g", "slow") == 0  # per group and kind
    now[0] = 10.5
    assert t.allow("g", "error") == 2


async def test_loader_wrapper_logs_origin_errors_and_slow_loads(caplog):
    async def origin(key):
        if key == "down":
            raise OriginError("connection refused\nby db")
        if key == "missing":
            raise KeyNotFound(key)
        if key == "slow":
            await asyncio.sleep(0.06)
        return b"v"

    metrics = NodeMetrics()
    load = instrument_loader("scores", origin, metrics, slow_load=0.05)
    with caplog.at_level(logging.INFO, logger="appliance"):
        assert await load("fast") == b"v"
        with pytest.raises(KeyNotFound):
            await load("missing")
        assert caplog.records == []  # a hit, a fast load and a missing key say nothing
        for _ in range(5):
            with pytest.raises(OriginError):
                await load("down")
        assert await load("slow") == b"v"
    errors = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(errors) == 1  # throttled: one line per group and 10 s
    assert errors[0].getMessage() == "origin load failed"
    assert errors[0].fields["group"] == "scores" and "connection refused" in errors[0].fields["cause"]
    slow = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(slow) == 1 and slow[0].getMessage() == "slow origin load" and slow[0].fields["group"] == "scores"
    assert float(slow[0].fields["seconds"]) >= 0.05
    text = metrics.exposition()
    assert 'groupcache_origin_load_seconds_count{group="scores",result="ok"} 2.0' in text
    assert 'groupcache_origin_load_seconds_count{group="scores",result="error"} 5.0' in text
    assert 'groupcache_origin_load_seconds_count{group="scores",result="not_found"} 1.0' in text


def test_event_skips_disabled_levels(caplog):
    log = logging.getLogger("appliance.test")
    with caplog.at_level(logging.WARNING, logger="appliance"):
        event(log, logging.INFO, "quiet", a=1)
        event(log, logging.WARNING, "loud", a=1)
    assert [r.getMessage() for r in caplog.records] == ["loud"]
