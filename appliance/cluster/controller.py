"""The controller: one per box. It turns etcd membership into SetPeers.

It reads the service prefix, then watches from the revision it read (no gap
between the two), and pushes `SetPeers(peers, revision)` to every local
worker's admin socket. Workers ignore older revisions, so pushing again is
always safe; a periodic push reaches workers that restarted.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import threading
import time
from typing import Callable

import grpc

from ..pb import admin_pb2, admin_pb2_grpc
from . import etcd

log = logging.getLogger(__name__)


class Controller:
    def __init__(
        self,
        connect: Callable[[], object],
        service: str,
        sockets: Callable[[], list[str]],
        *,
        push_interval: float = 1.0,
    ) -> None:
        self._connect = connect
        self.service = service
        self._sockets = sockets
        self.push_interval = push_interval
        self.members: dict[str, tuple[str, dict | None]] = {}
        self.revision = 0
        self.peers: list[str] = []
        self.etcd_ok = False  # the last read or probe of etcd worked (box metric groupcache_controller_etcd_up)
        self._stubs: dict[str, tuple[grpc.Channel, admin_pb2_grpc.AdminStub]] = {}
        self._acked: dict[str, int] = {}  # written by grpc callbacks too
        self._pending: dict[str, tuple[int, grpc.Future]] = {}  # socket -> (revision, call in flight)
        self._failed: queue.SimpleQueue = queue.SimpleQueue()  # (socket, channel, error) of failed calls
        self.stop_event = threading.Event()

    # Main loop ---------------------------------------------------------------

    def run(self) -> None:
        backoff = 0.1
        while not self.stop_event.is_set():
            client = None
            try:
                client = self._connect()
                self._sync(client)
                backoff = 0.1
            except Exception as exc:
                if self.stop_event.is_set():
                    break
                self.etcd_ok = False
                log.warning("etcd watch lost (%s: %s); resyncing in %.1fs", type(exc).__name__, exc, backoff)
                # Keep pushing the last ring: workers keep serving on it.
                self.push(everyone=True)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                if client is not None:
                    try:
                        client.close()
                    except Exception:
                        pass
        self._close_stubs()

    def _sync(self, client) -> None:
        members, revision = etcd.read_members(client, self.service)
        self.etcd_ok = True
        self._apply(members, revision)
        self.push()
        events: queue.Queue = queue.Queue()
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
                if item is not None:
                    self._on_watch(item)
                periodic = time.monotonic() - last_check >= self.push_interval
                # Periodically to every worker, acked or not: one that
                # restarted holds no ring until told again.
                self.push(everyone=periodic)
                if periodic:
                    # A dead etcd may leave the watch stream silent: probe it.
                    client.status()
                    self.etcd_ok = True
                    last_check = time.monotonic()
        finally:
            cancel()

    def _on_watch(self, response) -> None:
        members = dict(self.members)
        for event in response.events:
            key = event.kv.key.decode()
            if etcd.is_delete(event):
                members.pop(key, None)
                continue
            try:
                members[key] = etcd.parse_member(event.kv.key, event.kv.value)
            except ValueError as exc:
                log.warning("ignoring %s: %s", key, exc)
                members.pop(key, None)
        self._apply(members, response.header.revision)

    def _apply(self, members, revision: int) -> None:
        peers = etcd.peers_of(members)
        changed = peers != self.peers
        self.members, self.revision = members, revision
        if changed:
            self.peers = peers
            log.info("ring revision %d: %d peers: %s", revision, len(peers), ", ".join(peers))

    # Pushing -----------------------------------------------------------------

    def push(self, everyone: bool = False) -> None:
        """SetPeers to every local worker that has not acked our revision
        (to all of them with `everyone`; workers ignore what they hold).

        The calls go out together and are not waited for: a hung worker
        (its socket accepts, it never answers) must not hold up the ring of
        the others. Its call times out by itself; a later round retries."""
        if not self.revision:
            return
        if everyone:
            self._acked.clear()
        self._reap()
        request = admin_pb2.SetPeersRequest(peers=self.peers, revision=self.revision)
        live = set()
        for path in self._sockets():
            live.add(path)
            if self._acked.get(path, -1) >= self.revision:
                continue
            pending = self._pending.get(path)
            if pending is not None and pending[0] >= self.revision and not pending[1].done():
                continue  # this revision is on its way already
            channel, stub = self._entry(path)
            call = stub.SetPeers.future(request, timeout=1.0)
            self._pending[path] = (self.revision, call)
            call.add_done_callback(lambda f, path=path, channel=channel: self._pushed(path, channel, f))
        for path in set(self._stubs) - live:
            self._drop_stub(path)

    def _pushed(self, path: str, channel: grpc.Channel, call) -> None:
        # On a grpc thread: record the outcome; the controller's thread acts on it.
        try:
            revision = call.result().revision
        except Exception as exc:  # RpcError, or cancelled with its channel
            self._failed.put((path, channel, exc))
            return
        if self._acked.get(path, -1) < revision:
            self._acked[path] = revision

    def _reap(self) -> None:
        while True:
            try:
                path, channel, exc = self._failed.get_nowait()
            except queue.Empty:
                return
            entry = self._stubs.get(path)
            if entry is not None and entry[0] is channel:
                self._drop_stub(path)
                log.debug("SetPeers to %s failed: %s", path, getattr(exc, "code", lambda: exc)())

    def _entry(self, path: str) -> tuple[grpc.Channel, admin_pb2_grpc.AdminStub]:
        entry = self._stubs.get(path)
        if entry is None:
            channel = grpc.insecure_channel(f"unix:{path}")
            entry = self._stubs[path] = (channel, admin_pb2_grpc.AdminStub(channel))
        return entry

    def _drop_stub(self, path: str) -> None:
        entry = self._stubs.pop(path, None)
        self._acked.pop(path, None)
        self._pending.pop(path, None)
        if entry is not None:
            entry[0].close()

    def _close_stubs(self) -> None:
        for path in list(self._stubs):
            self._drop_stub(path)


def worker_sockets(runtime_dir: str) -> Callable[[], list[str]]:
    pattern = os.path.join(runtime_dir, "worker-*.sock")
    return lambda: sorted(glob.glob(pattern))
