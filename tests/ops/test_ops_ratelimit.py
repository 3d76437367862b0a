"""Token buckets per client address (pure, with a fake clock)."""

from __future__ import annotations

import pytest

from appliance.rules.ratelimit import TokenBuckets as PythonBuckets
from appliance.rules.ratelimit import client_address


def _engine_buckets():
    try:
        from appliance_engine import TokenBuckets
    except ImportError:
        pytest.skip("the engine is not built here")
    return TokenBuckets


# Python's buckets and the engine's (which its hit path charges): one rule.
@pytest.fixture(params=["python", "engine"])
def TokenBuckets(request):
    return PythonBuckets if request.param == "python" else _engine_buckets()


def test_burst_then_refill_at_the_rate(TokenBuckets):
    now = [0.0]
    b = TokenBuckets(10, 3, clock=lambda: now[0])
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("a") == pytest.approx(0.1)  # empty: one token in 1/rate s
    assert b.take("b") == 0.0  # another address has its own bucket
    now[0] = 0.05
    assert b.take("a") == pytest.approx(0.05)
    now[0] = 0.1
    assert b.take("a") == 0.0 and b.take("a") > 0
    now[0] = 100.0  # refills up to the burst, not beyond
    assert [b.take("a") for _ in range(4)].count(0.0) == 3


def test_a_costly_call_goes_ahead_in_debt_and_the_next_waits_for_all_of_it(TokenBuckets):
    now = [0.0]
    b = TokenBuckets(10, 3, clock=lambda: now[0])
    assert b.take("a", 23) == 0.0  # 3 in the bucket: goes ahead, 20 owed
    assert b.take("a") == pytest.approx(2.1)  # the debt and one token, at 10/s
    now[0] = 2.1
    assert b.take("a") == 0.0 and b.take("a") > 0
    assert b.take("new", 50) == 0.0 and b.take("new") == pytest.approx(4.8)  # a first call in debt too


def test_table_of_clients_stays_bounded(TokenBuckets):
    now = [0.0]
    b = TokenBuckets(1, 2, clock=lambda: now[0], max_clients=100)
    for i in range(1000):
        b.take(f"10.0.{i // 256}.{i % 256}")
        now[0] += 0.01
    assert len(b) <= 100


def test_client_address_of_grpc_peers():
    assert client_address("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert client_address("ipv6:[::1]:5555") == "::1"
    assert client_address("ipv6:[2001:db8::1]:443") == "2001:db8::1"
    assert client_address("unix:/run/x.sock") == "unix:/run/x.sock"
