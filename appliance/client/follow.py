"""Clients that follow the ring in etcd.

`EtcdMembers` is where a client made from settings finds the nodes: their
registrations under `<service>/` (design contract 2). A `Follower` keeps a
client's ring on them: it reads the prefix, watches it from the revision
read, and when the watch ends (etcd restarted, compacted or unreachable)
reads and watches again, with backoff. A watch that stays quiet for
`poll_interval` seconds is checked by a re-read, which is also what keeps
the ring current while no watch can be had.

The Follower does no I/O itself: `steps()` yields what to do next (a
blocking etcd `Call`, or `Wait` for what the watch posts) and is sent the
outcome. So one loop serves both clients: the sync Client runs each step in
its own daemon thread; the AsyncClient runs them from a task, the etcd calls
in a thread (asyncio.to_thread) and the waits on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..cache import errors
from ..cluster import etcd

if TYPE_CHECKING:
    from ..config import ClusterSettings

log = logging.getLogger("appliance.client")

# Posted to wake a driver that is stopping; no watch has number -1.
STOP = (-1, None)


class EtcdMembers:
    """The live peer list: node registrations in the etcd of `cluster`.

    Pass it as a client's `discover` to have the ring followed (or call it:
    it returns the peer list, like any `discover` callable)."""

    def __init__(
        self,
        cluster: ClusterSettings,
        *,
        poll_interval: float = 5.0,
        socket: Path | None = None,
        tls: tuple[Path | None, Path | None, Path | None] | None = None,
    ) -> None:
        """`socket`: the private embedded etcd's (Layout.etcd_socket());
        `tls`: (ca, cert, key) where not the cluster's (Layout.etcd_tls())."""
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) or not poll_interval > 0:
            raise ValueError(f"poll_interval must be a number of seconds > 0, got {poll_interval!r}")
        self.cluster = cluster
        self.socket = socket
        self.tls = tls
        self.poll_interval = float(poll_interval)

    def __repr__(self) -> str:
        return f"EtcdMembers({','.join(self.cluster.etcd)}, service={self.cluster.service!r})"

    def connect(self):
        try:
            return etcd.connect(self.cluster, socket=self.socket, tls=self.tls)
        except Exception as exc:
            raise self._unreachable(exc) from exc

    def read_with(self, client) -> tuple[dict[str, etcd.Member], int]:
        try:
            return etcd.call(client, lambda c: etcd.read_members(c, self.cluster.service))
        except Exception as exc:
            raise self._unreachable(exc) from exc

    def read(self) -> tuple[list[str], int]:
        """(peers, revision), on a connection of its own (blocking)."""
        client = self.connect()
        try:
            members, revision = self.read_with(client)
        finally:
            client.close()
        return etcd.peers_of(members), revision

    def __call__(self) -> list[str]:
        return self.read()[0]

    def _unreachable(self, exc: Exception) -> errors.PeerError:
        if self.socket is not None:
            where = (
                f"the box's private etcd ({self.socket}; only root and the service user may reach it, "
                "others can pass --peers)"
            )
        else:
            where = f"etcd at {', '.join(self.cluster.etcd)}"
        return errors.PeerError(
            f"cannot read the ring from {where} (service {self.cluster.service!r}): {type(exc).__name__}: {exc}"
        )


class Done(NamedTuple):
    """What a step came to: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Call:
    """Run a blocking etcd call."""

    def __init__(self, fn: Callable, *args: Any) -> None:
        self.fn, self.args = fn, args

    def run(self, events: queue.SimpleQueue) -> Done:
        try:
            return Done(self.fn(*self.args))
        except Exception as exc:
            return Done(error=exc)

    async def run_async(self, events: asyncio.Queue) -> Done:
        try:
            return Done(await asyncio.to_thread(self.fn, *self.args))
        except Exception as exc:
            return Done(error=exc)


class Wait:
    """Wait up to `seconds` for what the watch posts (None: nothing came)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, events: queue.SimpleQueue) -> Done:
        try:
            return Done(events.get(timeout=self.seconds))
        except queue.Empty:
            return Done(None)

    async def run_async(self, events: asyncio.Queue) -> Done:
        try:
            return Done(await asyncio.wait_for(events.get(), self.seconds))
        except TimeoutError:
            return Done(None)


Step = Call | Wait


class Follower:
    """Keeps a ring on etcd's members through `install(peers, revision)`."""

    def __init__(self, members: EtcdMembers, install: Callable[[list[str], int], object]) -> None:
        self.members = members
        self._install = install
        self._client: Any = None  # the etcd connection, while following
        self._cancel: Callable[[], None] | None = None  # ends the current watch
        self._watch = 0  # number of the current watch: posts of older ones are dropped
        self._state: dict[str, etcd.Member] = {}
        self._revision = 0
        self._healthy = True  # for the logs: the last watch worked

    # Blocking: run in a thread ---------------------------------------------------

    def open(self) -> tuple[dict[str, etcd.Member], int]:
        """Connect and read the members: where following starts."""
        self.release()
        client = self.members.connect()
        try:
            read = self.members.read_with(client)
        except BaseException:
            client.close()
            raise
        self._client = client
        return read

    def reread(self) -> tuple[dict[str, etcd.Member], int]:
        return self.members.read_with(self._client)

    def watch(self, start_revision: int, sink: Callable[[object], None]) -> None:
        prefix = etcd.prefix(self.members.cluster.service)
        self._cancel = etcd.watch_prefix(self._client, prefix, start_revision, sink)

    def release(self) -> None:
        """End the watch and close the connection (never raises)."""
        cancel, self._cancel = self._cancel, None
        client, self._client = self._client, None
        for close in [cancel] if client is None else [cancel, client.close]:
            try:
                if close is not None:
                    close()
            except Exception as exc:  # a connection already gone
                log.debug("closing the ring watch: %s: %s", type(exc).__name__, exc)

    # The driver's thread or loop ---------------------------------------------------

    def reset(self, members: dict[str, etcd.Member], revision: int) -> None:
        """Take these members (a read, or the last ones plus watch events) as the ring."""
        self._state, self._revision = members, revision
        self._install(etcd.peers_of(members), revision)

    def steps(self, post: Callable[[int, object], None]) -> Generator[Step, Done, None]:
        """The follow loop, etcd.retrying's; `post(watch, item)` must queue
        an item for the driver's Wait, from any thread."""
        # Capped at poll_interval: with no watch, a re-read that often.
        backoff = etcd.Backoff(cap=self.members.poll_interval)
        loop = etcd.retrying(functools.partial(self._follow, post), self._lost, backoff)
        done: Done | None = None
        while True:
            step = loop.send(done)
            if isinstance(step, etcd.Pause):
                until = time.monotonic() + step.seconds
                while (left := until - time.monotonic()) > 0:
                    yield Wait(left)  # a given-up watch may still post: dropped
                done = None
            else:
                done = yield step

    def _follow(self, post: Callable[[int, object], None], backoff: etcd.Backoff) -> Generator[Step, Done, None]:
        """One attempt: read, then watch from the revision read, until the
        watch ends; the connection is released when it fails."""
        try:
            if self._client is None:
                self.reset(*(yield Call(self.open)).result())
            self._watch += 1
            (yield Call(self.watch, self._revision + 1, functools.partial(post, self._watch))).result()
            while True:
                item = (yield Wait(self.members.poll_interval)).result()
                if item is None:  # quiet for a while: make sure with a re-read
                    self.reset(*(yield Call(self.reread)).result())
                else:
                    watch, response = item
                    if watch != self._watch:
                        continue  # from a watch given up already
                    if isinstance(response, BaseException):
                        raise response
                    self.reset(*etcd.apply_events(self._state, self._revision, response))
                self._working(backoff)
        except Exception:
            (yield Call(self.release)).result()
            raise

    def _lost(self, exc: Exception, wait: float) -> bool:
        # Once per outage, not once per retry.
        level = logging.WARNING if self._healthy else logging.DEBUG
        self._healthy = False
        log.log(
            level,
            "ring watch on %s lost (%s: %s); reading it again every %.1fs at most until it is back",
            self.members,
            type(exc).__name__,
            exc,
            self.members.poll_interval,
        )
        return True

    def _working(self, backoff: etcd.Backoff) -> None:
        """The watch proved itself (an event, or a re-read while quiet): the
        backoff starts over."""
        if not self._healthy:
            self._healthy = True
            log.info("ring watch on %s is back at revision %d", self.members, self._revision)
        backoff.reset()
