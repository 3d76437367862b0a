import asyncio

import pytest

from appliance.cache.errors import KeyNotFound, OriginError, PeerError
from appliance.cache.group import Group
from appliance.cache.promoter import RandomPromoter


class Origin:
    def __init__(self, data=None, delay=0.0):
        self.data = dict(data or {})
        self.calls = []
        self.delay = delay
        self.gate = None
        self.fail = None

    async def __call__(self, key):
        self.calls.append(key)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        if key not in self.data:
            raise KeyNotFound(key)
        return self.data[key]


class FakePeer:
    """The owner, in memory: a Group of its own behind the Peer interface."""

    def __init__(self, owner_group, fail=None, ttl=0.0):
        self.addr = "10.0.0.2:1"
        self.owner = owner_group
        self.fail = fail
        self.ttl = ttl
        self.calls = 0

    async def get(self, group, key, timeout):
        self.calls += 1
        if self.fail:
            raise self.fail
        entry = await self.owner.get(key, forwarded=True)
        return entry.value, self.ttl


class Picker:
    def __init__(self, peer=None):
        self.peer = peer

    def pick(self, key):
        return self.peer


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


async def test_miss_loads_once_then_hits():
    origin = Origin({"k": b"v"})
    g = Group("g", origin, cache_bytes=1000)
    for _ in range(100):
        assert (await g.get("k")).value == b"v"
    assert origin.calls == ["k"]
    s = g.stats
    assert (s.gets, s.loads, s.main_hits, s.loads_deduped, s.local_loads) == (100, 1, 99, 1, 1)


async def test_concurrent_misses_share_one_origin_load():
    origin = Origin({"k": b"v"})
    origin.gate = asyncio.Event()
    g = Group("g", origin, cache_bytes=1000)
    tasks = [asyncio.create_task(g.get("k")) for _ in range(50)]
    await asyncio.sleep(0.01)
    origin.gate.set()
    assert {e.value for e in await asyncio.gather(*tasks)} == {b"v"}
    assert origin.calls == ["k"]
    assert g.stats.loads == 50 and g.stats.loads_deduped == 1


async def test_not_found_and_origin_errors_are_not_cached():
    origin = Origin({})
    g = Group("g", origin, cache_bytes=1000)
    with pytest.raises(KeyNotFound):
        await g.get("k")
    origin.fail = OriginError("db down")
    with pytest.raises(OriginError):
        await g.get("k")
    origin.fail = None
    origin.data["k"] = b"now"
    assert (await g.get("k")).value == b"now"
    assert len(origin.calls) == 3
    assert g.stats.not_found == 1 and g.stats.local_load_errs == 1 and g.stats.local_loads == 1


async def test_remote_owner_serves_and_hot_cache_mirrors_when_lucky():
    owner = Group("g", Origin({"k": b"v"}), cache_bytes=1000)
    peer = FakePeer(owner)
    always = Group("g", Origin(), cache_bytes=1000, picker=Picker(peer), promoter=RandomPromoter(1.0))
    never = Group("g", Origin(), cache_bytes=1000, picker=Picker(peer), promoter=RandomPromoter(0.0))
    for g in (always, never):
        for _ in range(3):
            assert (await g.get("k")).value == b"v"
    assert always.stats.peer_loads == 1 and always.stats.hot_hits == 2 and len(always.hot) == 1
    assert never.stats.peer_loads == 3 and len(never.hot) == 0 and len(never.main) == 0
    assert owner.stats.server_requests == 4 and owner.stats.local_loads == 1


async def test_peer_failure_loads_locally_without_caching_as_owner():
    origin = Origin({"k": b"v"})
    peer = FakePeer(None, fail=PeerError("connection refused"))
    g = Group("g", origin, cache_bytes=1000, picker=Picker(peer), promoter=RandomPromoter(1.0))
    assert (await g.get("k")).value == b"v"
    assert (await g.get("k")).value == b"v"
    assert g.stats.peer_errors == 2 and len(g.main) == 0 and len(g.hot) == 0
    assert origin.calls == ["k", "k"]


async def test_owner_not_found_is_authoritative():
    owner = Group("g", Origin({}), cache_bytes=1000)
    local = Origin({"k": b"stale-local"})
    g = Group("g", local, cache_bytes=1000, picker=Picker(FakePeer(owner)))
    with pytest.raises(KeyNotFound):
        await g.get("k")
    assert local.calls == []


async def test_forwarded_request_is_served_locally_even_if_ring_says_otherwise():
    origin = Origin({"k": b"v"})
    peer = FakePeer(None, fail=AssertionError("must not forward a forwarded request"))
    g = Group("g", origin, cache_bytes=1000, picker=Picker(peer))
    assert (await g.get("k", forwarded=True)).value == b"v"
    assert peer.calls == 0 and len(g.main) == 1


async def test_rings_that_disagree_do_not_deadlock():
    # a thinks b owns k, b thinks a owns k, both get a client request at once.
    oa, ob = Origin({"k": b"v"}), Origin({"k": b"v"})
    oa.gate = asyncio.Event()
    ob.gate = asyncio.Event()
    a = Group("g", oa, cache_bytes=1000)
    b = Group("g", ob, cache_bytes=1000)
    a.picker = Picker(FakePeer(b))
    b.picker = Picker(FakePeer(a))
    ta, tb = asyncio.create_task(a.get("k")), asyncio.create_task(b.get("k"))
    await asyncio.sleep(0.01)
    oa.gate.set()
    ob.gate.set()
    done = await asyncio.wait_for(asyncio.gather(ta, tb), 2)
    assert [e.value for e in done] == [b"v", b"v"]


async def test_hot_cache_share_is_bounded():
    owner = Group("g", Origin({f"r{i}": b"x" * 90 for i in range(100)}), cache_bytes=100_000)
    g = Group(
        "g",
        Origin({f"l{i}": b"x" * 90 for i in range(100)}),
        cache_bytes=1000,
        hot_fraction=0.25,
        promoter=RandomPromoter(1.0),
    )
    remote = Picker(FakePeer(owner))
    for i in range(100):
        g.picker = None
        await g.get(f"l{i}")
        g.picker = remote
        await g.get(f"r{i}")
        assert g.main.bytes + g.hot.bytes <= 1000
        assert g.hot.bytes <= 250
    assert g.hot.bytes > 0 and g.main.bytes > 0
    assert g.main.evictions + g.hot.evictions > 0


async def test_ttl_expiry_and_hot_copy_never_outlives_owner():
    clock = Clock()
    owner = Group("g", Origin({"k": b"v"}), cache_bytes=1000, ttl=10, clock=clock)
    peer = FakePeer(owner, ttl=2.0)  # the owner's entry has 2 s left
    g = Group("g", Origin(), cache_bytes=1000, ttl=60, picker=Picker(peer), promoter=RandomPromoter(1.0), clock=clock)
    await g.get("k")
    assert g.hot.get("k").expires == clock.now + 2.0
    clock.now += 2.5
    assert g.peek("k") is None
    clock.now += 10
    assert owner.peek("k") is None


async def test_remove_during_inflight_load_does_not_resurrect_old_value():
    origin = Origin({"k": b"old"})
    origin.gate = asyncio.Event()
    g = Group("g", origin, cache_bytes=1000)
    inflight = asyncio.create_task(g.get("k"))
    await asyncio.sleep(0.01)
    assert g.remove("k") is False
    origin.data["k"] = b"new"
    origin.gate.set()
    assert (await inflight).value in (b"old", b"new")  # started before Remove
    assert g.peek("k") is None  # but it did not fill the cache
    assert (await g.get("k")).value == b"new"


async def test_set_writes_through_and_fences_inflight_load():
    origin = Origin({"k": b"origin"})
    origin.gate = asyncio.Event()
    g = Group("g", origin, cache_bytes=1000)
    inflight = asyncio.create_task(g.get("k"))
    await asyncio.sleep(0.01)
    g.set("k", b"pushed")
    origin.gate.set()
    await inflight
    assert g.peek("k").value == b"pushed"
