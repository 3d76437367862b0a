import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.cache.native_store import native_store
from appliance.cache.store import POLICIES, entry_size
from appliance.cache.store import Store as PythonStore


@pytest.fixture(params=["python", "engine"])
def Store(request):
    """Each test runs on both stores: one behaviour."""
    if request.param == "python":
        return PythonStore
    engine = native_store()
    if engine is None:
        pytest.skip("the engine is not built here")
    return engine


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("policy", list(POLICIES))
def test_budget_counts_key_and_value_bytes(Store, policy):
    s = Store(policy, 100)
    for i in range(50):
        s.set(f"k{i:02d}", b"x" * 17)  # 3 + 17 = 20 bytes each
    assert s.bytes <= 100
    assert len(s) == 5
    assert s.evictions == 45
    assert s.bytes == sum(entry_size(f"k{i:02d}", b"x" * 17) for i in range(45, 50))


def test_lru_keeps_recently_read(Store):
    s = Store("lru", 60)
    for k in "abc":
        s.set(k, b"x" * 19)
    s.get("a")
    s.set("d", b"x" * 19)
    assert "a" in s and "b" not in s


def test_fifo_ignores_reads(Store):
    s = Store("fifo", 60)
    for k in "abc":
        s.set(k, b"x" * 19)
    s.get("a")
    s.set("d", b"x" * 19)
    assert "a" not in s and "b" in s


def test_lfu_keeps_frequent(Store):
    s = Store("lfu", 60)
    for k in "abc":
        s.set(k, b"x" * 19)
    for _ in range(3):
        s.get("a")
        s.get("c")
    s.set("d", b"x" * 19)
    assert "a" in s and "c" in s and "b" not in s


def test_oversized_value_is_not_stored_and_drops_old_copy(Store):
    s = Store("lru", 10)
    s.set("k", b"123")
    assert not s.set("k", b"x" * 100)
    assert s.get("k") is None and s.bytes == 0


def test_multibyte_keys_count_utf8_bytes(Store):
    s = Store("lru", 1000)
    s.set("张三", b"100")
    assert s.bytes == len("张三".encode()) + 3 == 9


def test_expiry_hides_and_reclaims_without_scan(Store):
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
    assert len(s) == 3 and s.expirations == 2  # long, never, b: "a" is gone


def test_overwritten_entries_do_not_grow_expiry_heap_forever():
    clock = Clock()
    s = PythonStore("lru", 10_000, clock)  # the Rust store indexes expiry exactly
    for _ in range(10_000):
        s.set("k", b"v", clock.now + 3600)
    assert len(s._expiry) <= 2 * len(s) + 64 + 1


def test_unknown_policy(Store):
    with pytest.raises(ValueError, match="lru, lfu, fifo"):
        Store("arc", 10)


# Hypothesis runs each example once per store (no function-scoped fixture).
STORES = [PythonStore] + ([native_store()] if native_store() is not None else [])


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
    for store in STORES:
        check_budget_and_reads(store(policy, budget), ops)


def check_budget_and_reads(s, ops):
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
        assert 0 <= s.bytes <= s.max_bytes
        assert s.bytes == sum(e.size for _, e in s.ranked())


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(list(POLICIES)),
    budget=st.integers(min_value=0, max_value=300),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["set", "get", "remove", "evict", "tick", "reclaim", "victim"]),
            st.sampled_from(["a", "b", "c", "d", "e", "\u00e9\u00e9", "\ud800"]),
            st.binary(max_size=60),
            st.sampled_from([0.0, 1.0, 5.0]),
        ),
        max_size=80,
    ),
)
def test_property_the_engine_store_behaves_as_the_python_store(policy, budget, ops):
    """Same operations, same answers: every read, eviction, expiry and rank."""
    engine = native_store()
    if engine is None:
        pytest.skip("the engine is not built here")
    clock = Clock()
    py, rs = PythonStore(policy, budget, clock), engine(policy, budget, clock)
    for op, key, value, ttl in ops:
        expires = clock.now + ttl if ttl else 0.0
        results = []
        for s in (py, rs):
            if op == "set":
                results.append(s.set(key, value, expires))
            elif op == "get":
                results.append(s.get(key))
            elif op == "remove":
                results.append(s.remove(key))
            elif op == "evict":
                results.append(s.evict_one())
            elif op == "reclaim":
                results.append(s.reclaim_expired(2))
            elif op == "victim":
                results.append(s.victim(len(value)))
            else:
                results.append(None)
        if op == "tick":
            clock.now += 2.0
        assert results[0] == results[1], op
        assert (len(py), py.bytes, py.evictions, py.expirations) == (len(rs), rs.bytes, rs.evictions, rs.expirations)
        assert py.ranked() == rs.ranked()
