"""Fault injection and load for the reliability suite (tests/reliability).

`Load` drives real gRPC Gets from threads and checks every answer against
the origin's truth. `frozen` stops a process with SIGSTOP (and always
continues it). `rss_kib` / `hwm_kib` read a process's memory from /proc.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from appliance.pb import groupcache_pb2, groupcache_pb2_grpc

from .appliance import wait_for


def file_value(key: str) -> bytes:
    """The deterministic content of origin file `key` (10 B .. ~2 KiB)."""
    digest = hashlib.sha256(key.encode()).hexdigest().encode()
    return (key.encode() + b":" + digest * (1 + int(digest[:2], 16) % 30))[: 10 + int(digest[2:5], 16) % 2000]


def write_origin_files(
    directory: Path, n: int, prefix: str = "k", group: str = "files"
) -> dict[tuple[str, str], bytes]:
    """n files `<prefix>NNNN` under directory; {(group, key): value}."""
    directory.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n):
        key = f"{prefix}{i:04d}"
        value = file_value(key)
        (directory / key).write_bytes(value)
        truth[(group, key)] = value
    return truth


@dataclass
class Outcome:
    ok: int = 0
    failed: int = 0
    wrong: int = 0
    samples: list = field(default_factory=list)  # first failures / wrong values

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.wrong

    def __str__(self) -> str:
        rate = 100.0 * self.failed / self.total if self.total else 0.0
        return f"{self.total} requests, {self.failed} failed ({rate:.2f}%), {self.wrong} wrong"


# Requests per second per Load thread. Unpaced, a few Python client threads
# take both cores of this box, and a process the test restarts waits seconds
# for CPU: a timed figure then measures the starved box, not the mechanism
# (a restarted box took 8.8 s from supervisord to serving workers, 2 s paced).
RATE = 200.0


class Load:
    """Threads calling Get on `targets` for keys of `truth`, bounded in count and time.

    truth[(group, key)] is the value the origin holds, or None when the origin does
    not have the key (NOT_FOUND is then the right answer). Every other status
    counts as failed, any other value as wrong. `mark()` starts a new window
    so that a test can report what happened during one phase.
    """

    def __init__(
        self,
        targets: list[str],
        truth: dict[tuple[str, str], bytes | None],
        *,
        threads_per_target: int = 1,
        timeout: float = 5.0,
        max_seconds: float = 60.0,
        max_requests: int = 200_000,
        seed: int = 7,
        rate: float | None = RATE,
    ) -> None:
        """`rate`: requests per second per thread (None: as fast as answers
        come)."""
        self.targets = list(targets)
        self.truth = dict(truth)
        self.keys = sorted(self.truth)
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.seed = seed
        self.rate = rate
        self.threads = [
            threading.Thread(target=self._run, args=(addr, n), name=f"load-{addr}-{n}", daemon=True)
            for addr in self.targets
            for n in range(threads_per_target)
        ]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.all = Outcome()
        self.window = Outcome()
        self.requests = 0

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> Outcome:
        self._stop.set()
        for t in self.threads:
            t.join(self.timeout + 10)
        return self.all

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def mark(self) -> Outcome:
        """End the current window: its outcome; a new window starts."""
        with self._lock:
            window, self.window = self.window, Outcome()
        return window

    def wait_requests(self, n: int, timeout: float = 30.0) -> None:
        """Until n more requests have completed."""
        start = self.all.total
        wait_for(lambda: self.all.total >= start + n or self._stop.is_set(), timeout, what=f"{n} more requests")

    def _record(self, kind: str, sample=None) -> None:
        with self._lock:
            for o in (self.all, self.window):
                setattr(o, kind, getattr(o, kind) + 1)
                if sample is not None and len(o.samples) < 20:
                    o.samples.append(sample)

    def _run(self, addr: str, n: int) -> None:
        rng = random.Random(f"{self.seed}-{addr}-{n}")
        start = time.monotonic()
        deadline = start + self.max_seconds
        sent = 0
        with grpc.insecure_channel(addr) as channel:
            stub = groupcache_pb2_grpc.GroupCacheStub(channel)
            while not self._stop.is_set() and time.monotonic() < deadline:
                if self.rate:
                    due = start + sent / self.rate
                    if self._stop.wait(max(0.0, due - time.monotonic())):
                        return
                sent += 1
                with self._lock:
                    if self.requests >= self.max_requests:
                        return
                    self.requests += 1
                group, key = rng.choice(self.keys)
                want = self.truth[(group, key)]
                try:
                    got = stub.Get(groupcache_pb2.GetRequest(group=group, key=key), timeout=self.timeout).value
                except grpc.RpcError as err:
                    if want is None and err.code() == grpc.StatusCode.NOT_FOUND:
                        self._record("ok")
                    else:
                        self._record(
                            "failed", (time.monotonic(), addr, key, err.code().name, (err.details() or "")[:200])
                        )
                    continue
                if got == want:
                    self._record("ok")
                else:
                    self._record("wrong", (time.monotonic(), addr, key, got[:40], want[:40] if want else want))


def get_all(addr: str, truth: dict[tuple[str, str], bytes | None], timeout: float = 5.0) -> Outcome:
    """One Get per (group, key) through addr, checked against truth."""
    out = Outcome()
    with grpc.insecure_channel(addr) as channel:
        stub = groupcache_pb2_grpc.GroupCacheStub(channel)
        for (group, key), want in truth.items():
            try:
                got = stub.Get(groupcache_pb2.GetRequest(group=group, key=key), timeout=timeout).value
            except grpc.RpcError as err:
                if want is None and err.code() == grpc.StatusCode.NOT_FOUND:
                    out.ok += 1
                else:
                    out.failed += 1
                    out.samples.append((key, err.code().name, err.details()))
                continue
            if got == want:
                out.ok += 1
            else:
                out.wrong += 1
                out.samples.append((key, got[:40], want))
    return out


@contextlib.contextmanager
def frozen(pid: int):
    """SIGSTOP pid for the block; SIGCONT it on the way out, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field_name} not in /proc/{pid}/status")


def rss_kib(pid: int) -> int:
    """Resident set size now."""
    return _status_kib(pid, "VmRSS")


def hwm_kib(pid: int) -> int:
    """Peak resident set size since the process started."""
    return _status_kib(pid, "VmHWM")


def report(name: str, **figures) -> None:
    """One line of a test's measured figures (pytest -s shows it)."""
    print(f"\n[{name}] " + "; ".join(f"{k} = {v}" for k, v in figures.items()))


def against(figure: float, bound: float) -> str:
    """A timed figure for a report, next to its documented bound."""
    verdict = "held" if figure <= bound else f"over by {figure - bound:.2f}s"
    return f"{figure:.2f} (bound {bound:g}: {verdict})"


def assert_within(figure: float, bound: float, what: str) -> None:
    """A documented bound holds as documented: no allowance for noise. The
    loads are paced (RATE), so a figure past its bound is a mechanism to
    find, not a busy scheduler."""
    assert figure <= bound, f"{what}: {figure:.2f}s, past its bound {bound:g}s"


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0
