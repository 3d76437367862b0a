import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.cache.store import POLICIES, Store, entry_size


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("policy", list(POLICIES))
def test_budget_counts_key_and_value_bytes(policy):
    s = Store(policy, 100)
    for i in range(50):
        s.set(f"k{i:02d}", b"x" * 17)  # 3 + 17 = 20 bytes each
    assert s.bytes <= 100
    assert len(s) == 5
    assert s.evictions == 45
    assert s.bytes == sum(entry_size(f"k{i:02d}", b"x" * 17) for i in range(45, 50))


def test_lru_keeps_recently_read():
    s = Store("lru", 60)
    for k in "abc":
        s.set(k, b"x" * 19)
    s.get("a")
    s.set("d", b"x" * 19)
    assert "a" in s and "b" not in s


def test_fifo_ignores_reads():
    s = Store("fifo", 60)
    for k in "abc":
        s.set(k, b"x" * 19)
    s.get("a")
    s.set("d", b"x" * 19)
    assert "a" not in s and "b" in s


def test_lfu_keeps_frequent():
    s = Store("lfu", 60)
    for k in "abc":
        s.set(k, b"x" * 19)
    for _ in range(3):
        s.get("a")
        s.get("c")
    s.set("d", b"x" * 19)
    assert "a" in s and "c" in s and "b" not in s


def test_oversized_value_is_not_stored_and_drops_old_copy():
    s = Store("lru", 10)
    s.set("k", b"123")
    assert not s.set("k", b"x" * 100)
    assert s.get("k") is None and s.bytes == 0


def test_multibyte_keys_count_utf8_bytes():
    s = Store("lru", 1000)
    s.set("张三", b"100")
    assert s.bytes == len("张三".encode()) + 3 == 9


def test_expiry_hides_and_reclaims_without_scan():
    clock = Clock()
    s = Store("lru", 10_000, clock)
    s.set("short", b"v", clock.now + 1)
    s.set("long", b"v", clock.now + 100)
    s.set("never", b"v")
    assert s.get("short") is not None
    clock.now += 2
    assert s.get("short") is None
    assert s.get("long") is not None and s.get("never") is not None
    # Expired entries are reclaimed on writes even when never read again.
    s.set("a", b"v", clock.now + 1)
    clock.now += 2
    s.set("b", b"v")
    assert "a" not in s._data and s.expirations == 2


def test_overwritten_entries_do_not_grow_expiry_heap_forever():
    clock = Clock()
    s = Store("lru", 10_000, clock)
    for _ in range(10_000):
        s.set("k", b"v", clock.now + 3600)
    assert len(s._expiry) <= 2 * len(s) + 64 + 1


def test_unknown_policy():
    with pytest.raises(ValueError, match="lru, lfu, fifo"):
        Store("arc", 10)


@settings(max_examples=200, deadline=None)
@given(
    policy=st.sampled_from(list(POLICIES)),
    budget=st.integers(min_value=1, max_value=500),
    ops=st.lists(
        st.tuples(st.sampled_from(["set", "get", "remove"]), st.text(max_size=6), st.binary(max_size=80)),
        max_size=120,
    ),
)
def test_property_bytes_never_exceed_budget_and_reads_are_exact(policy, budget, ops):
    s = Store(policy, budget)
    model = {}
    for op, key, value in ops:
        if op == "set":
            if s.set(key, value):
                model[key] = value
            else:
                model.pop(key, None)
        elif op == "remove":
            s.remove(key)
            model.pop(key, None)
        else:
            got = s.get(key)
            if got is not None:
                assert got.value == model[key]  # a hit is never a wrong value
        assert 0 <= s.bytes <= budget
        assert s.bytes == sum(e.size for e in s._data.values())
