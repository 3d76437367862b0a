"""Limits of a real worker process: oversized messages are refused before
they are buffered, and a group filled far past `cache_bytes` stays within
its budget.

A real `appliance run` with 2 workers; memory is read from /proc of the
worker processes.

Reproduce the figures: .venv/bin/python -m pytest -s -q tests/reliability/test_worker_limits.py
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest

from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from support.appliance import Appliance
from support.faults import hwm_kib, rss_kib

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parent.parent
BUDGET = 4 * 1024 * 1024
VALUE = 16 * 1024
FILL = 8 * BUDGET  # bytes of distinct values asked for
GROUPS = f"""
[groups.big]
origin = "python:support.origin_values:sized"
cache_bytes = {BUDGET}
max_concurrent_loads = 8
"""
MiB = 1024 * 1024


def sized(key: str) -> bytes:  # the origin's truth (support/origin_values.py)
    size = int(key.split("-", 1)[0])
    block = hashlib.sha256(key.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _appliance(tmp_path_factory, server: str) -> Appliance:
    root = tmp_path_factory.mktemp(f"limits-{server}")
    return Appliance(root, workers=2, groups=GROUPS, env={"PYTHONPATH": str(TESTS)}, server=server)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = _appliance(tmp_path_factory, "auto")
    try:
        yield app.start()
    finally:
        app.cleanup()


@pytest.fixture(scope="module")
def grpcio_app(tmp_path_factory):
    app = _appliance(tmp_path_factory, "grpcio")
    try:
        yield app.start()
    finally:
        app.cleanup()


@pytest.fixture(params=["engine", "grpcio"])
def app_each_backend(request):
    if request.param == "engine":
        from appliance.fronts import engine_available

        missing = engine_available()
        if missing:
            pytest.skip(f"the engine is not built here: {missing}")
    # `auto` (the module's `app`) serves the engine where it is built.
    app = request.getfixturevalue({"engine": "app", "grpcio": "grpcio_app"}[request.param])
    assert app.admin_stats(0)["server"] == request.param
    return app


def worker_pid(app: Appliance, index: int) -> int:
    return app.process_info()[f"worker-{index}"]["pid"]


def test_oversized_request_is_refused_and_does_not_accumulate(app_each_backend):
    """Figures held: a 50 MiB GetRequest (sent as raw bytes) is refused with
    RESOURCE_EXHAUSTED and after three of them the worker serves on.

    grpcio refuses it at the gRPC length prefix: one such request raises the
    worker's peak RSS (VmHWM) by less than 20 MiB (the flow-control window),
    i.e. the message is never buffered whole. The engine refuses it at the
    prefix too, before reading the body."""
    app = app_each_backend
    backend = app.admin_stats(0)["server"]
    addr = app.addresses()[0]
    pid = worker_pid(app, 0)
    size = 50 * MiB
    body = b"\x0a\x03big\x12" + varint(size) + b"k" * size
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    codes = []
    with grpc.insecure_channel(addr, options=options) as channel:
        raw = channel.unary_unary("/groupcachepb.GroupCache/Get")
        stub = groupcache_pb2_grpc.GroupCacheStub(channel)
        stub.Get(groupcache_pb2.GetRequest(group="big", key="100-warm"), timeout=10)
        hwm0, rss0 = hwm_kib(pid), rss_kib(pid)
        peaks = []
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                raw(body, timeout=30)
            codes.append((info.value.code(), info.value.details()))
            peaks.append(hwm_kib(pid))
        rss1 = rss_kib(pid)
        after = stub.Get(groupcache_pb2.GetRequest(group="big", key="100-after"), timeout=10).value
    growth = [(p - hwm0) / 1024 for p in peaks]
    print(
        f"\n[oversized, {backend}] 3 x 50 MiB requests: {codes[0][0].name} ({codes[0][1]}); worker VmHWM "
        f"{hwm0 / 1024:.1f} MiB, +{growth[0]:.1f} MiB after the first, +{growth[-1]:.1f} MiB after the third; "
        f"RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB"
    )
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in codes), codes
    assert after == sized("100-after")
    if backend == "engine":
        # Refused at the length prefix: the body is never read, and a peak
        # rises by less than the 4 MiB.
        assert growth[0] < 4
        assert growth[-1] < 4
        # ... and counted, though Python never saw them.
        counted = [line for line in app.metrics_text(0).splitlines() if line.startswith("groupcache_socket_refusals")]
        assert 'groupcache_socket_refusals_total{limit="request_bytes"} 3.0' in counted, counted
    else:
        # One request raises the peak by about the flow-control window, not by 50 MiB.
        assert growth[0] < 20
        assert growth[-1] < 40  # 150 MiB were sent in all


def test_filling_far_past_the_budget_stays_within_it(app):
    """Figures held: asking for 8x `cache_bytes` (4 MiB) of distinct 16 KiB
    values through one worker leaves main + hot bytes <= cache_bytes on every
    worker, with evictions; every value read is right. Reported: worker RSS
    before and after, against the budget."""
    addrs = app.addresses()
    pids = [worker_pid(app, i) for i in range(2)]
    rss_before = [rss_kib(p) for p in pids]
    keys = [f"{VALUE}-fill-{i}" for i in range(FILL // VALUE)]
    wrong = 0
    with grpc.insecure_channel(addrs[0]) as channel:
        stub = groupcache_pb2_grpc.GroupCacheStub(channel)
        for start in range(0, len(keys), 64):  # 64 calls in flight at a time
            batch = keys[start : start + 64]
            futures = [stub.Get.future(groupcache_pb2.GetRequest(group="big", key=k), timeout=30) for k in batch]
            wrong += sum(f.result().value != sized(k) for k, f in zip(batch, futures, strict=True))
    stats = [app.admin_stats(i)["groups"]["big"] for i in range(2)]
    rss_after = [rss_kib(p) for p in pids]
    lines = []
    for i, s in enumerate(stats):
        used = s["main_bytes"] + s["hot_bytes"]
        lines.append(
            f"worker-{i}: main {s['main_bytes'] / MiB:.2f} MiB ({s['main_items']} items, "
            f"{s['main_evictions']} evictions) + hot {s['hot_bytes'] / MiB:.2f} MiB ({s['hot_items']} items) "
            f"= {used / MiB:.2f} MiB of {BUDGET / MiB:.0f} MiB;"
            f" RSS {rss_before[i] / 1024:.1f} -> {rss_after[i] / 1024:.1f} MiB"
        )
    print(
        f"\n[memory bound] asked {len(keys)} x {VALUE // 1024} KiB = {FILL / MiB:.0f} MiB through worker-0; "
        + "; ".join(lines)
    )
    assert wrong == 0
    for s in stats:
        assert s["main_bytes"] + s["hot_bytes"] <= s["cache_bytes"] == BUDGET
        assert s["main_evictions"] > 0
    assert sum(s["main_items"] for s in stats) < len(keys)
    # Loose: memory does not grow with what was asked, only with what is kept.
    assert all((after - before) * 1024 < FILL for before, after in zip(rss_before, rss_after, strict=True))


def test_fuzz_burst_against_a_worker_process(app):
    """Figures held: 1000 random and malformed requests to a real worker
    process get only documented statuses; the process is the same one
    afterwards (no crash, no restart) and serves right values."""
    import collections
    import random

    from support import fuzz

    documented = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
    addr = app.addresses()[1]
    pid = worker_pid(app, 1)
    rng = random.Random(99)
    codes: collections.Counter = collections.Counter()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(addr, options=options) as channel:
        raw = channel.unary_unary(fuzz.GET)
        for _ in range(1000 // 50):
            futures = [
                raw.future(fuzz.body(rng, ["big", "nope"])[1], timeout=10, metadata=fuzz.metadata(rng))
                for _ in range(50)
            ]
            for f in futures:
                try:
                    f.result()
                    codes["OK"] += 1
                except grpc.RpcError as err:
                    codes[err.code().name] += 1
        stub = groupcache_pb2_grpc.GroupCacheStub(channel)
        value = stub.Get(groupcache_pb2.GetRequest(group="big", key="64-after-fuzz"), timeout=10).value
    print(
        f"\n[fuzz worker process] {sum(codes.values())} requests -> {dict(codes)}; "
        f"same pid afterwards: {worker_pid(app, 1) == pid}"
    )
    assert set(codes) <= documented, codes
    assert worker_pid(app, 1) == pid and app.process_info()["worker-1"]["statename"] == "RUNNING"
    assert value == sized("64-after-fuzz")


def test_a_getmany_naming_one_key_many_times_is_refused_before_its_reply_is_built(app_each_backend):
    """Figures held: a GetMany of one cached 16 KiB key 10,000 times (a
    160 MiB reply, past the 64 MiB message limit) costs no credentials and
    one call, yet it is refused with RESOURCE_EXHAUSTED (TOO_LARGE) before
    the reply is joined: the worker's peak RSS rises by less than 8 MiB,
    and the refusal is counted (groupcache_limit_refusals_total)."""
    from appliance.cache.ring import HashRing
    from appliance.pb import cache_pb2, cache_pb2_grpc

    app = app_each_backend
    backend = app.admin_stats(0)["server"]
    addr = app.addresses()[0]
    ring = HashRing(sorted(app.addresses()))
    key = next(k for k in (f"{VALUE}-dup-{i}" for i in range(100)) if ring.owner(k) == addr)
    pid = worker_pid(app, 0)
    options = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(addr, options=options) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        warm = stub.GetMany(cache_pb2.GetManyRequest(group="big", keys=[key]), timeout=10)
        assert [r.value for r in warm.results] == [sized(key)]
        hwm0 = hwm_kib(pid)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetMany(cache_pb2.GetManyRequest(group="big", keys=[key] * 10_000), timeout=30)
        grown = (hwm_kib(pid) - hwm0) / 1024
        again = stub.GetMany(cache_pb2.GetManyRequest(group="big", keys=[key] * 100), timeout=10)
    refusals = [line for line in app.metrics_text(0).splitlines() if line.startswith("groupcache_limit_refusals_total")]
    print(
        f"\n[GetMany 10,000 x one key, {backend}] {info.value.code().name} ({info.value.details()[:80]}); "
        f"worker VmHWM +{grown:.1f} MiB; {refusals}"
    )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "reply would be" in info.value.details()
    assert grown < 8
    assert [r.value for r in again.results] == [sized(key)] * 100  # a reply within the limit is served
    assert any('limit="reply_bytes"' in line and not line.endswith(" 0.0") for line in refusals), refusals
