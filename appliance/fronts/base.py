"""What both backends share: limits, peer clients, health, the rate limit."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from .. import tls as tlsmod
from ..cache.group import Framing
from ..cache.store import Store, StoreFactory
from ..peering.breaker import Breaker
from ..peering.peer_client import PEER_CHANNEL_OPTIONS, GrpcPeerClient, channel
from ..protocol import framing as wire
from ..protocol.methods import GET_SERVICE
from ..rules.node_rules import MESSAGE_SLACK
from ..rules.peer_proofs import PeerProofs
from ..rules.peers import PeerClient, PeerFacts
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

    def new_client(self, addr: str, facts: PeerFacts) -> PeerClient: ...

    async def start(self, instance: NodeRules, host: str, port: int) -> int:
        """Serve `instance` on host:port (0: a free port); the port bound."""
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
    # How a forwarded Get reaches an owner (GrpcPeerClient's `forward`).
    forward = "stream"

    def __init__(self, settings: Settings, *, peer_token: str | None = None) -> None:
        """`peer_token`: the cluster's token, proven on every call to a peer."""
        ns = settings.node
        self.settings = settings
        self._proofs = PeerProofs(peer_token) if peer_token else None
        self.message_limit = ns.max_value_bytes + MESSAGE_SLACK
        self.message_options = [
            ("grpc.max_receive_message_length", self.message_limit),
            ("grpc.max_send_message_length", self.message_limit),
        ]
        self._channel_options = PEER_CHANNEL_OPTIONS + self.message_options + tlsmod.channel_options(settings.tls)
        self._credentials = tlsmod.channel_credentials(settings.tls)
        self.health = Health((GET_SERVICE,))
        self.limiter: RateLimiter | None = None
        self.instance: NodeRules | None = None

    def new_client(self, addr: str, facts: PeerFacts) -> PeerClient:
        calls = GrpcPeerClient(
            addr,
            self._peer_channel(addr),
            forward=self.forward,
            facts=facts,
            proofs=self._proofs,
            accept_unproven_plain_get=self.settings.cluster.seed_interop,
        )
        return Breaker(calls, facts, max_wait=self.settings.node.peer_timeout)

    def _peer_channel(self, addr: str):
        """The channel a peer client calls through: grpc.aio's here."""
        return channel(addr, options=self._channel_options, credentials=self._credentials)

    def _bind(self, instance: NodeRules) -> None:
        self.instance = instance
        instance.on_serving_change = self.health.set
        ops = self.settings.ops
        if ops.rate_limit:
            peers = instance.peers
            trusted = TrustedPeers(lambda: (peers.version, list(peers.ring.nodes)), asyncio.get_running_loop())
            self.limiter = RateLimiter(token_buckets(ops.rate_limit, ops.burst()), trusted)
