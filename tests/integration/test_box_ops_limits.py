"""The controller's cluster-wide operations, against a real etcd: whoever
can write etcd cannot make a controller start a thread per stats-request
key it writes. Requests past a small backlog are dropped (their askers time
out); a request made once the burst is over is answered as ever."""

from __future__ import annotations

import threading
import time

from appliance.cluster import box_ops
from appliance.config import Settings
from support.appliance import wait_for


def test_a_burst_of_stats_requests_costs_a_bounded_number_of_threads(etcd_server, tmp_path):
    settings = Settings(
        cluster={"etcd": [etcd_server.endpoint], "embedded_etcd": False},
        node={"workers": 2, "runtime_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state")},
    )
    stop = threading.Event()
    ops = box_ops.BoxOps(settings, etcd_server.client, stop_event=stop)
    ops.start()
    writer = etcd_server.client()
    try:
        root = box_ops.prefix(settings.cluster.service)
        wait_for(lambda: any(t.name == "box-ops" for t in threading.enumerate()), 5, what="box ops")
        before = threading.active_count()
        peak = before
        for i in range(300):
            writer.put(f"{root}stats-request/burst-{i}", "{}")
            peak = max(peak, threading.active_count())
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and ops.stats_dropped == 0:
            peak = max(peak, threading.active_count())
            time.sleep(0.01)
        print(f"\n[stats-request burst] 300 keys: threads {before} -> peak {peak}; dropped {ops.stats_dropped}")
        assert peak - before <= 4  # grpc's and etcd's own, not one per request
        assert ops.stats_dropped > 0
        # After the burst, a real request (as `appliance stats` makes it) is answered.
        wait_for(lambda: ops._stats_requests.empty(), 60, what="the backlog to drain")
        answers = box_ops.gather_stats(writer, settings.cluster.service, {settings.node.host}, timeout=10)
        assert set(answers) == {settings.node.host}
        assert sorted(answers[settings.node.host]["workers"]) == sorted(settings.node.address(i) for i in range(2))
    finally:
        stop.set()
        ops.join(5)
        writer.close()
