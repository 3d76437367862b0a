"""The circuit breaker around a peer client: a silent peer is not waited on
for every Get, and a slow one is not mistaken for it.

`Breaker` wraps any `PeerCalls` (peer_client.GrpcPeerClient on grpc.aio or
on the engine's channel) and is what a node's ring holds: a
rules.peers.PeerClient. The state lives in the peer's PeerFacts, which
outlive the clients made for one peer; the timing is here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from ..cache import errors
from ..rules.peers import PeerFacts

log = logging.getLogger(__name__)
T = TypeVar("T")

# A health check is answered by the peer's server, not its origin: a peer
# that is up answers one in milliseconds even while its loads are slow.
PROBE_S = 1.0
# A read the owner has not answered this soon (or within half its first
# wait) starts a health probe, unless the owner answered something since
# the read was sent: by the half-deadline point the forwarder then knows
# whether the owner's server is alive (slow origin: keep waiting) or silent
# (frozen, cut off: load locally, as before).
ALIVE_AFTER_S = 0.1
# What a forwarder waiting out a live owner leaves of the caller's deadline
# (at most this share of it): the reply still has to travel back.
PATIENCE_MARGIN_S = 0.1
PATIENCE_MARGIN_SHARE = 0.05
# While waiting out a live owner, it is asked again this often (a probe
# takes up to PROBE_S): one that froze after its last answer is left then.
REPROBE_S = PROBE_S * 1.5


class PeerCalls(Protocol):
    """One peer's calls, each given how long it may take (seconds)."""

    addr: str

    async def get(self, group: str, key: str, wait: float) -> tuple[bytes, float]: ...
    async def get_many(self, group: str, keys: list[str], wait: float) -> dict: ...
    async def set(self, group: str, key: str, value: bytes, ttl: float, wait: float) -> None: ...
    async def remove(self, group: str, key: str, wait: float) -> None: ...
    async def peek(self, group: str, key: str, wait: float) -> tuple[bytes, float] | None: ...
    async def handoff(
        self, source: str, group: str, entries: list[tuple[str, bytes, float]], wait: float
    ) -> tuple[int, int]: ...
    async def answers(self, wait: float) -> bool:
        """Whether the peer's server answers a health check in time."""
        ...

    def connected(self) -> bool: ...
    async def close(self, grace: float | None = None) -> None: ...


class Breaker:
    """A rules.peers.PeerClient: `calls` behind the breaker of `facts`.

    A read without an answer from a peer whose channel is not connected
    opens it at once; one whose channel looks up may be a slow owner (a
    slow origin) or a stale connection, so a health probe asks, and opens it
    only if that gets no answer either (PeerFacts says the rest).

    Reads take `share` of the caller's time (at most `max_wait`), leaving
    the rest for a local load if the owner fails."""

    # The part of a caller's time a read may take (the rest: a local load).
    SHARE = 0.5

    def __init__(self, calls: PeerCalls, facts: PeerFacts, *, max_wait: float, share: float = SHARE) -> None:
        self.calls = calls
        self.addr = calls.addr
        self.facts = facts
        self._max_wait = max_wait
        self._share = share
        self._probe: asyncio.Future | None = None

    # The PeerClient calls ----------------------------------------------------------

    async def get(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float]:
        return await self._read(lambda budget: self.calls.get(group, key, budget), timeout)

    async def get_many(self, group: str, keys: list[str], timeout: float | None) -> dict:
        return await self._read(lambda budget: self.calls.get_many(group, keys, budget), timeout)

    async def set(self, group: str, key: str, value: bytes, ttl: float, timeout: float | None) -> None:
        await self.calls.set(group, key, value, ttl, self._wait(timeout))

    async def remove(self, group: str, key: str, timeout: float | None) -> None:
        await self.calls.remove(group, key, self._wait(timeout))

    async def peek(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float] | None:
        # The caller's own short deadline, not a share of it: a peek has no fallback to leave time for.
        return await self.calls.peek(group, key, self._max_wait if timeout is None else timeout)

    async def handoff(
        self, source: str, group: str, entries: list[tuple[str, bytes, float]], timeout: float | None
    ) -> tuple[int, int]:
        return await self.calls.handoff(source, group, entries, self._max_wait if timeout is None else timeout)

    async def close(self, grace: float | None = None) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.calls.close(grace)

    # The breaker -------------------------------------------------------------------

    async def _read(self, fetch: Callable[[float], Awaitable[T]], timeout: float | None) -> T:
        first = self._wait(timeout)
        started, wait = await self._admit(first)
        return await self._patiently(fetch, started, wait, self._patience(timeout, first, wait))

    def _wait(self, timeout: float | None) -> float:
        return self._max_wait if timeout is None else min(self._max_wait, timeout * self._share)

    def _patience(self, timeout: float | None, first: float, wait: float) -> float:
        """How long a read may wait for an owner whose server is alive, from
        when it is sent: the caller's deadline less a margin, at most the
        peer timeout (never less than `wait`, what is left of `first` after
        _admit)."""
        if timeout is None:
            return wait
        spent = first - wait  # waiting on a probe in _admit
        margin = min(PATIENCE_MARGIN_S, timeout * PATIENCE_MARGIN_SHARE)
        return max(wait, min(self._max_wait, timeout - margin) - spent)

    async def _admit(self, wait: float) -> tuple[float, float]:
        """(now on the loop's clock, what is left of the read's `wait`);
        PeerError at once while the breaker is open: the caller loads
        locally without waiting, and a probe in the background finds out
        when the peer answers again."""
        facts, probe = self.facts, self._probe
        if facts.probing and probe is not None and not probe.done():
            # A read just went unanswered and a probe is asking: its answer
            # decides this read, not another timeout. The wait counts.
            before = asyncio.get_running_loop().time()
            await asyncio.wait([probe], timeout=min(PROBE_S, wait))
            wait -= asyncio.get_running_loop().time() - before
            if not probe.done() and wait <= 0.01:
                raise errors.PeerError(f"{self.addr}: no answer yet to a probe, and this read's time is up")
        now = asyncio.get_running_loop().time()
        if facts.read_allowed():
            return now, wait
        if facts.probe_due(now):
            self._start_probe()
        raise errors.PeerError(f"{self.addr}: not answering (asked again in the background)")

    async def _patiently(
        self, fetch: Callable[[float], Awaitable[T]], started: float, wait: float, patience: float
    ) -> T:
        """fetch(patience)'s answer. At `wait` without one, the read goes on
        only if the owner's server answered anything since `started` (a
        probe started after ALIVE_AFTER_S asks): an owner that is alive and
        loading the key is waited for up to `patience`, so the cluster
        loads it once; a silent one (frozen, cut off, not connected) is
        left at `wait`, and the caller loads locally in the time left."""
        loop = asyncio.get_running_loop()
        if patience <= wait:
            # Nothing to wait out past `wait`: the fetch runs inline, without
            # a task of its own (a forward's cost at many streams).
            try:
                async with asyncio.timeout(max(0.0, started + wait - loop.time())):
                    result = await fetch(patience)
            except TimeoutError:
                error = errors.PeerError(f"{self.addr}: no answer within {wait:.3f}s")
                self._settle(started, wait, error)
                raise error from None
            except errors.CacheError as exc:
                self._settle(started, wait, exc)
                raise
            self._settle(started, wait, None)
            return result
        task = asyncio.ensure_future(fetch(patience))
        span = wait
        try:
            await asyncio.wait([task], timeout=min(ALIVE_AFTER_S, wait / 2))
            if not task.done() and not self.facts.heard_since(started) and not self.facts.probing:
                if self.facts.read_allowed() and self.calls.connected():
                    self._start_probe()
            await asyncio.wait([task], timeout=max(0.0, started + wait - loop.time()))
            if not task.done() and self.facts.heard_since(started):
                span = patience  # alive: its answer is worth the wait, while it stays alive
                await self._while_alive(task, started + patience)
            if not task.done():
                raise errors.PeerError(f"{self.addr}: no answer within {span:.3f}s")
            result = task.result()
        except errors.CacheError as exc:
            self._settle(started, span, exc)
            raise
        finally:
            if not task.done():
                task.cancel()
        self._settle(started, span, None)
        return result

    async def _while_alive(self, task: asyncio.Future, until: float) -> None:
        """Wait for `task` until `until` (the loop's clock), asking the owner
        again about every REPROBE_S: an owner that stops answering (frozen
        after its last answer) is left at once, so the caller loads the key
        locally in the time that is left."""
        loop = asyncio.get_running_loop()
        while not task.done() and (left := until - loop.time()) > 0:
            asked = loop.time()
            if not self.facts.probing and self.facts.read_allowed() and self.calls.connected():
                self._start_probe()
            await asyncio.wait([task], timeout=min(left, REPROBE_S))
            if not task.done() and loop.time() < until and not self.facts.heard_since(asked):
                return  # silent since we asked: no longer worth waiting for

    def _start_probe(self) -> None:
        self.facts.probing = True
        self._probe = asyncio.ensure_future(self._run_probe())

    async def _run_probe(self) -> None:
        facts = self.facts
        try:
            answered = await self.calls.answers(min(self._max_wait, PROBE_S))
        except asyncio.CancelledError:
            facts.probing = False
            raise
        was_open = not facts.read_allowed()
        facts.probed(asyncio.get_running_loop().time(), answered)
        if was_open and answered:
            log.info("%s answers again: forwarding to it", self.addr)
        elif not was_open and not answered:
            log.warning("%s does not answer: loading its keys locally until it does", self.addr)

    def _settle(self, started: float, wait: float, error: errors.CacheError | None) -> None:
        """Tell the breaker how a read went: answered (any owner answer), or
        unanswered (timed out, or the channel is not connected)."""
        now = asyncio.get_running_loop().time()
        if error is None or not isinstance(error, errors.PeerError):
            self.facts.read_answered(now)
            return
        connected = self.calls.connected()
        if connected and now - started < 0.9 * wait:
            return  # an answer of sorts (a reset stream, a refused call): not silence
        was_open = not self.facts.read_allowed()
        if self.facts.read_unanswered(now, connected):
            self._start_probe()
        elif not was_open and not self.facts.read_allowed():
            log.warning("%s is not connected: loading its keys locally until it answers", self.addr)
