"""The maker of a node's peer clients: for each peer, its calls on the
library chosen (grpc.aio, or the engine's own channel) behind a Breaker."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import tls as tlsmod
from ..rules.node_rules import message_limit
from ..rules.peer_proofs import PeerProofs
from ..rules.peers import PeerClient, PeerFacts
from . import engine_channel
from .breaker import Breaker
from .engine_channel import AioEngineChannel
from .peer_client import PEER_CHANNEL_OPTIONS, GrpcPeerClient, channel

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)


def message_options(settings: Settings) -> list[tuple[str, int]]:
    """grpc's message limits for a node: the largest value and a margin."""
    limit = message_limit(settings.node)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


class PeerClients:
    """Called as `new_client(addr, facts)` by rules.Peers.

    `forward`: how Gets reach an owner, "stream" (Peer/Forward) or "unary";
    `library`: "engine" (the engine's client, unary calls only, where it
    is built and can dial as grpc.aio would) or "grpcio". Both may be set
    until the first client is made (bench/forwarded.py compares them)."""

    def __init__(
        self, settings: Settings, *, peer_token: str | None = None, forward: str = "stream", library: str = "grpcio"
    ) -> None:
        """`peer_token`: the cluster's token, proven on every call to a peer."""
        self.settings = settings
        self.forward = forward
        self.library = library
        self._proofs = PeerProofs(peer_token) if peer_token else None
        self._limit = message_limit(settings.node)
        self._options = PEER_CHANNEL_OPTIONS + message_options(settings) + tlsmod.channel_options(settings.tls)
        self._credentials = tlsmod.channel_credentials(settings.tls)
        self._engine_tls: tlsmod.TlsFiles | None = None

    def engine_usable(self) -> str | None:
        """Why the engine's client cannot make this node's calls (None: it
        can); where it can, it is the library from now on."""
        tls = self.settings.tls
        missing = engine_channel.usable()
        if missing is None and tls.enabled:
            if tls.ca is None:
                missing = "tls.ca is not set (the engine's client trusts no system roots)"
            else:
                self._engine_tls = tlsmod.TlsFiles(tls.ca, tls.cert, tls.key)
        if missing:
            log.info("forwards use grpc.aio: %s", missing)
        else:
            self.library = "engine"
        return missing

    def __call__(self, addr: str, facts: PeerFacts) -> PeerClient:
        calls = GrpcPeerClient(
            addr,
            self._channel(addr),
            forward=self.forward,
            facts=facts,
            proofs=self._proofs,
            accept_unproven_plain_get=self.settings.cluster.seed_interop,
        )
        return Breaker(calls, facts, max_wait=self.settings.node.peer_timeout)

    def _channel(self, addr: str):
        # The engine's client makes unary calls only: forwarding over the
        # Peer/Forward stream stays on grpc.aio.
        if self.library == "engine" and self.forward == "unary":
            return AioEngineChannel(
                addr, max_message=self._limit, tls=self._engine_tls, server_name=self.settings.tls.server_name
            )
        return channel(addr, options=self._options, credentials=self._credentials)
