"""Origin down, failing or slow: clear statuses within the client's deadline,
nothing wrong cached, recovery without help.

Two in-process nodes (real gRPC on loopback) load from a real HTTP origin
on 127.0.0.1 (tests/support/origin_server.py) built with the product's
`build_origin`. Every case asks both the key's owner and the other node
(which forwards to the owner).

Reproduce the figures: .venv/bin/python -m pytest -s -q tests/reliability/test_origin_faults.py
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from appliance.config import Settings
from appliance.origins import build_origin
from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from appliance.protocol.status import reason_of
from appliance.rules.auth import bearer
from support.nodes import cluster, open_peer_streams
from support.origin_server import SwitchableOrigin, http_value

pytestmark = pytest.mark.integration

ORIGIN_TIMEOUT = 1.0  # the group's `timeout`
TOKEN = "r" * 8 + "0123456789abcdef01234567"  # the cluster's: it has the read scope, so it is told causes
READER = bearer(TOKEN)
MARGIN = 0.5  # allowed beyond the client's deadline (scheduling on a busy box)


async def call(
    addr: str, key: str, deadline: float, metadata=READER
) -> tuple[float, bytes | None, grpc.aio.AioRpcError | None]:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = groupcache_pb2_grpc.GroupCacheStub(channel)
        await channel.channel_ready()  # connecting is not part of the measure
        t0 = time.monotonic()
        try:
            reply = await stub.Get(groupcache_pb2.GetRequest(group="web", key=key), timeout=deadline, metadata=metadata)
            return time.monotonic() - t0, reply.value, None
        except grpc.aio.AioRpcError as err:
            return time.monotonic() - t0, None, err


@pytest.fixture
async def setup(tmp_path):
    origin = await SwitchableOrigin().start()
    spec = Settings(
        groups={"web": {"origin": origin.url, "timeout": f"{ORIGIN_TIMEOUT}s", "cache_bytes": "1MiB"}},
        cluster={"embedded_etcd": False},
    ).groups["web"]
    loader = build_origin("web", spec, state_dir=tmp_path, max_value_bytes=1 << 20)
    try:
        async with cluster(2, loader.load, groups=("web",), peer_timeout="2s", token=TOKEN) as nodes:
            yield origin, nodes
    finally:
        await loader.close()
        await origin.close()


def owner_and_other(nodes, key):
    owner = next(n for n in nodes if n.addr == nodes[0].peers.owner(key))
    other = next(n for n in nodes if n is not owner)
    return owner, other


def cached_anywhere(nodes, key) -> bool:
    return any(n.groups["web"].peek(key) is not None for n in nodes)


async def test_origin_down_failing_or_slow_gives_clear_status_within_deadline(setup):
    """Figures held: origin answering 500, or down, gives UNAVAILABLE with the
    cause (ErrorInfo reason ORIGIN_ERROR) well within the client's deadline;
    an origin slower than the group timeout gives UNAVAILABLE ("timed out")
    once the group timeout has passed; an origin slower than the client's deadline gives
    DEADLINE_EXCEEDED no later than deadline + 0.5 s. Through the owner and
    through the other node alike; nothing is cached meanwhile."""
    origin, nodes = setup
    figures = []

    async def case(name, key, deadline, code, detail=None, key_per_role=False):
        for role in ("owner", "other"):
            # key_per_role: a load the owner's call left running must not
            # answer the other's call (it may end within that call's deadline).
            k = f"{key}-{role}" if key_per_role else key
            via = owner_and_other(nodes, k)[role == "other"]
            elapsed, value, err = await call(via.addr, k, deadline)
            figures.append(
                f"{name}/{role}: {err.code().name if err else 'OK'} in {elapsed:.3f}s (deadline {deadline}s)"
            )
            assert err is not None, f"{name}: got {value!r}"
            assert err.code() == code, (name, role, err.code(), err.details())
            assert elapsed <= deadline + MARGIN, (name, role, elapsed)
            assert err.details()
            if detail is not None:
                assert detail in err.details(), (name, role, err.details())
                assert reason_of(err.trailing_metadata()) == "ORIGIN_ERROR"
            assert not cached_anywhere(nodes, k), (name, role)

    origin.mode = "error"
    await case("http 500", "e1", 3.0, grpc.StatusCode.UNAVAILABLE, "HTTP 500")
    await case("http 500", "e2", 3.0, grpc.StatusCode.UNAVAILABLE, "database on fire")
    # A caller without a read credential is told the kind, not the origin's words.
    for via in owner_and_other(nodes, "e3"):
        _, _, err = await call(via.addr, "e3", 3.0, metadata=())
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
        assert reason_of(err.trailing_metadata()) == "ORIGIN_ERROR"
        assert "fire" not in err.details() and "HTTP" not in err.details(), err.details()
    origin.mode = "slow"
    await case("slower than group timeout", "s1", 3.0, grpc.StatusCode.UNAVAILABLE, "timed out")
    await case("slower than deadline", "s2", 0.5, grpc.StatusCode.DEADLINE_EXCEEDED, key_per_role=True)
    await origin.down()
    await case("down", "d1", 3.0, grpc.StatusCode.UNAVAILABLE, "cannot reach origin")
    print("\n[origin faults] " + "; ".join(figures))


async def test_service_recovers_by_itself_and_caches_nothing_wrong(setup):
    """Figures held: after failures of every kind, once the origin is
    healthy again every key is served with the origin's value on the first
    try after the slow loads' group timeout (1 s); nothing failed was cached
    (the origin is asked again), and no task is left behind."""
    origin, nodes = setup
    keys = [f"r{i}" for i in range(12)]
    await open_peer_streams(nodes, "web")  # per-peer tasks, not leaks
    baseline = len(asyncio.all_tasks())
    for mode in ("error", "slow"):
        origin.mode = mode
        results = await asyncio.gather(*(call(nodes[i % 2].addr, k, 0.3) for i, k in enumerate(keys)))
        assert all(err is not None for _, _, err in results)
        assert not any(cached_anywhere(nodes, k) for k in keys)
    await origin.down()
    results = await asyncio.gather(*(call(nodes[i % 2].addr, k, 2.0) for i, k in enumerate(keys)))
    assert all(err is not None and err.code() == grpc.StatusCode.UNAVAILABLE for _, _, err in results)
    # The origin comes back (same port, healthy).
    await origin.start()
    origin.mode = "ok"
    healthy_hits = len(origin.hits)
    t0 = time.monotonic()
    first_ok = None
    for _attempt in range(100):  # bounded: loads in flight end within the group timeout
        results = await asyncio.gather(*(call(nodes[i % 2].addr, k, 3.0) for i, k in enumerate(keys)))
        if all(err is None for _, _, err in results):
            first_ok = time.monotonic() - t0
            break
        await asyncio.sleep(0.05)
    assert first_ok is not None, [e.details() for _, _, e in results if e]
    assert [v for _, v, _ in results] == [http_value(k) for k in keys]
    fresh = [k for m, k in origin.hits[healthy_hits:] if m == "ok"]
    assert set(fresh) == set(keys)  # every key was loaded anew: no failure was cached
    # Now cached, right, and served without the origin.
    await origin.down()
    results = await asyncio.gather(*(call(n.addr, k, 3.0) for n in nodes for k in keys))
    assert [v for _, v, _ in results] == [http_value(k) for n in nodes for k in keys]
    deadline = time.monotonic() + 5
    while len(asyncio.all_tasks()) > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    leftover = len(asyncio.all_tasks()) - baseline
    print(
        f"\n[origin recovery] all {len(keys)} keys right {first_ok:.2f}s after the origin returned; "
        f"{len(fresh)} fresh origin loads; tasks left over: {leftover}"
    )
    assert first_ok <= ORIGIN_TIMEOUT + 1.0
    assert leftover <= 0
