import random

import pytest
from test_group import Clock, FakePeer, Origin, Picker

from appliance.cache.group import Group
from appliance.cache.promoter import RandomPromoter, RatePromoter


def test_rate_decays_with_half_life():
    clock = Clock()
    p = RatePromoter(half_life=10.0, clock=clock)
    for _ in range(4):
        p.seen("k")
    assert p.rate("k") == pytest.approx(4.0)
    clock.now += 10.0
    assert p.rate("k") == pytest.approx(2.0)
    assert p.rate("never") == 0.0


def test_admits_only_keys_hotter_than_the_victim():
    clock = Clock()
    p = RatePromoter(clock=clock)
    p.seen("once")
    assert not p.admit("once", None)  # a one-off never displaces a hot copy ...
    assert p.admit("once", None, room=True)  # ... but takes free room
    assert not p.admit("never seen", None, room=True)
    for _ in range(5):
        p.seen("hot")
    for _ in range(3):
        p.seen("warm")
    assert p.admit("warm", None)
    assert not p.admit("warm", "hot")
    assert p.admit("hot", "warm")


def test_table_is_bounded_least_recent_dropped():
    p = RatePromoter(capacity=3, clock=Clock())
    for k in "abcd":
        p.seen(k)
    assert len(p) == 3 and p.rate("a") == 0.0 and p.rate("d") == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        RatePromoter(half_life=0)
    with pytest.raises(ValueError):
        RandomPromoter(1.5)


async def _skewed_hits(promoter, n_keys=1000, gets=20000, s=0.9, value=b"x" * 90):
    """Hit share of a non-owner's hot cache under Zipf(s) keys, and the
    share an oracle of the hottest keys that fit would give."""
    keys = [f"k{i}" for i in range(n_keys)]
    owner = Group("g", Origin({k: value for k in keys}), cache_bytes=10_000_000)
    clock = Clock()
    # Hot budget 1/10 of the data set.
    data_bytes = sum(len(k) + len(value) for k in keys)
    g = Group(
        "g",
        Origin(),
        cache_bytes=data_bytes,
        hot_fraction=0.1,
        picker=Picker(FakePeer(owner)),
        promoter=promoter(clock),
        clock=clock,
    )
    weights = [1 / (i + 1) ** s for i in range(n_keys)]
    rng = random.Random(7)
    seq = rng.choices(keys, weights, k=gets)
    for k in seq:
        clock.now += 0.001
        await g.get(k)
        assert g.hot.bytes <= g.hot.max_bytes
    fits = g.hot.max_bytes // (len(keys[0]) + len(value) + 2)
    oracle = sum(weights[:fits]) / sum(weights)
    return g.stats.hot_hits / gets, oracle


async def test_rate_promotion_near_oracle_and_beats_random_admission():
    rate, oracle = await _skewed_hits(lambda clock: RatePromoter(clock=clock))
    rand, _ = await _skewed_hits(lambda clock: RandomPromoter(0.1, random.Random(1).random))
    assert rate >= 0.8 * oracle
    assert rate > rand


async def test_group_promotes_by_rate_by_default():
    # Hot budget 1/8 of 1000 bytes: room for one entry of 100 bytes.
    value = b"v" * 97
    owner = Group("g", Origin({"a": value, "hot": value, "cold": value}), cache_bytes=10_000)
    g = Group("g", Origin(), cache_bytes=1000, picker=Picker(FakePeer(owner)))
    await g.get("a")
    assert "a" in g.hot  # the hot cache had room
    for _ in range(3):
        await g.get("hot")
    assert "hot" in g.hot and "a" not in g.hot  # asked for again and again: it displaces the one-off
    await g.get("cold")
    assert "hot" in g.hot and "cold" not in g.hot  # a one-off displaces nothing


def test_group_keeps_the_promoter_it_is_given_even_while_it_tracks_nothing():
    # An empty RatePromoter has len() 0: `promoter or default` threw it away.
    given = RatePromoter(half_life=3.0, capacity=8)
    assert len(given) == 0
    assert Group("g", Origin(), cache_bytes=1000, promoter=given).promoter is given


def test_an_owner_marks_its_keys_hot_by_read_rate_counting_one_in_every():
    from appliance.cache.promoter import OwnedHotKeys

    clock = Clock()
    owned = OwnedHotKeys(rate=32.0, every=8, half_life=1.0, clock=clock)
    for _ in range(400):  # 2 s: "hot" at 100 Gets/s, "warm" at 10
        clock.now += 0.005
        owned.hit("hot")
        if _ % 10 == 0:
            owned.hit("warm")
    assert "hot" in owned.hot and "warm" not in owned.hot
    # It cools: 10 Gets/s for 6 s and it is no longer hot.
    for _ in range(60):
        clock.now += 0.1
        owned.hit("hot")
    assert "hot" not in owned.hot
    with pytest.raises(ValueError):
        OwnedHotKeys(every=0)


async def test_a_group_marks_its_own_keys_hot_from_main_cache_hits():
    clock = Clock()
    g = Group("g", Origin({"hot": b"v", "cold": b"v"}), cache_bytes=1000, clock=clock)
    await g.get("cold")
    for _ in range(400):
        clock.now += 0.005
        await g.get("hot")
    assert "hot" in g.owned_hot.hot and "cold" not in g.owned_hot.hot
