"""Ops surfaces of a real `appliance run`: /metrics from the controller, the
HTTP read API and reflection on worker processes, logs, health during a
stop-node drain, and TLS/mTLS between worker processes and the CLI."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from appliance import tls as tlsmod
from appliance.cache.ring import HashRing
from appliance.client import Client
from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from support.appliance import Appliance, wait_for
from support.ports import free_port, free_range

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SCORES = (
    "[groups.scores]\n"
    'origin = "sqlite:///{state_dir}/scores.db"\n'
    'query = "SELECT score FROM students WHERE name = :key"\n'
    "demo_seed = true\n"
)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(parsed, name, **labels) -> float:
    return parsed[(name, frozenset(labels.items()))]


def http_get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops-appliance")
    files = root / "files"
    files.mkdir()
    (files / "hot").write_bytes(b"hot value")
    (files / "other").write_bytes(b"o" * 1000)
    (files / "huge").write_bytes(b"h" * (4 * 1024 * 1024 + 1))  # over max_value_bytes: an origin error
    metrics_port, http_base = free_port(), free_range(3)
    groups = (
        SCORES
        + f'\n[groups.counted]\norigin = "file://{files}"\n'
        + f'\n[groups.failing]\norigin = "file://{files}"\n'
        + f'\n[ops]\nmetrics_addr = "127.0.0.1:{metrics_port}"\nhttp_base_port = {http_base}\nslow_load = "1s"\n'
    )
    a = Appliance(root, groups=groups, drain="5s")
    a.metrics_port, a.http_base = metrics_port, http_base
    try:
        yield a.start()
    finally:
        a.cleanup()


def test_metrics_after_a_known_workload_are_exact(app):
    addrs = app.addresses()
    owner = HashRing(addrs, 50, "seed").owner("hot")
    with grpc.insecure_channel(owner) as ch:
        stub = groupcache_pb2_grpc.GroupCacheStub(ch)
        for _ in range(100):
            assert stub.Get(groupcache_pb2.GetRequest(group="counted", key="hot"), timeout=5).value == b"hot value"
    m = wait_for(lambda: scrape(app.metrics_port), 10, what="metrics endpoint")
    w = {"worker": owner, "group": "counted"}
    assert metric(m, "groupcache_gets_total", **w) == 100
    assert metric(m, "groupcache_loads_total", **w) == 1
    assert (
        metric(m, "groupcache_hits_total", cache="main", **w) + metric(m, "groupcache_hits_total", cache="hot", **w)
        == 99
    )
    assert metric(m, "groupcache_hits_total", cache="main", **w) == 99
    assert metric(m, "groupcache_loads_deduped_total", **w) == 1
    assert metric(m, "groupcache_origin_loads_total", result="ok", **w) == 1
    assert metric(m, "groupcache_origin_load_seconds_count", result="ok", **w) == 1
    assert metric(m, "groupcache_peer_loads_total", **w) == 0 and metric(m, "groupcache_peer_errors_total", **w) == 0
    assert metric(m, "groupcache_cache_items", cache="main", **w) == 1
    assert metric(m, "groupcache_cache_bytes", cache="main", **w) == len("hot") + len("hot value")
    for a in addrs:
        assert metric(m, "groupcache_worker_up", worker=a) == 1
        assert metric(m, "groupcache_ring_peers", worker=a) == 3
        assert metric(m, "groupcache_ring_member", worker=a) == 1
        if a != owner:
            assert metric(m, "groupcache_gets_total", worker=a, group="counted") == 0
    revisions = {metric(m, "groupcache_ring_revision", worker=a) for a in addrs}
    assert revisions == {metric(m, "groupcache_controller_ring_revision")}
    assert metric(m, "groupcache_controller_ring_peers") == 3
    assert metric(m, "groupcache_controller_etcd_up") == 1


def test_http_read_api_on_each_worker(app):
    for i, _addr in enumerate(app.addresses()):
        base = f"http://127.0.0.1:{app.http_base + i}"
        status, headers, body = http_get(base + "/groups/scores/keys/%E5%BC%A0%E4%B8%89")  # 张三
        assert (status, body) == (200, b"100") and headers["Content-Length"] == "3"
        status, headers, body = http_get(base + "/groups/counted/keys/other")
        assert (status, body) == (200, b"o" * 1000) and headers["Content-Length"] == "1000"
        status, headers, body = http_get(base + "/groups/scores/keys/nobody")
        assert status == 404 and b"not found" in body and headers["Content-Type"].startswith("text/plain")
        assert int(headers["Content-Length"]) == len(body)
        status, _, body = http_get(base + "/groups/nogroup/keys/x")
        assert status == 404 and b"group 'nogroup' not found" in body
        status, _, body = http_get(base + "/groups/counted/keys/huge")
        # An anonymous caller is told the kind, not the cause (the log has it).
        assert status == 503 and b"the origin failed; the worker's log has the cause" in body
        assert b"larger than" not in body
        assert http_get(base + "/healthz")[:3:2] == (200, b"SERVING\n")


def test_reflection_lists_groupcache_on_a_worker(app):
    with grpc.insecure_channel(app.addresses()[0]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = [s.name for r in responses for s in r.list_services_response.service]
    assert "groupcachepb.GroupCache" in names
    assert not any(n.startswith("appliance.admin") for n in names)


def test_logs_are_one_line_per_event_and_none_per_request(app):
    text = app.log.read_text(errors="replace")
    assert "logger=appliance.cluster.registry" in text and "registered groupcache/" in text
    ring = [line for line in text.splitlines() if 'msg="ring changed"' in line]
    assert ring and all("revision=" in line and "peers=" in line for line in ring)
    assert 'msg="metrics endpoint serving"' in text
    before = app.log.stat().st_size
    with grpc.insecure_channel(app.addresses()[1]) as ch:
        stub = groupcache_pb2_grpc.GroupCacheStub(ch)
        for i in range(200):
            stub.Get(groupcache_pb2.GetRequest(group="scores", key="张三"), timeout=5)
            with pytest.raises(grpc.RpcError):
                stub.Get(groupcache_pb2.GetRequest(group="scores", key=f"nobody-{i}"), timeout=5)
        # An origin error is one WARNING line with the group and the cause.
        with pytest.raises(grpc.RpcError) as info:
            stub.Get(groupcache_pb2.GetRequest(group="failing", key="huge"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    def new_lines():
        with open(app.log, "rb") as f:
            f.seek(before)
            return f.read().decode(errors="replace").splitlines()

    wait_for(lambda: any("origin load failed" in line for line in new_lines()), 10, what="origin error logged")
    lines = new_lines()  # the origin error was the last request sent
    warnings = [line for line in lines if "origin load failed" in line]
    assert len(warnings) == 1
    assert "level=WARNING" in warnings[0] and "group=failing" in warnings[0] and "larger than" in warnings[0]
    assert [line for line in lines if "nobody" in line or "张三" in line] == []
    # 401 requests went by: a line per request would be hundreds. Other
    # events (a slow etcd on a busy box) may add a few lines.
    assert len(lines) < 40, lines


def test_health_serving_then_not_serving_during_stop_node(app):
    victim, other = app.addresses()[2], app.addresses()[0]
    seen: list = []
    with grpc.insecure_channel(victim) as ch, grpc.insecure_channel(other) as other_ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="groupcachepb.GroupCache"), timeout=5).status == SERVING
        )
        watch = health.Watch(health_pb2.HealthCheckRequest(service="groupcachepb.GroupCache"), timeout=60)

        def follow():
            try:
                for response in watch:
                    seen.append(response.status)
                    if response.status == NOT_SERVING:
                        watch.cancel()  # seen; do not hold the stop's grace period
            except grpc.RpcError:
                pass

        follower = threading.Thread(target=follow)
        follower.start()
        wait_for(lambda: seen, 10, what="first Watch answer")
        assert seen == [SERVING]
        out = app.cli("stop-node", victim)
        assert out.returncode == 0, out.stderr
        follower.join(30)
        assert seen == [SERVING, NOT_SERVING]
        # The other workers keep serving; the stopped one is gone.
        assert health_pb2_grpc.HealthStub(other_ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    # A planned stop removes the worker's admin socket: it leaves the box's metrics
    # (a crashed or hung worker, whose socket stays, shows groupcache_worker_up 0).
    # A scrape may share a round of asking the workers up to a second old.
    def without_victim():
        got = scrape(app.metrics_port)
        return got if ("groupcache_worker_up", frozenset({("worker", victim)})) not in got else None

    m = wait_for(without_victim, 5, what="the stopped worker gone from the box's metrics")
    assert metric(m, "groupcache_worker_up", worker=other) == 1


def test_controller_etcd_up_follows_etcd(app):
    """groupcache_controller_etcd_up (the "etcd unreachable" alert's input):
    1 while etcd answers, 0 while supervisord holds it stopped, 1 again after."""

    def etcd_up():
        return metric(scrape(app.metrics_port), "groupcache_controller_etcd_up")

    wait_for(lambda: etcd_up() == 1, 10, what="etcd_up 1")
    registered = sorted(app.registered())
    sup = app.supervisor()
    sup.stopProcess("etcd", True)
    try:
        wait_for(lambda: etcd_up() == 0, 15, what="etcd_up 0 while etcd is stopped")
        # The workers go on serving and answering scrapes meanwhile.
        m = scrape(app.metrics_port)
        assert metric(m, "groupcache_worker_up", worker=app.addresses()[0]) == 1
    finally:
        sup.startProcess("etcd", True)
    wait_for(lambda: etcd_up() == 1, 30, what="etcd_up 1 after etcd is back")
    # Leave the module's appliance as it was: every worker registered again.
    wait_for(lambda: sorted(app.registered()) == registered, 30, what="workers registered again")


def test_mtls_appliance_peers_cli_and_clients(tmp_path, pki):
    metrics_port = free_port()
    extra = (
        f'\n[ops]\nmetrics_addr = "127.0.0.1:{metrics_port}"\n'
        f'\n[tls]\ncert = "{pki.cert}"\nkey = "{pki.key}"\nca = "{pki.ca}"\nclient_auth = true\n'
    )
    a = Appliance(tmp_path, workers=2, groups=SCORES + extra)
    try:
        a.start()
        # The CLI takes the certificate from the config.
        out = a.cli("get", "scores", "张三")
        assert (out.returncode, out.stdout) == (0, b"100"), out.stderr
        # An application with a CA-signed client certificate, through every node.
        creds = tlsmod.credentials_from_files(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        keys = {"张三": b"100", "李四": b"1000", "王五": b"10000", "赵六": b"100000"}
        for addr in a.addresses():
            with Client([addr], credentials=creds) as c:
                for k, v in keys.items():
                    assert c.get("scores", k) == v
            with grpc.secure_channel(addr, creds) as ch:
                stub = groupcache_pb2_grpc.GroupCacheStub(ch)
                for k, v in keys.items():
                    assert stub.Get(groupcache_pb2.GetRequest(group="scores", key=k), timeout=5).value == v
        # Peers reached each other over mTLS: values came from owners, no local fallbacks.
        m = scrape(metrics_port)
        assert sum(metric(m, "groupcache_peer_loads_total", worker=w, group="scores") for w in a.addresses()) > 0
        assert all(metric(m, "groupcache_peer_errors_total", worker=w, group="scores") == 0 for w in a.addresses())
        # Without a client certificate, or in clear text: refused.
        for bad in (tlsmod.credentials_from_files(ca=pki.ca), None):
            ch = grpc.secure_channel(a.addresses()[0], bad) if bad else grpc.insecure_channel(a.addresses()[0])
            with ch:
                with pytest.raises(grpc.RpcError) as info:
                    groupcache_pb2_grpc.GroupCacheStub(ch).Get(
                        groupcache_pb2.GetRequest(group="scores", key="张三"), timeout=3
                    )
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        a.cleanup()
