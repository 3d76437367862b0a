"""Cluster-wide operations through etcd, carried out by each box's controller:
stopping a worker of any box (`appliance stop-node`) and gathering every
box's counters (`appliance stats`). No admin port is opened to the network:
a request is a key in etcd, the box that owns the worker (or every box, for
stats) answers in etcd, and the CLI reads the answer there.

Keys live under `_appliance/<service>/`, not under `<service>/`: Go clients
resolving `etcd:///<service>` watch the bare prefix `<service>` (no slash),
so any key starting with the service name would look like an endpoint.

    _appliance/<service>/drain/<host:port>      {"state": "requested" | "stopping" | "stopped" | "failed", ...}
    _appliance/<service>/stats-request/<nonce>  {"at": ...}
    _appliance/<service>/stats/<nonce>/<box>    {"box": ..., "workers": {addr: stats or {"error": ...}}}

Every key is written under a lease, so a request nobody finishes vanishes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import etcd

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

ROOT = "_appliance"
STATS_TTL = 10  # seconds a stats request and its answers live
# Stats requests waiting for the one thread that answers them: past it a
# request is dropped (its asker times out), so whoever can write etcd
# cannot make the controller start a thread per key it writes.
STATS_BACKLOG = 8
# A request is signed with the cluster token (an HMAC: the token itself is
# never written to etcd) and acted on only this many seconds around its time,
# so whoever can write etcd but lacks the token cannot stop a worker or read
# counters, and a copied request goes stale.
REQUEST_WINDOW = 120.0


def sign(token: str, kind: str, name: str, at: float) -> str:
    """The signature of request `kind` ("drain", "stats") for `name`, made at `at`."""
    return hmac.new(token.encode(), f"{kind}\n{name}\n{at!r}".encode(), hashlib.sha256).hexdigest()


def signed(token: str, kind: str, name: str, **doc: Any) -> str:
    at = time.time()
    return json.dumps({**doc, "at": at, "mac": sign(token, kind, name, at)})


def verified(token: str | None, kind: str, name: str, doc: dict, now: float | None = None) -> bool:
    at, mac = doc.get("at"), doc.get("mac")
    if token is None or not isinstance(at, (int, float)) or not isinstance(mac, str):
        return False
    if abs((time.time() if now is None else now) - at) > REQUEST_WINDOW:
        return False
    return hmac.compare_digest(mac, sign(token, kind, name, float(at)))


def prefix(service: str) -> str:
    return f"{ROOT}/{service}/"


def drain_key(service: str, addr: str) -> str:
    return f"{prefix(service)}drain/{addr}"


def _state(value: bytes | None) -> dict:
    try:
        return json.loads(value) if value else {}
    except ValueError:
        return {}


class BoxOps(threading.Thread):
    """In the controller: acts on drain requests for this box's workers and
    answers stats requests with this box's workers' counters."""

    def __init__(
        self,
        settings: Settings,
        connect: Callable[[], Any],
        *,
        stop_event: threading.Event,
        token: str | None,
    ) -> None:
        """`token`: the cluster's, which requests must be signed with (None:
        every request is refused)."""
        super().__init__(name="box-ops", daemon=True)
        self._token = token
        self.refused = 0
        self.settings = settings
        self.service = settings.cluster.service
        self.box = settings.node.host
        self._connect = connect
        self._stopping = stop_event
        self._mine = {settings.node.address(i): i for i in range(settings.node.workers)}
        self._draining: set[str] = set()
        self._stats_requests: queue.Queue[tuple[Any, str]] = queue.Queue(STATS_BACKLOG)
        self.stats_dropped = 0
        threading.Thread(target=self._stats_loop, name="box-ops-stats", daemon=True).start()

    def refusals(self) -> dict[str, int]:
        """What this box's limits on etcd requests refused (its metrics)."""
        return {"stats_backlog": self.stats_dropped, "unsigned_requests": self.refused}

    def run(self) -> None:
        clients: list = []  # the one client, made at the first attempt

        def attempt(backoff: etcd.Backoff) -> None:
            if not clients:
                clients.append(self._connect())
            self._serve(clients[0])
            backoff.reset()

        def failed(exc: Exception, wait: float) -> bool:
            log.debug("box operations: etcd watch lost (%s: %s)", type(exc).__name__, exc)
            return True

        try:
            etcd.keep_trying(self._stopping, attempt, failed)
        finally:
            for client in clients:
                try:
                    client.close()
                except Exception:
                    pass

    def _serve(self, client) -> None:
        root = prefix(self.service)
        response = etcd.call(client, lambda c: c.get_prefix_response(root))
        for kv in response.kvs:  # requests made while this controller was away
            self._on_put(client, kv.key.decode(), kv.value)
        events: queue.Queue = queue.Queue()
        cancel = etcd.watch_prefix(client, root, response.header.revision + 1, events.put)
        try:
            while not self._stopping.is_set():
                try:
                    item = events.get(timeout=0.25)
                except queue.Empty:
                    continue
                if isinstance(item, Exception):
                    raise item
                for event in item.events:
                    if not etcd.is_delete(event):
                        self._on_put(client, event.kv.key.decode(), event.kv.value)
        finally:
            cancel()

    def _on_put(self, client, key: str, value: bytes) -> None:
        rest = key[len(prefix(self.service)) :]
        kind, _, name = rest.partition("/")
        if kind in ("drain", "stats-request") and (kind == "stats-request" or name in self._mine):
            doc = _state(value)
            if kind == "drain" and doc.get("state") != "requested":
                return  # a box's own answer (stopping, stopped, failed)
            if not verified(self._token, kind, name, doc):
                self.refused += 1
                if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                    log.warning(
                        "%d %s request(s) in etcd not signed with the cluster token: ignored", self.refused, kind
                    )
                return
        if kind == "drain" and name in self._mine and name not in self._draining:
            if _state(value).get("state") == "requested":
                self._draining.add(name)
                threading.Thread(target=self._drain, args=(client, key, name), daemon=True).start()
        elif kind == "stats-request":
            try:
                self._stats_requests.put_nowait((client, name))
            except queue.Full:
                self.stats_dropped += 1
                if self.stats_dropped in (1, 10, 100) or self.stats_dropped % 1000 == 0:
                    log.warning("stats requests come faster than they are answered: %d dropped", self.stats_dropped)

    def _stats_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, nonce = self._stats_requests.get(timeout=0.5)
            except queue.Empty:
                continue
            self._answer_stats(client, nonce)

    def _write(self, client, key: str, doc: dict, ttl: int) -> None:
        lease = etcd.call(client, lambda c: c.lease(ttl))
        etcd.call(client, lambda c: c.put(key, json.dumps(doc), lease=lease))

    def _drain(self, client, key: str, addr: str) -> None:
        """Stop worker `addr` of this box gracefully, as local stop-node does."""
        from ..supervision import conf, rpc

        ns = self.settings.node
        ttl = int(ns.stop_grace) + 30
        name = conf.worker_name(self._mine[addr])
        try:
            self._write(client, key, {"state": "stopping", "box": self.box, "worker": name}, ttl)
            log.info("stopping %s (%s) for a stop-node request", addr, name)
            left = rpc.stop_all(conf.supervisor(self.settings), [name], ns.stop_grace)
            doc = {"state": "failed", "error": f"{name} did not stop in time"} if left else {"state": "stopped"}
        except Exception as exc:
            doc = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
        try:
            self._write(client, key, {**doc, "box": self.box, "worker": name}, ttl)
        except Exception as exc:
            log.warning("could not report the stop of %s: %s", addr, exc)
        finally:
            self._draining.discard(addr)

    def _answer_stats(self, client, nonce: str) -> None:
        from ..admin_client import AdminClient
        from ..config import Layout

        workers: dict[str, dict] = {}
        for addr, index in self._mine.items():
            try:
                with AdminClient(Layout(self.settings).admin_socket(index), timeout=2) as admin:
                    workers[addr] = admin.stats()
            except Exception as exc:
                workers[addr] = {"error": type(exc).__name__}
        try:
            key = f"{prefix(self.service)}stats/{nonce}/{self.box}"
            self._write(client, key, {"box": self.box, "workers": workers}, STATS_TTL)
        except Exception as exc:
            log.warning("could not answer a stats request: %s", exc)


# The CLI's side ------------------------------------------------------------------


class Unclaimed(Exception):
    """No box took the request (its controller is down, or no box runs it)."""


def request_drain(client, service: str, addr: str, *, token: str, timeout: float, claim_within: float = 10.0) -> dict:
    """Ask the box that runs `addr` to stop it (a request signed with the
    cluster `token`); wait until it reports the worker stopped and the
    worker's registration is gone, or `timeout`."""
    key = drain_key(service, addr)
    lease = etcd.call(client, lambda c: c.lease(int(timeout) + 30))
    request = signed(token, "drain", addr, state="requested")
    etcd.call(client, lambda c: c.put(key, request, lease=lease))
    try:
        start = time.monotonic()
        deadline = start + timeout
        doc: dict = {}
        while time.monotonic() < deadline:
            value, _ = etcd.call(client, lambda c: c.get(key))
            doc = _state(value)
            state = doc.get("state")
            if state == "requested" and time.monotonic() - start > claim_within:
                raise Unclaimed(f"no box took the stop request for {addr} within {claim_within:.0f}s")
            if state == "failed":
                return doc
            if state == "stopped":
                registered, _ = etcd.call(client, lambda c: c.get(etcd.member_key(service, addr)))
                if registered is None:
                    return doc
            time.sleep(0.1)
        return {**doc, "state": "timeout"}
    finally:
        try:
            etcd.call(client, lambda c: c.revoke_lease(lease.id))
        except Exception:
            pass


def gather_stats(client, service: str, boxes: set[str], *, token: str, timeout: float = 3.0) -> dict[str, dict]:
    """{box: {"workers": {addr: stats}}} from every box that answers within
    `timeout` (returns early once every box of `boxes` has); the request is
    signed with the cluster `token`."""
    nonce = uuid.uuid4().hex
    lease = etcd.call(client, lambda c: c.lease(STATS_TTL))
    answers = f"{prefix(service)}stats/{nonce}/"
    request = signed(token, "stats-request", nonce)
    etcd.call(client, lambda c: c.put(f"{prefix(service)}stats-request/{nonce}", request, lease=lease))
    found: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for value, meta in etcd.call(client, lambda c: list(c.get_prefix(answers))):
                box = meta.key.decode()[len(answers) :]
                found[box] = _state(value)
            if boxes and boxes <= set(found):
                break
            time.sleep(0.1)
    finally:
        try:
            etcd.call(client, lambda c: c.revoke_lease(lease.id))
        except Exception:
            pass
    return found
