"""`appliance run` for real: supervisord, embedded etcd, workers, controller."""

import json
import os
import signal
import threading
import time

import grpc
import pytest

from appliance.cluster import etcd
from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from support.appliance import Appliance, pids_mentioning, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def appliance(tmp_path):
    app = Appliance(tmp_path)
    try:
        yield app.start()
    finally:
        app.cleanup()


def test_workers_register_json_under_leases_and_share_one_ring(appliance):
    reg = appliance.registered()
    assert sorted(reg) == [f"groupcache/{a}" for a in appliance.addresses()]
    leases = {r["lease"] for r in reg.values()}
    assert len(leases) == 3 and 0 not in leases  # one lease per worker
    for key, r in reg.items():
        assert r["value"]["Addr"] == key.split("/", 1)[1]
        # Metadata is a string (a JSON object inside): Go clients hash it.
        assert isinstance(r["value"]["Metadata"], str)
        addr, meta = etcd.parse_member(key, json.dumps(r["value"]))
        assert addr == r["value"]["Addr"] and meta["admin"].startswith("unix:")
    rings = appliance.rings()
    assert len(set(rings)) == 1
    # The demo group answers through any node, value from the seed's rows.
    out = appliance.cli("get", "scores", "张三")
    assert (out.returncode, out.stdout) == (0, b"100")
    out = appliance.cli("get", "scores", "nobody")
    assert out.returncode == 1 and b"not found" in out.stderr and b"Traceback" not in out.stderr
    out = appliance.cli("locate", "张三", "李四")
    lines = out.stdout.decode().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["张三", "李四"]
    assert all(line.split("\t")[1] in appliance.addresses() for line in lines)
    # Set and Remove through the CLI, seen by every node.
    out = appliance.cli("set", "scores", "张三", "-", input=b"101")
    assert out.returncode == 0 and b"3 peer(s) confirmed" in out.stdout, out.stderr
    assert appliance.cli("get", "scores", "张三").stdout == b"101"
    out = appliance.cli("remove", "scores", "张三")
    assert out.returncode == 0 and b"3 peer(s) confirmed" in out.stdout
    assert appliance.cli("get", "scores", "张三").stdout == b"100"
    stats = json.loads(appliance.cli("stats", "--json").stdout)
    assert sorted(stats) == appliance.addresses()
    assert sum(w["groups"]["scores"]["gets"] for w in stats.values()) >= 4


def test_registration_comes_back_after_its_lease_is_revoked(appliance):
    reg = appliance.registered()
    key = f"groupcache/{appliance.addresses()[0]}"
    client = appliance.etcd()
    try:
        client.revoke_lease(reg[key]["lease"])
    finally:
        client.close()
    wait_for(
        lambda: appliance.registered().get(key, {}).get("lease") not in (None, reg[key]["lease"]),
        appliance.lease_ttl + 2,
        what="re-registration under a new lease",
    )
    appliance.wait_ring(3, timeout=appliance.lease_ttl + 1)


def test_python_client_retries_on_a_ring_change(appliance):
    from appliance.client import Client
    from appliance.config import load_settings

    settings = load_settings(appliance.config)
    # Not following etcd: the ring would lose the stopped node before the
    # first call, and this is about the retry after a failure.
    with Client.from_settings(settings, timeout=5, follow=False) as client:
        names = ["张三", "李四", "王五", "赵六", "孙七"]
        assert client.get("scores", "张三") == b"100"
        victim = client.locate(names[0])
        out = appliance.cli("stop-node", victim)
        assert out.returncode == 0, out.stderr
        # The client's ring still names the stopped node: it must refresh and retry.
        assert victim in client.peers()
        assert client.get("scores", names[0]) == b"100"
        assert victim not in client.peers()


def test_kill_9_worker_restarts_registers_and_gets_the_ring(appliance):
    before = appliance.process_info()["worker-1"]["pid"]
    os.kill(before, signal.SIGKILL)
    wait_for(
        lambda: (
            appliance.process_info()["worker-1"]["pid"] not in (0, before)
            and appliance.process_info()["worker-1"]["statename"] == "RUNNING"
        ),
        30,
        what="worker-1 restart",
    )
    after = appliance.process_info()["worker-1"]["pid"]
    assert after != before
    appliance.wait_ring(3, timeout=appliance.lease_ttl + 10)
    assert f"groupcache/{appliance.addresses()[1]}" in appliance.registered()
    stats = appliance.admin_stats(1)
    assert sorted(stats["peers"]) == appliance.addresses()


def test_etcd_killed_and_restarted_workers_register_again(appliance):
    info = appliance.process_info()["etcd"]
    os.kill(info["pid"], signal.SIGKILL)
    # supervisord restarts etcd; measure from the moment it answers again.
    wait_for(lambda: appliance.registered() is not None, 30, what="etcd back")
    back = time.monotonic()
    want = sorted(f"groupcache/{a}" for a in appliance.addresses())
    wait_for(lambda: sorted(appliance.registered()) == want, appliance.lease_ttl + 2, what="all workers registered")
    assert time.monotonic() - back <= appliance.lease_ttl + 2
    appliance.wait_ring(3, timeout=appliance.lease_ttl + 2)


def test_stop_node_under_load_fails_no_request(appliance):
    addrs = appliance.addresses()
    victim, others = addrs[2], addrs[:2]
    keys = ["张三", "李四", "王五", "赵六", "孙七"] + [f"missing-{i}" for i in range(20)]
    failures, done = [], [0]
    stop = threading.Event()

    def load(addr):
        with grpc.insecure_channel(addr) as ch:
            stub = groupcache_pb2_grpc.GroupCacheStub(ch)
            deadline = time.monotonic() + 60  # bounded in time and count
            n = 0
            while not stop.is_set() and time.monotonic() < deadline and n < 200_000:
                key = keys[n % len(keys)]
                n += 1
                try:
                    stub.Get(groupcache_pb2.GetRequest(group="scores", key=key), timeout=5)
                    done[0] += 1
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.NOT_FOUND and key.startswith("missing"):
                        done[0] += 1
                    else:
                        failures.append((addr, key, err.code(), err.details()))

    threads = [threading.Thread(target=load, args=(a,)) for a in others for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: done[0] > 200, 30, what="load running")
        out = appliance.cli("stop-node", victim)
        assert out.returncode == 0, out.stderr
        appliance.wait_ring(2, members=others, timeout=appliance.lease_ttl + 1)
        served = done[0]
        wait_for(lambda: done[0] > served + 200, 30, what="load after the stop")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert appliance.process_info()["worker-2"]["statename"] == "STOPPED"
    assert f"groupcache/{victim}" not in appliance.registered()


def test_reload_changes_worker_count_and_sigterm_leaves_nothing(tmp_path):
    app = Appliance(tmp_path)
    try:
        app.start()
        pids = {n: p["pid"] for n, p in app.process_info().items() if n.startswith("worker-")}
        app.write_config(workers=4)
        app.proc.send_signal(signal.SIGHUP)
        app.wait_ring(4, timeout=30)
        info = app.process_info()
        assert {n: info[n]["pid"] for n in pids} == pids  # untouched
        app.write_config(workers=2)
        app.proc.send_signal(signal.SIGHUP)
        app.wait_ring(2, timeout=30)
        wait_for(lambda: "worker-2" not in app.process_info(), 30, what="worker-2 removed")
        info = app.process_info()
        assert {n: info[n]["pid"] for n in ("worker-0", "worker-1")} == {n: pids[n] for n in ("worker-0", "worker-1")}
        assert sorted(app.registered()) == [f"groupcache/{a}" for a in app.addresses(2)]
        # Any other change (here a group's budget) restarts the kept workers
        # one at a time, each back in the ring before the next goes.
        app.groups += 'cache_bytes = "32MiB"\n'
        app.write_config(workers=2)
        before = {n: info[n]["pid"] for n in ("worker-0", "worker-1")}
        app.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: all(app.admin_stats(i)["groups"]["scores"]["cache_bytes"] == 32 * 2**20 for i in range(2)),
            60,
            what="new cache_bytes on both workers",
        )
        info = app.process_info()
        assert all(info[n]["pid"] != before[n] for n in before)
        app.wait_ring(2, timeout=10)
        # A broken config on reload keeps the running one.
        app.config.write_text(app.config.read_text() + "\n[node2]\n")
        app.proc.send_signal(signal.SIGHUP)
        time.sleep(0)  # nothing to wait for: the old config stays in force
        app.wait_ring(2, timeout=10)
        assert app.sigterm(timeout=60) == 0
        wait_for(lambda: not pids_mentioning(str(tmp_path)), 10, what="every process gone")
    finally:
        assert app.cleanup() == []
