"""Membership changes of a real appliance keep the cache warm: a SIGHUP
rolling restart, a scale-out and `appliance stop-node` cost the origin
(almost) nothing, and every read stays right.

A real `appliance run` (supervisord, embedded etcd, 3 workers, controller)
per server backend, with a python: origin that appends one line per load to
a file, so loads are counted exactly across worker restarts. Reads are
GetMany calls spread over every worker and checked against the origin's
truth (support.origin_values.sized).

Reproduce the figures: .venv/bin/python -m pytest -s -q tests/integration/test_warm_appliance.py
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest

from appliance.pb import cache_pb2, cache_pb2_grpc
from support.appliance import Appliance, wait_for
from support.origin_values import sized

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parent.parent
KEYS = [f"200-k{i}" for i in range(600)]
GROUPS = """
[groups.warm]
origin = "python:support.origin_values:counted"
"""


class Reads:
    """GetMany through every worker of a ring; every value checked."""

    def __init__(self, app: Appliance) -> None:
        self.app = app

    def all(self, addrs: list[str]) -> tuple[int, int]:
        """(failed, wrong) over one read of every key."""
        failed = wrong = 0
        chunks = [KEYS[i : i + 100] for i in range(0, len(KEYS), 100)]
        for i, chunk in enumerate(chunks):
            addr = addrs[i % len(addrs)]
            with grpc.insecure_channel(addr) as ch:
                try:
                    reply = cache_pb2_grpc.CacheStub(ch).GetMany(
                        cache_pb2.GetManyRequest(group="warm", keys=chunk), timeout=10
                    )
                except grpc.RpcError:
                    failed += len(chunk)
                    continue
            # Every key asked must come back, once: a result that went
            # missing is a failed read, not one left out of the count.
            got = {r.key: r for r in reply.results}
            wrong += len(reply.results) - len(got)  # a key answered twice
            for key in chunk:
                r = got.get(key)
                if r is None or r.code:
                    failed += 1
                elif r.value != sized(key):
                    wrong += 1
        return failed, wrong


def loads(app: Appliance) -> int:
    path = app.root / "loads.log"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def pids(app: Appliance) -> dict[str, int]:
    return {n: p["pid"] for n, p in app.process_info().items() if n.startswith("worker-") and p["pid"]}


@pytest.fixture(params=["engine", "grpcio"])
def app(request, tmp_path):
    if request.param == "engine":
        from appliance.fronts import engine_available

        if engine_available():
            pytest.skip(f"the engine is not built here: {engine_available()}")
    app = Appliance(
        tmp_path,
        workers=3,
        groups=GROUPS,
        env={"PYTHONPATH": str(TESTS), "APPLIANCE_TEST_LOADS": str(tmp_path / "loads.log")},
        server=request.param,
    )
    try:
        yield app.start()
    finally:
        app.cleanup()


def test_reload_scale_out_and_stop_node_keep_the_cache_warm(app):
    reads = Reads(app)
    assert reads.all(app.addresses()) == (0, 0)
    assert loads(app) == len(KEYS)
    figures = {}

    # SIGHUP after a group setting change: each worker restarted in turn.
    before, start = pids(app), loads(app)
    app.groups += 'cache_bytes = "32MiB"\n'
    app.write_config()
    app.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: all(p != before[n] for n, p in pids(app).items()) and len(pids(app)) == 3,
        90,
        what="every worker restarted",
    )
    app.wait_ring(3, timeout=30)
    assert reads.all(app.addresses()) == (0, 0)
    figures["rolling restart"] = loads(app) - start

    # Scale-out 3 -> 4.
    start = loads(app)
    app.write_config(workers=4)
    app.proc.send_signal(signal.SIGHUP)
    app.wait_ring(4, timeout=30)
    assert reads.all(app.addresses()) == (0, 0)
    figures["scale-out"] = loads(app) - start

    # Planned stop of one worker.
    start = loads(app)
    victim = app.addresses()[3]
    out = app.cli("stop-node", victim)
    assert out.returncode == 0, out.stderr
    app.wait_ring(3, timeout=10)
    assert reads.all(app.addresses(3)) == (0, 0)
    figures["stop-node"] = loads(app) - start
    print(
        f"\n[warm appliance, {app.admin_stats(0)['server']}] origin loads per change, {len(KEYS)} warm keys:", figures
    )
    assert all(n <= 0.01 * len(KEYS) for n in figures.values()), figures
    log = app.log.read_text(errors="replace")
    assert log.count("handoff") >= 4 and "accepted=" in log
