import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.cache.singleflight import SingleFlight


async def test_concurrent_calls_share_one_execution():
    sf = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def work():
        nonlocal calls
        calls += 1
        await gate.wait()
        return "v"

    tasks = [asyncio.create_task(sf.do("k", work)) for _ in range(100)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == ["v"] * 100
    assert calls == 1
    assert len(sf) == 0


async def test_error_reaches_every_waiter_and_next_call_retries():
    sf = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def fail():
        nonlocal calls
        calls += 1
        await gate.wait()
        raise RuntimeError("origin down")

    tasks = [asyncio.create_task(sf.do("k", fail)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert calls == 1

    async def ok():
        nonlocal calls
        calls += 1
        return 1

    assert await sf.do("k", ok) == 1
    assert calls == 2


async def test_cancelled_caller_does_not_cancel_shared_work():
    sf = SingleFlight()
    gate = asyncio.Event()

    async def work():
        await gate.wait()
        return 42

    first = asyncio.create_task(sf.do("k", work))
    second = asyncio.create_task(sf.do("k", work))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == 42
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_forget_starts_a_new_flight():
    sf = SingleFlight()
    gates = [asyncio.Event(), asyncio.Event()]
    n = 0

    async def work():
        nonlocal n
        i = n
        n += 1
        await gates[i].wait()
        return i

    old = asyncio.create_task(sf.do("k", work))
    await asyncio.sleep(0)
    sf.forget("k")
    new = asyncio.create_task(sf.do("k", work))
    await asyncio.sleep(0)
    gates[1].set()
    assert await new == 1
    assert not sf.in_flight("k")  # the new flight is done; the old one is no longer tracked
    gates[0].set()
    assert await old == 0
    assert len(sf) == 0


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.sampled_from("abcde"), min_size=1, max_size=60))
def test_property_one_execution_per_distinct_key(keys):
    async def run():
        sf = SingleFlight()
        executed = []
        gate = asyncio.Event()

        async def work(k):
            executed.append(k)
            await gate.wait()
            return k.upper()

        tasks = [asyncio.create_task(sf.do(k, lambda k=k: work(k))) for k in keys]
        await asyncio.sleep(0)
        gate.set()
        out = await asyncio.gather(*tasks)
        assert out == [k.upper() for k in keys]
        assert sorted(executed) == sorted(set(keys))

    asyncio.run(run())
