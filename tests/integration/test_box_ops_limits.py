"""The controller's cluster-wide operations (cluster/box_ops.py) against a
real etcd: whoever can write etcd but lacks the cluster token cannot stop a
worker or read the counters, and cannot make the controller start a thread
per request key it writes."""

from __future__ import annotations

import json
import threading
import time

import pytest

from appliance.cluster import box_ops
from appliance.config import Settings
from support.appliance import wait_for

TOKEN = "k" * 8 + "0123456789abcdef01234567"


@pytest.fixture
def ops(etcd_server, tmp_path):
    settings = Settings(
        cluster={"etcd": [etcd_server.endpoint], "embedded_etcd": False},
        node={"workers": 2, "runtime_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state")},
    )
    stop = threading.Event()
    ops = box_ops.BoxOps(settings, etcd_server.client, stop_event=stop, token=TOKEN)
    ops.start()
    writer = etcd_server.client()
    try:
        wait_for(lambda: any(t.name == "box-ops" for t in threading.enumerate()), 5, what="box ops")
        yield ops, settings, writer
    finally:
        stop.set()
        ops.join(5)
        writer.close()


def test_a_burst_of_stats_requests_costs_a_bounded_number_of_threads(ops):
    ops, settings, writer = ops
    root = box_ops.prefix(settings.cluster.service)
    before = threading.active_count()
    peak = before
    for i in range(300):
        writer.put(f"{root}stats-request/burst-{i}", box_ops.signed(TOKEN, "stats-request", f"burst-{i}"))
        peak = max(peak, threading.active_count())
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and ops.stats_dropped == 0:
        peak = max(peak, threading.active_count())
        time.sleep(0.01)
    print(f"\n[stats-request burst] 300 keys: threads {before} -> peak {peak}; dropped {ops.stats_dropped}")
    assert peak - before <= 4  # grpc's and etcd's own, not one per request
    assert ops.stats_dropped > 0
    assert ops.refusals()["stats_backlog"] == ops.stats_dropped  # groupcache_box_refusals_total
    # After the burst, a real request (as `appliance stats` makes it) is answered.
    wait_for(lambda: ops._stats_requests.empty(), 60, what="the backlog to drain")
    answers = box_ops.gather_stats(writer, settings.cluster.service, {settings.node.host}, token=TOKEN, timeout=10)
    assert set(answers) == {settings.node.host}
    assert sorted(answers[settings.node.host]["workers"]) == sorted(settings.node.address(i) for i in range(2))


def test_requests_not_signed_with_the_cluster_token_are_ignored(ops):
    ops, settings, writer = ops
    service, root = settings.cluster.service, box_ops.prefix(settings.cluster.service)
    # Stats: unsigned, or signed with another token, get no answer; the control (signed) does.
    assert box_ops.gather_stats(writer, service, {settings.node.host}, token="x" * 32, timeout=1.5) == {}
    writer.put(f"{root}stats-request/unsigned", "{}")
    answers = box_ops.gather_stats(writer, service, {settings.node.host}, token=TOKEN, timeout=10)
    assert set(answers) == {settings.node.host}
    # Drain: an unsigned request, a forged one and a stale one are never taken (no box claims them) ...
    addr = settings.node.address(0)
    key = box_ops.drain_key(service, addr)
    stale_at = time.time() - 2 * box_ops.REQUEST_WINDOW
    stale = json.dumps({"state": "requested", "at": stale_at, "mac": box_ops.sign(TOKEN, "drain", addr, stale_at)})

    def taken(value: str) -> bool:
        """Whether the box claims a request written as `value` within a second."""
        writer.put(key, value)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            current, _ = writer.get(key)
            if b'"requested"' not in current:
                return True
            time.sleep(0.05)
        return False

    assert not taken('{"state": "requested"}')
    assert not taken(box_ops.signed("y" * 32, "drain", addr, state="requested"))
    assert not taken(stale)
    with pytest.raises(box_ops.Unclaimed):
        box_ops.request_drain(writer, service, addr, token="z" * 32, timeout=5, claim_within=1.0)
    # ... a signed one is (here it fails: no supervisord runs in this test, which says so).
    doc = box_ops.request_drain(writer, service, addr, token=TOKEN, timeout=10, claim_within=5)
    assert doc["state"] == "failed" and doc["box"] == settings.node.host
    assert ops.refused >= 6
    assert ops.refusals()["unsigned_requests"] == ops.refused  # groupcache_box_refusals_total
