"""etcd.keep_trying: the one retry loop of the registry, the controller
and box operations (pure: an Event, no etcd)."""

from __future__ import annotations

import threading

from appliance.cluster import etcd


class Stop(threading.Event):
    """An Event whose waits are recorded instead of slept."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


def test_failures_back_off_doubling_to_the_cap_and_an_answer_starts_over():
    stop, told = Stop(), []
    outcomes = iter(["fail", "fail", "fail", "fail", "fail", "ok", "fail", "stop"])

    def attempt(backoff):
        what = next(outcomes)
        if what == "ok":
            backoff.reset()
            return
        if what == "stop":
            stop.set()
        raise ConnectionError(what)

    def failed(exc, wait):
        told.append(wait)
        return True

    etcd.keep_trying(stop, attempt, failed)
    assert told == [0.1, 0.2, 0.4, 0.8, 1.0, 0.1]  # capped at 1 s; the answer reset it
    assert stop.waits == told  # each wait is the one it was told; the stop ends it at once


def test_failed_may_ask_to_try_again_at_once():
    stop, calls = Stop(), []

    def attempt(backoff):
        calls.append(1)
        if len(calls) == 3:
            stop.set()
            return
        raise LookupError("lease gone")

    etcd.keep_trying(stop, attempt, lambda exc, wait: False)
    assert len(calls) == 3 and stop.waits == []
