"""A worker's registration in etcd: its key under its own lease, kept alive.

Runs in its own thread (python3-etcd3 is synchronous). Losing the lease or
etcd itself is never final: it logs, backs off briefly and registers again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from . import etcd

log = logging.getLogger(__name__)


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
        self._client: Any = None
        self._lease: Any = None

    def run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                self._register()
                backoff = 0.1
                self._keep_alive()
            except Exception as exc:  # etcd down, lease lost, key deleted
                if self._stopping.is_set():
                    break
                self.registered.clear()
                log.warning(
                    "registration %s lost (%s: %s); retrying in %.1fs", self.key, type(exc).__name__, exc, backoff
                )
                self._drop_client()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 1.0)

    def _register(self) -> None:
        if self._client is None:
            self._client = self._connect()
        self._lease = self._client.lease(self.ttl)
        self._client.put(self.key, self.value, lease=self._lease)
        for key, value in self.extra.items():
            self._client.put(key, value, lease=self._lease)
        self.registrations += 1
        self.registered.set()
        log.info("registered %s (lease %x, ttl %ds)", self.key, self._lease.id, self.ttl)

    def _keep_alive(self) -> None:
        interval = max(self.ttl / 3.0, 0.2)
        while not self._stopping.wait(interval):
            responses = self._lease.refresh()
            if not responses or responses[0].TTL <= 0:
                raise LookupError("lease expired")
            value, _ = self._client.get(self.key)
            if value is None or value.decode() != self.value:
                raise LookupError("key deleted or overwritten")

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
                (client or self._connect()).revoke_lease(lease.id)
                ok = True
                log.info("deregistered %s", self.key)
            except Exception as exc:
                log.warning("could not revoke lease of %s (%s); it expires within %ds", self.key, exc, self.ttl)
        self.registered.clear()
        self._drop_client()
        return ok
