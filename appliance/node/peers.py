"""The peer picker: the ring names a key's owner, a client per peer reaches it.

Clients come from the transport (`new_client(addr)`), so this module knows
no RPC library. A peer that re-registers under a new etcd lease is a new
process: its client is replaced, so nothing learned about the old one
(say, that it lacked our services) outlives it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable, Mapping, Protocol

from .. import addr as addrs
from ..cache.group import Peer
from ..cache.ring import HashRing


@dataclasses.dataclass
class PeerFacts:
    """What a node learned about one peer process; it outlives the clients
    made for it while the peer keeps its etcd lease."""

    plain_get_only: bool = False  # no Peer/Forward: a seed Go node, or an older node


class PeerClient(Peer, Protocol):
    """What a node needs of one peer: the Group's Peer calls plus writes."""

    addr: str

    async def set(self, group: str, key: str, value: bytes, ttl: float, timeout: float | None) -> None: ...

    async def remove(self, group: str, key: str, timeout: float | None) -> None: ...

    async def close(self, grace: float | None = None) -> None:
        """Let calls in flight finish for `grace` seconds, then release it."""
        ...


class Peers:
    """PeerPicker of one node. set_peers swaps ring and clients atomically:
    a request that already picked its owner keeps the client it picked."""

    def __init__(
        self,
        new_client: Callable[[str, PeerFacts], PeerClient],
        *,
        replicas: int = 50,
        scheme: str = "seed",
        close_grace: float = 5.0,
    ) -> None:
        self.self_addr = ""
        self.replicas = replicas
        self.scheme = scheme
        self.close_grace = close_grace
        self.revision = -1
        self.ring = HashRing((), replicas, scheme)
        self._new_client = new_client
        self._clients: dict[str, PeerClient] = {}
        self._leases: dict[str, int] = {}
        self._facts: dict[str, PeerFacts] = {}
        self._closing: set[asyncio.Task] = set()

    def pick(self, key: str) -> PeerClient | None:
        owner = self.ring.owner(key)
        if owner is None or owner == self.self_addr:
            return None
        return self._clients.get(owner)

    def owner(self, key: str) -> str | None:
        return self.ring.owner(key)

    def client(self, addr: str) -> PeerClient | None:
        return self._clients.get(addr)

    def clients(self) -> list[PeerClient]:
        return list(self._clients.values())

    def lease(self, addr: str) -> int | None:
        """The etcd lease of addr's registration, where the ring said."""
        return self._leases.get(addr)

    def set_peers(self, peers: list[str], revision: int, leases: Mapping[str, int] | None = None) -> bool:
        """Install a ring; False (and no change) for a stale revision.

        `leases` ({addr: etcd lease id}, where known) tells a restarted peer
        from one that stayed: a changed lease gets a fresh client."""
        if revision <= self.revision:
            return False
        for peer in peers:
            addrs.split(peer)  # raises ValueError naming the bad entry
        leases = dict(leases or {})
        ring = HashRing(peers, self.replicas, self.scheme)
        clients = {}
        for peer in ring.nodes:
            if peer == self.self_addr:
                continue
            client = self._clients.get(peer)
            known, lease = self._leases.get(peer), leases.get(peer)
            if lease is not None and known is not None and known != lease:
                client = None  # a new process at the same address: learn it anew
                self._facts.pop(peer, None)
            facts = self._facts.setdefault(peer, PeerFacts())
            clients[peer] = client or self._new_client(peer, facts)
        kept = set(map(id, clients.values()))
        dropped = [c for c in self._clients.values() if id(c) not in kept]
        self.ring, self._clients, self.revision = ring, clients, revision
        # Kept after a peer leaves, to tell its next process (a new lease) apart.
        self._leases.update(leases)
        for client in dropped:
            self._close_later(client)
        return True

    def _close_later(self, client: PeerClient) -> None:
        # Calls in flight on the old ring get the peer timeout to finish.
        task = asyncio.ensure_future(client.close(self.close_grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        await asyncio.gather(*(c.close(0) for c in clients.values()), *self._closing, return_exceptions=True)
