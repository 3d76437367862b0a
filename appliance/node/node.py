"""A cache node: groups + data server + admin server + peer picker.

Everything a node needs comes in through its constructor (settings and
loaders); there is no process-wide registry, so one process can run several
nodes (the tests do).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .. import addr as addrs
from .. import tls as tlsmod
from ..cache.group import Group
from ..logs import event
from .metrics import NodeMetrics
from ..pb import admin_pb2_grpc
from . import wire
from .admin import AdminService
from .peers import Peers
from .service import CACHE_SERVICE, PEER_SERVICE, SERVICE, CacheService, GroupCacheService, PeerService

log = logging.getLogger(__name__)

Loader = Callable[[str], Awaitable[bytes]]
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Room for the fixed fields around a key or value in one message.
_MESSAGE_SLACK = 64 * 1024


class Node:
    def __init__(
        self,
        settings,
        loaders: Mapping[str, Loader],
        *,
        port: int | None = None,
        admin_address: str | None = None,
        http_port: int | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        """`http_port` serves the HTTP read API (None: off, 0: a free port);
        `metrics` is the registry the loaders already report to (worker.py
        wraps them), else a new one."""
        ns = settings.node
        self.settings = settings
        self.host = ns.host
        self.port = ns.base_port if port is None else port
        self.admin_address = admin_address
        if admin_address is not None:
            _check_admin_address(admin_address)
        self.addr = addrs.join(self.host, self.port) if self.port else ""
        message_limit = ns.max_value_bytes + _MESSAGE_SLACK
        self.message_options = [
            ("grpc.max_receive_message_length", message_limit),
            ("grpc.max_send_message_length", message_limit),
        ]
        tls = getattr(settings, "tls", None)
        self.peers = Peers(
            replicas=ns.replicas,
            scheme=ns.ring_hash,
            max_wait=ns.peer_timeout,
            channel_options=self.message_options + tlsmod.channel_options(tls),
            credentials=tlsmod.channel_credentials(tls),
        )
        self.http_port = http_port
        self.http_api = None
        missing = set(settings.groups) - set(loaders)
        if missing:
            raise ValueError(f"no loader for group(s): {', '.join(sorted(missing))}")
        self.groups: dict[str, Group] = {
            name: Group(
                name,
                loaders[name],
                cache_bytes=spec.cache_bytes,
                policy=spec.policy,
                ttl=spec.ttl,
                picker=self.peers,
                hot_fraction=ns.hot_cache_fraction,
                mirror_probability=ns.hot_cache_mirror,
                framing=wire.FRAMING,
            )
            for name, spec in settings.groups.items()
        }
        self.health = HealthServicer()
        self.draining = False
        self.stop_requested = asyncio.Event()
        self.stop_drain_timeout: float | None = None
        self._ring_changed = asyncio.Condition()
        self._background: set[asyncio.Task] = set()
        self._server: grpc.aio.Server | None = None
        self._admin: grpc.aio.Server | None = None
        self.metrics = NodeMetrics() if metrics is None else metrics
        self.metrics.attach(self)
        self.buckets = None
        self._data = GroupCacheService(self)
        self.validate = self._data.validate

    # Lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        server = grpc.aio.server(options=self.message_options, interceptors=self._interceptors() or None)
        data = self._data
        self._peer_service = PeerService(self, data)
        server.add_generic_rpc_handlers((data.handler(), CacheService(self, data).handler(), self._peer_service.handler()))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, CACHE_SERVICE, PEER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        credentials = tlsmod.server_credentials(getattr(self.settings, "tls", None))
        if credentials is not None:
            bound = server.add_secure_port(addrs.join(self.host, self.port), credentials)
        else:
            bound = server.add_insecure_port(addrs.join(self.host, self.port))
        self.port = bound
        self.addr = addrs.join(self.host, bound)
        self.peers.self_addr = self.addr
        await server.start()
        self._server = server
        await self.health.set("", _NOT_SERVING)
        await self.health.set(SERVICE, _NOT_SERVING)
        if self.admin_address is not None:
            admin = grpc.aio.server()
            admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self), admin)
            admin.add_insecure_port(self.admin_address)
            await admin.start()
            self._admin = admin
        if self.http_port is not None:
            await self._start_http()
        event(
            log, logging.INFO, "node serving", addr=self.addr, groups=",".join(self.groups) or "-",
            tls=_tls_mode(getattr(self.settings, "tls", None)),
            http=addrs.join(self.host, self.http_api.port) if self.http_api else "off",
        )  # fmt: skip

    def _interceptors(self) -> list:
        ops = getattr(self.settings, "ops", None)
        if ops is None or not ops.rate_limit:
            return []
        from .ratelimit import RateLimitInterceptor, TokenBuckets, TrustedPeers

        self.buckets = TokenBuckets(ops.rate_limit, ops.burst())
        limited = self.metrics.rate_limited.labels("grpc")
        trusted = TrustedPeers(lambda: (self.peers.revision, list(self.peers.ring.nodes)))
        return [RateLimitInterceptor(self.buckets, trusted, limited.inc)]

    async def _start_http(self) -> None:
        from .http_api import HttpApi

        api = HttpApi(
            self,
            self.host,
            self.http_port,
            ssl_context=tlsmod.server_ssl_context(getattr(self.settings, "tls", None)),
            buckets=self.buckets,
        )
        try:
            await api.start()
        except OSError as exc:
            # The HTTP API is optional: a taken port must not take the
            # gRPC node (and its share of the ring) down with it.
            event(log, logging.ERROR, "HTTP API not started", addr=addrs.join(self.host, self.http_port), cause=str(exc))
            return
        self.http_api = api

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; calls in flight get `grace` seconds to finish."""
        if self.http_api is not None:
            await self.http_api.stop()
        if self._server is not None:
            await self._peer_service.close()
            await self._server.stop(grace)
        if self._admin is not None:
            await self._admin.stop(0)
        await self.peers.close()

    # Membership ----------------------------------------------------------------

    def set_peers(self, peers: list[str], revision: int) -> bool:
        if not self.peers.set_peers(peers, revision):
            return False
        event(
            log, logging.INFO, "ring changed", revision=revision, peers=len(self.peers.ring),
            member=str(self.addr in self.peers.ring).lower(),
        )  # fmt: skip
        # Called from sync code: the follow-up runs as a task we keep a
        # reference to (the loop holds tasks only weakly).
        task = asyncio.ensure_future(self._after_ring_change())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def _after_ring_change(self) -> None:
        if not self.draining:
            await self._set_health(_SERVING)
        async with self._ring_changed:
            self._ring_changed.notify_all()

    async def _set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    def request_stop(self, drain_timeout: float | None = None) -> None:
        """Ask the process that owns this node to stop it gracefully."""
        self.stop_drain_timeout = drain_timeout
        self.stop_requested.set()

    async def drain(self, timeout: float) -> bool:
        """Report NOT_SERVING and wait until a ring without us arrives.

        True when it did; False after `timeout` seconds."""
        self.draining = True
        await self._set_health(_NOT_SERVING)

        async def out_of_ring() -> None:
            async with self._ring_changed:
                await self._ring_changed.wait_for(lambda: self.addr not in self.peers.ring)

        try:
            await asyncio.wait_for(out_of_ring(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # Introspection -------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """What health reports: holds a ring and is not draining."""
        return self.peers.revision >= 0 and not self.draining

    def stats(self) -> dict:
        groups = {}
        for name, g in self.groups.items():
            s = g.stats
            groups[name] = {
                **vars(s),
                "hits": s.hits,
                "cache_bytes": g.cache_bytes,
                "main_bytes": g.main.bytes,
                "main_items": len(g.main),
                "main_evictions": g.main.evictions,
                "hot_bytes": g.hot.bytes,
                "hot_items": len(g.hot),
                "hot_evictions": g.hot.evictions,
            }
        return {
            "addr": self.addr,
            "revision": self.peers.revision,
            "peers": list(self.peers.ring.nodes),
            "draining": self.draining,
            "groups": groups,
        }


def _tls_mode(tls) -> str:
    if tls is None or not tls.enabled:
        return "off"
    return "mtls" if tls.client_auth else "tls"


def _check_admin_address(address: str) -> None:
    """The admin surface lives on a unix socket or loopback, never elsewhere."""
    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return
    host = address.rpartition(":")[0].strip("[]")
    if not addrs.is_loopback(host):
        raise ValueError(f"admin address {address!r} must be a unix socket or a loopback address")
