"""A cache node composed: its rules (rules.NodeRules) served by the gRPC
front its settings choose, the side fronts (the optional HTTP read API),
the admin service on a unix socket, and its peers (rules.Peers, holding
peering's clients).

Everything a node needs comes in through its constructor (settings and
loaders); there is no process-wide registry, so one process can run several
nodes (the tests do).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import grpc

from .. import addr as addrs
from .. import fronts
from ..cache.group import Loader
from ..fronts import SideFront
from ..fronts.admin import AdminService
from ..fronts.http import http_front
from ..logs import event
from ..pb import admin_pb2_grpc
from ..rules.auth import Authenticator
from ..rules.node_rules import HandoffReport, NodeRules
from ..rules.peers import Peers
from .metrics import NodeMetrics

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

# The fronts served beside the gRPC one, each on a port of its own: one
# factory per protocol, which returns None where the node does not serve it.
# A new protocol front is one line here.
SIDE_FRONTS: tuple[Callable[[Node], SideFront | None], ...] = (http_front,)


class Node:
    def __init__(
        self,
        settings: Settings,
        loaders: Mapping[str, Loader],
        *,
        port: int | None = None,
        admin_address: str | None = None,
        http_port: int | None = None,
        metrics: NodeMetrics | None = None,
        server: str | None = None,
        token: str | None = None,
    ) -> None:
        """`http_port` serves the HTTP read API (None: off, 0: a free port);
        `metrics` is the registry the loaders already report to (worker.py
        wraps them), else a new one; `server` overrides node.server;
        `token` is the cluster's own token (peers present it to each other
        and it may write; worker.py reads it from Layout.token_path())."""
        ns = settings.node
        self.settings = settings
        self.host = ns.host
        self.port = ns.base_port if port is None else port
        self.admin_address = admin_address
        if admin_address is not None:
            _check_admin_address(admin_address)
        self.backend, self.backend_reason = fronts.choose(settings, server)
        self.transport = fronts.create(settings, self.backend, peer_token=token)
        self.peers = Peers(
            self.transport.peer_clients,
            replicas=ns.replicas,
            scheme=ns.ring_hash,
            close_grace=ns.peer_timeout,
            # A peer that left is asked (peeks) and trusted (its handoff) while it may still be handing off.
            peek_window=ns.peek_window,
            departed_grace=ns.handoff_timeout + 1.0,
        )
        self.rules = NodeRules(
            ns,
            settings.groups,
            loaders,
            self.peers,
            framing=self.transport.framing,
            store=self.transport.store,
            auth=Authenticator.from_settings(settings.auth, token),
        )
        self.groups = self.rules.groups
        self.validate = self.rules.validate
        self.http_port = http_port
        self.side_fronts: list[SideFront] = []
        self.stop_requested = asyncio.Event()
        self.stop_drain_timeout: float | None = None
        self._admin: grpc.aio.Server | None = None
        self.metrics = NodeMetrics() if metrics is None else metrics
        self.metrics.attach(self)

    @property
    def addr(self) -> str:
        return self.peers.self_addr

    @property
    def draining(self) -> bool:
        return self.rules.draining

    @property
    def serving(self) -> bool:
        return self.rules.serving

    # Lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        # Peer proofs count from just before the bind: what a squatter on
        # this port caught before then is refused (peer_proofs.py).
        since = time.time()
        proofs = self.rules.auth.proofs
        if proofs is not None and self.port:
            proofs.listening(addrs.join(self.host, self.port), since)
        self.port = await self.transport.start(self.rules, self.host, self.port)
        self.peers.self_addr = addrs.join(self.host, self.port)
        if proofs is not None:
            proofs.listening(self.peers.self_addr, since)
        refused = self.metrics.refused
        self.rules.on_refused = lambda limit: refused.labels(limit).inc()
        limiter = self.transport.limiter
        if limiter is not None:
            for protocol in ("grpc", "http"):
                limiter.on_limited[protocol] = self.metrics.rate_limited.labels(protocol).inc
        if self.admin_address is not None:
            admin = grpc.aio.server()
            admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self), admin)
            admin.add_insecure_port(self.admin_address)
            await admin.start()
            self._admin = admin
            if self.admin_address.startswith("unix:"):
                # Its directory (the runtime dir, 0700) already keeps others
                # out; the socket itself is the owner's alone as well.
                os.chmod(self.admin_address.removeprefix("unix:"), 0o600)
        for make in SIDE_FRONTS:
            if (front := make(self)) is not None:
                await self._start_side(front)
        event(
            log,
            logging.INFO,
            "node serving",
            addr=self.addr,
            groups=",".join(self.groups) or "-",
            server=self.backend,
            why=self.backend_reason,
            tls=_tls_mode(self.settings.tls),
            http=addrs.join(self.host, self.http_api.port) if self.http_api else "off",
        )

    async def _start_side(self, front: SideFront) -> None:
        try:
            await front.start()
        except OSError as exc:
            # A side front is optional: a taken port must not take the
            # gRPC node (and its share of the ring) down with it.
            addr = addrs.join(self.host, front.port)
            event(log, logging.ERROR, f"{front.name} not started", addr=addr, cause=str(exc))
            return
        self.side_fronts.append(front)

    @property
    def http_api(self) -> SideFront | None:
        return next((f for f in self.side_fronts if f.name == "HTTP API"), None)

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; calls in flight get `grace` seconds to finish."""
        for front in reversed(self.side_fronts):
            await front.stop()
        self.side_fronts.clear()
        await self.transport.stop(grace)
        if self._admin is not None:
            await self._admin.stop(0)
        await self.peers.close()

    # Membership ----------------------------------------------------------------

    def set_peers(
        self, peers: list[str], revision: int, leases: Mapping[str, int] | None = None, generation: int = 0
    ) -> bool:
        return self.rules.set_peers(peers, revision, leases, generation)

    def request_stop(self, drain_timeout: float | None = None) -> None:
        """Ask the process that owns this node to stop it gracefully."""
        self.stop_drain_timeout = drain_timeout
        self.stop_requested.set()

    async def drain(self, timeout: float) -> bool:
        """Report NOT_SERVING and wait until a ring without us arrives
        (True), or `timeout` seconds (False)."""
        return await self.rules.drain(timeout)

    async def handoff(self, timeout: float) -> HandoffReport:
        """Hand the main caches to the keys' owners in the ring without us
        (after drain), within `timeout` seconds."""
        return await self.rules.handoff(timeout)

    def stats(self) -> dict:
        return {**self.rules.stats(), "server": self.backend}


def _tls_mode(tls) -> str:
    if not tls.enabled:
        return "off"
    return "mtls" if tls.client_auth else "tls"


def _check_admin_address(address: str) -> None:
    """The admin surface lives on a unix socket or loopback, never elsewhere."""
    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return
    host = address.rpartition(":")[0].strip("[]")
    if not addrs.is_loopback(host):
        raise ValueError(f"admin address {address!r} must be a unix socket or a loopback address")
