"""The controller: one per box. It turns etcd membership into SetPeers.

It reads the service prefix, then watches from the revision it read (no gap
between the two), and pushes `SetPeers(peers, revision)` to every local
worker's admin socket. Workers ignore older revisions, so pushing again is
always safe; a periodic push reaches workers that restarted.

With a prover (the cluster token known), a member joins the ring only once
its address proves it is a worker of this cluster (vetting.py); one that
proves itself after its revision was pushed comes in a higher generation
of that revision.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from ..admin_client import AdminClient
from . import etcd
from .vetting import MemberVetting, Outcome

log = logging.getLogger(__name__)


class Controller:
    def __init__(
        self,
        connect: Callable[[], Any],
        service: str,
        sockets: Callable[[], list[str]],
        *,
        push_interval: float = 1.0,
        prover: Callable[[str, int, Outcome], None] | None = None,
    ) -> None:
        """`prover(addr, lease, outcome)` asks a member to prove itself
        (vetting.HealthProver); None admits every member as etcd has it."""
        self._connect = connect
        self.service = service
        self._sockets = sockets
        self.push_interval = push_interval
        self.members: dict[str, etcd.Member] = {}
        self.revision = 0
        self.peers: list[str] = []
        self.generation = 0  # of self.peers within self.ring_revision
        self.ring_revision = 0  # the revision self.peers was decided at
        self._prover = prover
        self.vetting = MemberVetting()
        self._outcomes: queue.SimpleQueue[tuple[str, int, bool, str]] = queue.SimpleQueue()
        self._events: queue.Queue | None = None  # the watch's, while one runs: outcomes wake it
        self._unproven: list[str] = []
        self.etcd_ok = False  # the last read or probe of etcd worked (box metric groupcache_controller_etcd_up)
        self._outage = False  # logged that etcd does not answer
        self.etcd_client: Any = None  # the etcd client of run(), kept across resyncs
        self._probe_key = f"_appliance/{service}/probe"
        self._clients: dict[str, AdminClient] = {}
        self._acked: dict[str, tuple[int, int]] = {}  # (revision, generation); written by grpc callbacks too
        self._inodes: dict[str, int] = {}  # socket -> inode: a new one is a new worker process
        self._pending: dict[str, tuple[tuple[int, int], grpc.Future]] = {}  # socket -> (version, call in flight)
        # (socket, client, error) of failed calls
        self._failed: queue.SimpleQueue[tuple[str, AdminClient, BaseException]] = queue.SimpleQueue()
        self.stop_event = threading.Event()

    # Main loop ---------------------------------------------------------------

    def run(self) -> None:
        # One client for the controller's life: the members it found failing
        # stay skipped (etcd.call), so a resync goes to another at once.

        def attempt(backoff: etcd.Backoff) -> None:
            if self.etcd_client is None:
                self.etcd_client = self._connect()
            self._sync(self.etcd_client)
            backoff.reset()

        try:
            etcd.keep_trying(self.stop_event, attempt, self._lost)
        finally:
            if self.etcd_client is not None:
                try:
                    self.etcd_client.close()
                except Exception:
                    pass
            self._close_clients()

    def _lost(self, exc: Exception, wait: float) -> bool:
        """The watch failed: say so (once per outage), and keep pushing the
        last ring, on which the workers keep serving; then wait."""
        self.etcd_ok = False
        client = self.etcd_client
        if isinstance(exc, (grpc.RpcError, _ProbeFailed)) and client is not None:
            _skip_member(client)  # the watch's member went away under it, or cannot serve
        if isinstance(exc, _ProbeFailed):
            log.info("etcd member of the watch failed a read (%s); resyncing on another", exc)
        elif isinstance(exc, etcd.UNREACHABLE):
            # Every member failed the call: down, cut off, or without quorum.
            if not self._outage:
                log.warning(
                    "etcd unreachable or without quorum (%s); workers keep serving the ring of revision %d",
                    type(exc).__name__,
                    self.revision,
                )
            self._outage = True
        else:
            log.warning("etcd watch lost (%s: %s); resyncing in %.1fs", type(exc).__name__, exc, wait)
        self.push(everyone=True)
        return True

    def _sync(self, client) -> None:
        members, revision = etcd.call(client, lambda c: etcd.read_members(c, self.service))
        self.etcd_ok = True
        if self._outage:
            log.info("etcd answers again (revision %d)", revision)
            self._outage = False
        self._apply(members, revision)
        self.push()
        events: queue.Queue = queue.Queue()
        self._events = events
        cancel = etcd.watch_prefix(client, etcd.prefix(self.service), revision + 1, events.put)
        try:
            last_check = time.monotonic()
            while not self.stop_event.is_set():
                try:
                    # Short waits keep a stop request (an Event set by a
                    # signal handler) from waiting a whole push interval.
                    item = events.get(timeout=min(self.push_interval, 0.25))
                except queue.Empty:
                    item = None
                if isinstance(item, Exception):
                    raise item
                if item is not None and item is not _VETTED:
                    self._on_watch(item)
                self._vet()
                periodic = time.monotonic() - last_check >= self.push_interval
                # Periodically to every worker, acked or not: one that
                # restarted holds no ring until told again.
                self.push(everyone=periodic)
                if periodic:
                    # A dead etcd may leave the watch stream silent, and a member
                    # without quorum keeps it open: a linearizable read needs
                    # both the member and quorum.
                    try:
                        client.get(self._probe_key)  # on the watch's member, not through etcd.call
                    except (grpc.RpcError, *etcd.UNREACHABLE) as exc:
                        raise _ProbeFailed(etcd.describe(exc)) from exc
                    self.etcd_ok = True
                    last_check = time.monotonic()
        finally:
            self._events = None
            cancel()

    def _on_watch(self, response) -> None:
        self._apply(*etcd.apply_events(self.members, self.revision, response))

    def _apply(self, members, revision: int) -> None:
        self.members, self.revision = members, revision
        self._admit()

    def _admit(self) -> None:
        """Decide the ring: every member, or (with a prover) those proven."""
        if self._prover is None:
            peers = etcd.peers_of(self.members)
        else:
            peers = self.vetting.admitted((m.addr, m.lease) for m in self.members.values())
            for addr, lease in self.vetting.due():
                self._prover(addr, lease, self._outcome)
            self._unproven = self.vetting.unproven()
            if not self.ring_revision and self.vetting.first_answers_pending():
                # A controller that (re)started knows no member yet: its first
                # ring waits for their first answers (at most a probe's
                # timeout), not an empty ring that workers would install.
                return
        if self.revision == self.ring_revision and peers == self.peers:
            return
        self.ring_revision = self.revision
        # With a prover, generations are milliseconds of the clock, so a
        # restarted controller's decisions outrank those of the one before
        # it within the same etcd revision (workers keep the highest).
        self.generation = max(self.generation + 1, int(time.time() * 1000)) if self._prover is not None else 0
        if peers != self.peers:
            self.peers = peers
            log.info("ring revision %d: %d peers: %s", self.revision, len(peers), ", ".join(peers))

    def unproven(self) -> list[str]:
        """Member addresses kept out of the ring: they did not prove
        themselves (a copy: the metrics endpoint's thread reads it)."""
        return self._unproven

    def _outcome(self, addr: str, lease: int, proven: bool, why: str) -> None:
        # On a grpc thread: record it; the controller's thread acts on it.
        self._outcomes.put((addr, lease, proven, why))
        events = self._events
        if events is not None:
            events.put(_VETTED)

    def _vet(self) -> None:
        """Take the probes' outcomes, and ask again those due."""
        changed = False
        while True:
            try:
                addr, lease, proven, why = self._outcomes.get_nowait()
            except queue.Empty:
                break
            self.vetting.record(addr, lease, proven, why)
            changed = True
        if self._prover is not None and (changed or self.vetting.unproven()):
            self._admit()

    # Pushing -----------------------------------------------------------------

    def push(self, everyone: bool = False) -> None:
        """SetPeers to every local worker that has not acked our revision
        (to all of them with `everyone`; workers ignore what they hold).

        The calls go out together and are not waited for: a hung worker
        (its socket accepts, it never answers) must not hold up the ring of
        the others. Its call times out by itself; a later round retries."""
        self._vet()
        if not self.ring_revision:
            return  # no ring decided yet
        version = (self.ring_revision, self.generation)
        if everyone:
            self._acked.clear()
        self._reap()
        live = set()
        for path in self._sockets():
            live.add(path)
            self._check_process(path)
            if self._acked.get(path, (-1, 0)) >= version:
                continue
            pending = self._pending.get(path)
            if pending is not None and pending[0] >= version and not pending[1].done():
                continue  # this ring is on its way already
            client = self._client(path)
            call = client.set_peers_future(
                self.peers,
                self.ring_revision,
                leases=etcd.leases_of(self.members),
                generation=self.generation,
                timeout=1.0,
            )
            self._pending[path] = (version, call)
            call.add_done_callback(lambda f, path=path, client=client: self._pushed(path, client, f))
        for path in set(self._clients) - live:
            self._drop_client(path)
            self._inodes.pop(path, None)

    def _check_process(self, path: str) -> None:
        """A socket made anew is a restarted worker: it holds no ring, and must
        not wait for the periodic push (it registers once it has one)."""
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return
        if self._inodes.get(path, inode) != inode:
            self._drop_client(path)
        self._inodes[path] = inode

    def _pushed(self, path: str, client: AdminClient, call: grpc.Future) -> None:
        # On a grpc thread: record the outcome; the controller's thread acts on it.
        try:
            response = call.result()
        except Exception as exc:  # RpcError, or cancelled with its channel
            self._failed.put((path, client, exc))
            return
        version = (response.revision, response.generation)
        if self._acked.get(path, (-1, 0)) < version:
            self._acked[path] = version

    def _reap(self) -> None:
        while True:
            try:
                path, client, exc = self._failed.get_nowait()
            except queue.Empty:
                return
            if self._clients.get(path) is client:
                # A new channel next time: a failed one waits out grpc's reconnect backoff.
                self._drop_client(path)
                code = exc.code() if isinstance(exc, grpc.RpcError) else exc
                log.debug("SetPeers to %s failed: %s", path, code)

    def _client(self, path: str) -> AdminClient:
        client = self._clients.get(path)
        if client is None:
            client = self._clients[path] = AdminClient(path)
        return client

    def _drop_client(self, path: str) -> None:
        client = self._clients.pop(path, None)
        self._acked.pop(path, None)
        self._pending.pop(path, None)
        if client is not None:
            client.close()

    def _close_clients(self) -> None:
        for path in list(self._clients):
            self._drop_client(path)


_VETTED = object()  # put on the watch's queue: a probe's outcome is in


class _ProbeFailed(Exception):
    """The member the watch runs on failed a linearizable read: down, cut
    off or without quorum; the others may still serve."""


def _skip_member(client: Any) -> None:
    """Mark the member a failed watch stream ran on, so a resync goes elsewhere."""
    try:
        if len(client.endpoints) > 1:
            client.endpoint_in_use.fail()
    except Exception:
        pass
