"""What both gRPC backends share: limits, health, the rate limit, and the
maker of the node's peer clients (peering.clients) they choose the library of."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from ..cache.group import Framing
from ..cache.store import Store, StoreFactory
from ..peering.clients import PeerClients, message_options
from ..protocol import framing as wire
from ..protocol.methods import GET_SERVICE
from ..rules.node_rules import message_limit
from ..rules.ratelimit import RateLimiter, TrustedPeers, token_buckets
from .health import Health

if TYPE_CHECKING:
    from ..config import Settings
    from ..rules.node_rules import NodeRules

log = logging.getLogger(__name__)


class Transport(Protocol):
    """How one node is served and how it reaches its peers."""

    name: str
    framing: Framing
    store: StoreFactory
    health: Health
    limiter: RateLimiter | None

    peer_clients: PeerClients  # rules.Peers' new_client

    async def start(self, rules: NodeRules, host: str, port: int) -> int:
        """Serve `rules` on host:port (0: a free port); the port bound."""
        ...

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls, give those in flight `grace` seconds, end streams."""
        ...


class SideFront(Protocol):
    """A front served beside the gRPC one, on a port of its own (the HTTP
    API): node/serving.py's SIDE_FRONTS makes, starts and stops them."""

    name: str  # for the logs
    port: int  # the port asked for until start(), then the port bound

    async def start(self) -> int: ...
    async def stop(self) -> None: ...


class BaseTransport:
    name = "?"
    framing: Framing = wire.FRAMING
    # What the groups keep their entries in (the engine's own: its server reads it).
    store: StoreFactory = Store
    # How a forwarded Get reaches an owner (PeerClients' `forward`).
    forward = "stream"

    def __init__(self, settings: Settings, *, peer_token: str | None = None) -> None:
        """`peer_token`: the cluster's token, proven on every call to a peer."""
        self.settings = settings
        self.message_limit = message_limit(settings.node)
        self.message_options = message_options(settings)
        self.peer_clients = PeerClients(settings, peer_token=peer_token, forward=self.forward)
        self.health = Health((GET_SERVICE,))
        self.limiter: RateLimiter | None = None
        self.rules: NodeRules | None = None

    def _bind(self, rules: NodeRules) -> None:
        self.rules = rules
        rules.on_serving_change = self.health.set
        ops = self.settings.ops
        if ops.rate_limit:
            peers = rules.peers
            trusted = TrustedPeers(lambda: (peers.version, list(peers.ring.nodes)), asyncio.get_running_loop())
            self.limiter = RateLimiter(token_buckets(ops.rate_limit, ops.burst()), trusted)
