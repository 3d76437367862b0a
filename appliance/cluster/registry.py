"""A worker's registration in etcd: its key under its own lease, kept alive.

Runs in its own thread (python3-etcd3 is synchronous). Losing the lease or
etcd itself is never final: it logs, backs off briefly and registers again.

Only etcd's own word ends a lease: a keep-alive answered with TTL 0 (the
lease is gone). While no member answers, the keep-alive keeps asking: etcd
extends every lease when it elects a new leader. A slow or failed call is
tried again at once on another member (etcd.call): with one member cut off,
the registration moves on within a fraction of its TTL and keeps its lease,
so the worker never leaves the ring.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import etcd

log = logging.getLogger(__name__)
# After a failed keep-alive, the next try comes this soon (on another member).
RETRY_S = 0.1


def call_timeout(ttl: float) -> float:
    """Seconds one etcd call of a registration may take: a quarter of the
    lease, so a stuck member leaves time to renew through another."""
    return max(0.25, min(2.0, ttl / 4.0))


def _put(client: Any, *, key: str, value: str, lease: Any) -> Any:
    return client.put(key, value, lease=lease)


def _get(client: Any, *, key: str) -> Any:
    return client.get(key)


class LeaseGone(Exception):
    """etcd dropped the lease (or no member answered for its whole TTL)."""


class Registration(threading.Thread):
    def __init__(
        self,
        connect: Callable[[], Any],  # an etcd3 client
        service: str,
        addr: str,
        *,
        ttl: int,
        metadata: dict | None = None,
        seed_clusters: bool = False,
    ) -> None:
        super().__init__(name=f"registry-{addr}", daemon=True)
        self._connect = connect
        self.key = etcd.member_key(service, addr)
        self.value = etcd.member_value(addr, metadata)
        # With seed_clusters, also the seed's peer-list entry, under the same
        # lease: it lives exactly as long as the registration.
        self.extra = {etcd.member_key(etcd.SEED_CLUSTERS, addr): addr} if seed_clusters else {}
        self.ttl = ttl
        self.registered = threading.Event()
        self.registrations = 0  # how many times a lease was granted and the key put
        self._stopping = threading.Event()
        # python3-etcd3 publishes no types: its client and Lease are Any.
        self._client: Any = None
        self._lease: Any = None

    def run(self) -> None:
        etcd.keep_trying(self._stopping, self._hold, self._lost)

    def _hold(self, backoff: etcd.Backoff) -> None:
        """Register, then keep the lease alive; returns only by raising."""
        if self._client is None:
            self._client = self._connect()
        self._register()
        backoff.reset()
        self._keep_alive()

    def _lost(self, exc: Exception, wait: float) -> bool:
        """Lost the lease: register again at once. No member answers: keep
        the client (its failover marks stay) and try again after `wait`."""
        self.registered.clear()
        if isinstance(exc, LeaseGone):
            log.warning("registration %s lost (%s); registering again", self.key, exc)
            return False
        log.warning("cannot register %s (%s); retrying in %.1fs", self.key, etcd.describe(exc), wait)
        return True

    def _register(self) -> None:
        client = self._client

        def grant(c):
            return c.lease(self.ttl)

        self._lease = etcd.call(client, grant)
        lease = self._lease
        for key, value in ((self.key, self.value), *self.extra.items()):
            etcd.call(client, functools.partial(_put, key=key, value=value, lease=lease))
        self.registrations += 1
        self.registered.set()
        log.info("registered %s (lease %x, ttl %ds)", self.key, lease.id, self.ttl)

    def _keep_alive(self) -> None:
        """Renew until etcd says the lease is gone; returns only by raising.

        A lease's time passing while no member answers ends nothing here:
        when the etcd leader's member stalls, the others elect a new leader
        (longer than a short lease), and the new leader extends every lease.
        Giving the lease up then threw away a live registration (a new lease,
        a ring change at every peer); registering again needs a member that
        answers anyway, and the first that does says whether the lease lives."""
        interval = max(self.ttl / 3.0, 0.2)
        client, lease = self._client, self._lease
        expires = time.monotonic() + self.ttl
        wait = interval
        while not self._stopping.wait(wait):
            try:
                responses = etcd.call(client, lambda c: list(c.refresh_lease(lease.id)))
            except etcd.UNREACHABLE as exc:
                if expires and time.monotonic() >= expires:
                    log.warning(
                        "no etcd member answered %s's keep-alive for the lease's %ds (%s); asking until one does",
                        self.key,
                        self.ttl,
                        etcd.describe(exc),
                    )
                    expires = 0.0  # said once per silence
                wait = RETRY_S
                continue
            if not responses or responses[0].TTL <= 0:
                raise LeaseGone("etcd says the lease expired")
            expires = time.monotonic() + responses[0].TTL
            wait = interval
            self._check_keys(client, lease)

    def _check_keys(self, client, lease) -> None:
        """Put back a key deleted or overwritten while its lease lives (a
        failed read proves nothing: it is tried at the next renewal)."""
        for key, value in ((self.key, self.value), *self.extra.items()):
            try:
                current, _ = etcd.call(client, functools.partial(_get, key=key))
                if current is None or current.decode() != value:
                    log.warning("registration %s was deleted or overwritten; putting it back", key)
                    etcd.call(client, functools.partial(_put, key=key, value=value, lease=lease))
            except etcd.UNREACHABLE:
                return

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def deregister(self, timeout: float = 2.0) -> bool:
        """Stop keeping alive and revoke the lease (deletes the key now)."""
        self._stopping.set()
        self.join(timeout)
        lease, client = self._lease, self._client
        ok = False
        if lease is not None:
            try:
                etcd.call(client or self._connect(), lambda c: c.revoke_lease(lease.id))
                ok = True
                log.info("deregistered %s", self.key)
            except Exception as exc:
                log.warning("could not revoke lease of %s (%s); it expires within %ds", self.key, exc, self.ttl)
        self.registered.clear()
        self._drop_client()
        return ok
