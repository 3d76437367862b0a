"""The SharedLoop (appliance.fronts.grpc_engine.loop): another thread that
takes its lock runs between two steps of the loop, never during one."""

import asyncio
import threading

from appliance.fronts.grpc_engine.loop import SharedLoop, lock_of


async def test_tests_run_on_the_shared_loop():
    assert isinstance(asyncio.get_running_loop(), SharedLoop)


async def test_a_thread_under_the_lock_never_sees_a_step_half_done():
    loop = asyncio.get_running_loop()
    lock = lock_of(loop)
    assert lock is not None
    state = {"a": 0, "b": 0}
    torn = []
    stop = threading.Event()

    def other_thread():
        while not stop.is_set():
            with lock:  # the loop is parked in select(), or between steps
                if state["a"] != state["b"]:
                    torn.append(dict(state))

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        for _ in range(2000):
            state["a"] += 1
            for _ in range(50):  # a step long enough to be interrupted by a GIL switch
                pass
            state["b"] += 1
            await asyncio.sleep(0)
    finally:
        stop.set()
        thread.join(10)
    assert torn == []


def test_while_a_thread_holds_the_lock_the_loop_runs_nothing():
    """A callback the thread schedules (which wakes the loop at once) runs
    only after the thread lets go: the loop waits for the lock."""
    loop = SharedLoop()
    ran = []

    def other():
        with loop.lock:
            loop.call_soon_threadsafe(ran.append, "callback")
            threading.Event().wait(0.2)  # hold the lock a while: the loop is awake and must wait
            ran.append("released")

    async def main():
        thread = threading.Thread(target=other)
        thread.start()
        await asyncio.to_thread(thread.join, 5)
        await asyncio.sleep(0)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert ran == ["released", "callback"]
