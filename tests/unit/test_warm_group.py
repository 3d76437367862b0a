"""The pure side of warm membership changes: tombstones, the group's
handoff offers and peeks at previous owners (appliance.cache), and the
previous-ring bookkeeping of Peers (appliance.rules.peers). No I/O: peers
are in-memory groups, clocks are fake."""

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.cache.errors import PeerError
from appliance.cache.group import Group
from appliance.cache.promoter import RandomPromoter
from appliance.cache.ring import HashRing
from appliance.cache.store import Store
from appliance.cache.tombstones import Tombstones
from appliance.rules.peers import MAX_PEEKS, Peers
from support.fake_peers import FakeClient


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Origin:
    def __init__(self, data=None):
        self.data = dict(data or {})
        self.calls = []
        self.gate = None

    async def __call__(self, key):
        self.calls.append(key)
        if self.gate is not None:
            await self.gate.wait()
        return self.data[key]


class PeekPeer:
    """A previous owner: answers from its group's main cache; `gate` holds the answer."""

    def __init__(self, group, addr="10.0.0.2:1", fail=None, ttl=0.0):
        self.group, self.addr, self.fail, self.ttl = group, addr, fail, ttl
        self.peeks = 0
        self.gate = None
        self.answered = asyncio.Event()

    async def peek(self, group, key, timeout):
        self.peeks += 1
        if self.fail is not None:
            raise self.fail
        entry = self.group.main.get(key) if self.group is not None else None
        self.answered.set()
        if self.gate is not None:
            await self.gate.wait()
        return None if entry is None else (entry.data, self.ttl)


class Previous:
    def __init__(self, *peers):
        self.peers = list(peers)
        self.failed = []

    def peek_candidates(self, key):
        return list(self.peers)

    def peek_failed(self, addr):
        self.failed.append(addr)


def group(origin=None, **kw):
    kw.setdefault("cache_bytes", 10_000)
    kw.setdefault("tombstone_window", 10.0)
    return Group("g", origin or Origin(), **kw)


# Tombstones ---------------------------------------------------------------------


def test_tombstones_last_their_window_and_forget_after():
    clock = Clock()
    t = Tombstones(5.0, clock)
    t.add("a")
    clock.now += 3
    t.add("b")
    assert "a" in t and "b" in t and "c" not in t
    clock.now += 2.5
    assert "a" not in t and "b" in t and len(t) == 1
    t.add("b")  # seen again: the window starts over
    clock.now += 4
    assert "b" in t
    clock.now += 1.1
    assert "b" not in t and len(t) == 0


def test_tombstones_past_their_bound_refuse_everything_for_a_window():
    clock = Clock()
    t = Tombstones(5.0, clock, max_keys=3)
    for k in "abcd":
        t.add(k)
    assert len(t) == 0 and "zzz" in t  # forgotten, so every key counts as removed
    clock.now += 5
    assert "zzz" not in t


def test_no_window_no_tombstones():
    t = Tombstones(0.0)
    t.add("a")
    assert "a" not in t and len(t) == 0


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(0, 3)), max_size=40), st.floats(0.5, 5))
def test_property_a_key_is_dead_exactly_within_the_window_of_its_last_removal(ops, window):
    clock = Clock()
    t = Tombstones(window, clock)
    last = {}
    for key, dt in ops:
        clock.now += dt
        t.add(key)
        last[key] = clock.now
        for k in "abcdef":
            assert (k in t) == (k in last and clock.now - last[k] < window)


# Store ranking ------------------------------------------------------------------


@pytest.mark.parametrize("policy,expect", [("lru", ["b", "d", "c", "a"]), ("fifo", ["d", "c", "b", "a"])])
def test_ranked_puts_what_the_policy_keeps_longest_first(policy, expect):
    clock = Clock()
    s = Store(policy, 1000, clock)
    for k in "abcd":
        s.set(k, b"v")
    s.get("b")
    assert [k for k, _ in s.ranked()] == expect
    assert [k for k, _ in s.ranked()] == expect  # reading the rank changes nothing


def test_ranked_skips_expired_entries_and_keeps_counters():
    clock = Clock()
    s = Store("lfu", 1000, clock)
    s.set("old", b"v", expires=clock.now + 1)
    s.set("hot", b"v")
    for _ in range(3):
        s.get("hot")
    s.set("new", b"v")
    clock.now += 2
    assert [k for k, _ in s.ranked()] == ["hot", "new"]
    assert s.evictions == 0 and len(s) == 3


# Offers (handoff) ----------------------------------------------------------------


async def test_offer_keeps_a_value_with_its_ttl_and_drops_a_hot_copy():
    clock = Clock()
    g = group(clock=clock, ttl=0)
    g.hot.set("k", b"mirror")
    assert g.offer("k", b"v", 5.0)
    entry = g.main.get("k")
    assert entry.value == b"v" and entry.expires == clock.now + 5.0 and g.hot.get("k") is None
    assert g.offer("n", b"v", 0.0) and g.main.get("n").expires == 0  # no expiry carried: none
    s = g.stats
    assert (s.handoff_in_accepted, s.handoff_in_accepted_bytes) == (2, 4)


async def test_offer_never_outlives_the_group_ttl():
    clock = Clock()
    g = group(clock=clock, ttl=3)
    assert g.offer("k", b"v", 50.0) and g.main.get("k").expires == clock.now + 3
    assert g.offer("n", b"v", 0.0) and g.main.get("n").expires == clock.now + 3


async def test_offer_is_refused_after_a_remove_or_set_until_the_window_ends():
    clock = Clock()
    g = group(clock=clock, tombstone_window=10.0)
    g.remove("r")
    g.set("s", b"new")
    g.main.remove("s")  # evicted since
    assert not g.offer("r", b"old", 0) and not g.offer("s", b"old", 0)
    clock.now += 10
    assert g.offer("r", b"later", 0) and g.main.get("r").value == b"later"
    assert g.stats.handoff_in_refused == 2


async def test_offer_is_refused_when_the_key_is_held_or_loading():
    origin = Origin({"l": b"fresh"})
    origin.gate = asyncio.Event()
    g = group(origin)
    g.set("own", b"mine")
    g.remove("own")
    g._tombstones = Tombstones(0.0)  # only the other reasons count here
    g.set("own", b"mine")
    assert not g.offer("own", b"theirs", 0) and g.main.get("own").value == b"mine"
    load = asyncio.ensure_future(g.get("l"))
    for _ in range(100):  # until the origin is asked
        if origin.calls:
            break
        await asyncio.sleep(0)
    assert not g.offer("l", b"handed", 0)  # the origin load's value is at least as new
    origin.gate.set()
    assert (await load).value == b"fresh" and g.main.get("l").value == b"fresh"


async def test_an_offer_during_a_peek_is_kept_and_serves_if_the_peek_fails():
    """The stopping node hands the key over while a miss here peeks at it;
    then it exits and the peek fails: the handed-off entry answers."""
    stopping = PeekPeer(None, fail=None)
    gate = asyncio.Event()

    async def peek(group, key, timeout):
        await gate.wait()
        raise PeerError("it has stopped")

    stopping.peek = peek
    origin = Origin({"k": b"origin"})
    g = group(origin, previous=Previous(stopping))
    get = asyncio.ensure_future(g.get("k"))
    await asyncio.sleep(0)
    assert g.offer("k", b"handed", 0)
    gate.set()
    assert (await get).value == b"handed" and origin.calls == []


async def test_an_offer_during_a_fetch_from_the_owner_is_kept():
    """A Get here is fetching the key from its owner when the owner stops and
    hands the key here (its next owner): the entry is kept in the main cache.
    The fetch would keep at most a hot copy, and the stopping owner cannot be
    asked again once it exits: refusing the offer would lose the key."""
    gate, asked = asyncio.Event(), asyncio.Event()

    class StoppingOwner:
        addr = "10.0.0.3:1"

        async def get(self, group, key, timeout):
            asked.set()
            await gate.wait()
            return b"owner's", 0.0

    class Picker:
        def pick(self, key):
            return StoppingOwner()

    origin = Origin({"k": b"origin"})
    g = group(origin, picker=Picker(), promoter=RandomPromoter(0.1, rand=lambda: 0.0))  # would mirror it
    fetch = asyncio.ensure_future(g.get("k"))
    await asyncio.wait_for(asked.wait(), 5)
    assert g.offer("k", b"handed", 0)
    gate.set()
    assert (await fetch).value == b"owner's"
    assert g.main.get("k").value == b"handed" and "k" not in g.hot
    assert origin.calls == [] and g.stats.handoff_in_accepted == 1


async def test_handoff_entries_are_the_main_cache_most_recent_first():
    g = group()
    for k in "abc":
        g.set(k, b"v")
    g.hot.set("h", b"v")
    g.main.get("a")
    assert [k for k, _ in g.handoff_entries()] == ["a", "c", "b"]


# Peeks -----------------------------------------------------------------------------


async def test_a_miss_peeks_the_previous_owner_before_the_origin():
    clock = Clock()
    old = group(clock=clock)
    old.set("k", b"warm", ttl=8)
    origin = Origin({"k": b"origin", "x": b"x"})
    peer = PeekPeer(old, ttl=8.0)
    g = group(origin, clock=clock, previous=Previous(peer))
    entry = await g.get("k")
    assert entry.value == b"warm" and origin.calls == [] and entry.expires == clock.now + 8
    assert g.main.get("k").value == b"warm" and g.stats.peek_hits == 1
    assert (await g.get("x")).value == b"x"  # the previous owner has none: the origin
    assert origin.calls == ["x"] and g.stats.peek_misses == 1


async def test_the_next_previous_owner_is_asked_when_one_fails():
    old = group()
    old.set("k", b"warm")
    down = PeekPeer(None, addr="down:1", fail=PeerError("refused"))
    previous = Previous(down, PeekPeer(old, addr="up:1"))
    g = group(Origin({"k": b"origin"}), previous=previous)
    assert (await g.get("k")).value == b"warm"
    assert previous.failed == ["down:1"] and g.stats.peek_errors == 1 and g.stats.peek_hits == 1


async def test_no_peek_for_a_key_removed_lately():
    old = group()
    old.set("k", b"stale")
    peer = PeekPeer(old)
    origin = Origin({"k": b"new"})
    g = group(origin, previous=Previous(peer))
    g.remove("k")  # the fan-out reached us, not (yet) the previous owner
    assert (await g.get("k")).value == b"new" and peer.peeks == 0


@pytest.mark.parametrize("write", ["remove", "set"])
async def test_a_remove_or_set_during_a_peek_voids_the_peeked_value(write):
    old = group()
    old.set("k", b"stale")
    peer = PeekPeer(old)
    peer.gate = asyncio.Event()
    origin = Origin({"k": b"origin-new"})
    g = group(origin, previous=Previous(peer))
    get = asyncio.ensure_future(g.get("k"))
    await asyncio.wait_for(peer.answered.wait(), 2)
    if write == "remove":
        g.remove("k")
        want = b"origin-new"
    else:
        g.set("k", b"set-new")
        want = b"set-new"
    peer.gate.set()
    assert (await get).value == want
    assert g.main.get("k").value == want and g.stats.peek_refused == 1


async def test_peeks_share_the_load_flight():
    old = group()
    old.set("k", b"warm")
    peer = PeekPeer(old)
    peer.gate = asyncio.Event()
    g = group(Origin(), previous=Previous(peer))
    gets = [asyncio.ensure_future(g.get("k")) for _ in range(20)]
    await asyncio.wait_for(peer.answered.wait(), 2)
    peer.gate.set()
    assert {e.value for e in await asyncio.gather(*gets)} == {b"warm"} and peer.peeks == 1


# Peers: previous rings -----------------------------------------------------------------


def peers_at(addr, clock, **kw):
    p = Peers(FakeClient, clock=clock, **kw)
    p.self_addr = addr
    return p


def keys_moving(p, n=50):
    return [f"key-{i}" for i in range(n)]


async def test_a_first_ring_counts_as_joining_the_ring_without_us():
    clock = Clock()
    p = peers_at("c:1", clock, peek_window=10)
    p.set_peers(["a:1", "b:1", "c:1"], 1)
    mine = [k for k in keys_moving(p, 200) if p.owner(k) == "c:1"]
    assert mine
    before = HashRing(["a:1", "b:1"])
    for key in mine:
        # Its owner before we joined, then where that one's keys would go without it.
        assert [c.addr for c in p.peek_candidates(key)] == [
            before.owner(key),
            ({"a:1", "b:1"} - {before.owner(key)}).pop(),
        ]
    others = [k for k in keys_moving(p, 200) if p.owner(k) != "c:1"]
    assert all(p.peek_candidates(k) == [] for k in others)  # owner unchanged, or the owner itself
    clock.now += 10.1
    assert all(p.peek_candidates(k) == [] for k in mine)  # the window is over


async def test_candidates_come_from_earlier_rings_newest_first_and_skip_us():
    clock = Clock()
    p = peers_at("a:1", clock, peek_window=10)
    p.set_peers(["a:1", "b:1", "c:1"], 1)
    clock.now += 20  # the first ring's window is over
    p.set_peers(["a:1", "b:1"], 2)  # c left
    p.set_peers(["a:1", "b:1", "c:1"], 3)  # c is back
    for key in keys_moving(p, 300):
        got = [c.addr for c in p.peek_candidates(key)]
        assert "a:1" not in got and p.owner(key) not in got and len(got) <= MAX_PEEKS
        if p.owner(key) == "a:1" and got:
            assert got == ["b:1"]  # a had it in neither earlier ring; b held it while c was away


async def test_a_peer_that_left_is_asked_and_trusted_for_its_grace_only():
    clock = Clock()
    # A short grace: the fake clock ends it for members(), the loop's real
    # timer for the client, which is waited for (not slept on).
    p = peers_at("a:1", clock, peek_window=10, departed_grace=0.3)
    p.set_peers(["a:1", "b:1"], 1)
    clock.now += 20
    left = p.client("b:1")
    key = next(k for k in keys_moving(p, 100) if p.owner(k) == "b:1")
    p.set_peers(["a:1"], 2)
    assert p.members() == {"a:1", "b:1"}
    assert p.peek_candidates(key) == [left]  # out of the ring, maybe still handing off
    assert left.closed is None  # not before its grace
    clock.now += 0.31
    assert p.members() == {"a:1"} and p.peek_candidates(key) == []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while left.closed is None and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert left.closed == p.close_grace


async def test_a_failed_peek_at_a_departed_peer_backs_off():
    clock = Clock()
    p = peers_at("a:1", clock, peek_window=30, peek_backoff=1.0, departed_grace=10)
    p.set_peers(["a:1", "b:1", "c:1"], 1)
    clock.now += 31
    key = next(k for k in keys_moving(p, 200) if p.owner(k) == "b:1")
    p.set_peers(["a:1", "c:1"], 2)  # b left: maybe stopping, maybe dead
    [gone] = p.peek_candidates(key)
    assert gone.addr == "b:1"
    p.peek_failed("b:1")
    assert p.peek_candidates(key) == []
    clock.now += 1.1
    assert [c.addr for c in p.peek_candidates(key)] == ["b:1"]
    await p.close()
    # A peer in the ring holds its lease: a failed peek does not stop the next.
    p = peers_at("c:1", clock, peek_window=30, peek_backoff=1.0)
    p.set_peers(["a:1", "b:1", "c:1"], 4)
    moved = next(k for k in keys_moving(p, 300) if p.owner(k) == "c:1")
    alive = p.peek_candidates(moved)
    assert alive and all(c.addr in p.ring for c in alive)
    p.peek_failed(alive[0].addr)
    assert p.peek_candidates(moved) == alive
    await p.close()


async def test_ring_without_self_and_a_replaced_process_is_not_departed():
    clock = Clock()
    p = peers_at("a:1", clock, peek_window=10, departed_grace=5)
    p.set_peers(["a:1", "b:1"], 1, {"b:1": 1})
    assert list(p.ring_without_self().nodes) == ["b:1"]
    old = p.client("b:1")
    p.set_peers(["a:1", "b:1"], 2, {"b:1": 2})  # a new process at b
    await asyncio.sleep(0)
    assert old.closed == p.close_grace and p.members() == {"a:1", "b:1"}
    p.set_peers(["b:1"], 3)
    assert list(p.ring_without_self().nodes) == ["b:1"]
    await p.close()
