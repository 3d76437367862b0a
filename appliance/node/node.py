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
from ..cache.group import Group
from ..pb import admin_pb2_grpc
from .admin import AdminService
from .peers import Peers
from .service import CACHE_SERVICE, SERVICE, CacheService, GroupCacheService

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
    ) -> None:
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
        self.peers = Peers(
            replicas=ns.replicas,
            scheme=ns.ring_hash,
            max_wait=ns.peer_timeout,
            channel_options=self.message_options,
        )
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
            )
            for name, spec in settings.groups.items()
        }
        self.health = HealthServicer()
        self.draining = False
        self.stop_requested = asyncio.Event()
        self.stop_drain_timeout: float | None = None
        self._ring_changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self._admin: grpc.aio.Server | None = None

    # Lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        server = grpc.aio.server(options=self.message_options)
        data = GroupCacheService(self)
        server.add_generic_rpc_handlers((data.handler(), CacheService(self, data).handler()))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, CACHE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
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
        log.info("node %s serving groups %s", self.addr, ", ".join(self.groups) or "(none)")

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; calls in flight get `grace` seconds to finish."""
        if self._server is not None:
            await self._server.stop(grace)
        if self._admin is not None:
            await self._admin.stop(0)
        await self.peers.close()

    # Membership ----------------------------------------------------------------

    def set_peers(self, peers: list[str], revision: int) -> bool:
        if not self.peers.set_peers(peers, revision):
            return False
        log.info(
            "ring revision %d: %d peers%s",
            revision,
            len(self.peers.ring),
            "" if self.addr in self.peers.ring else " (self not in ring)",
        )
        if not self.draining:
            asyncio.ensure_future(self._set_health(_SERVING))
        asyncio.ensure_future(self._notify_ring())
        return True

    async def _notify_ring(self) -> None:
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


def _check_admin_address(address: str) -> None:
    """The admin surface lives on a unix socket or loopback, never elsewhere."""
    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return
    host = address.rpartition(":")[0].strip("[]")
    if not addrs.is_loopback(host):
        raise ValueError(f"admin address {address!r} must be a unix socket or a loopback address")
