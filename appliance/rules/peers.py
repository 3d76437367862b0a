"""The peer picker: the ring names a key's owner, a client per peer reaches it.

Clients come from `new_client(addr, facts)` (appliance.peering's PeerClients), so this module knows
no RPC library. A peer that re-registers under a new etcd lease is a new
process: its client is replaced, so nothing learned about the old one
(say, that it lacked our services) outlives it.

It also remembers the rings it held before (for `peek_window` seconds after
each was replaced) to name a key's previous owners, which a miss asks
before the origin (appliance.cache.group.PreviousOwners). A process's first
ring counts as a change from that ring without itself: a node that joins,
or comes back after a restart, asks the nodes that held its keys meanwhile.
A peer that left the ring is still asked for `departed_grace` seconds: it
may be a planned stop, still serving while it hands its entries off; one
whose peek failed (it may be dead) is not asked again for `peek_backoff`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from .. import addr as addrs
from ..cache.group import Peer
from ..cache.ring import HashRing

# Previous owners asked per miss, and earlier rings remembered, at most.
MAX_PEEKS = 2
MAX_HISTORY = 8


@dataclasses.dataclass
class PeerFacts:
    """What a node learned about one peer process; it outlives the clients
    made for it while the peer keeps its etcd lease.

    Reads also keep a breaker. A read without an answer from a peer whose
    channel is not connected opens it at once; one whose channel looks up
    may be a slow owner (a slow origin) or a stale connection (a cut link,
    a frozen process), so a health probe asks, and opens it only if that
    gets no answer either. While open, its keys load locally at once
    instead of waiting the peer timeout; a probe (never a client's read)
    asks again after DOWN_MIN_S, doubling to DOWN_MAX_S, and any answer
    closes it.

    `heard_at` is when the peer's server last answered anything (a read, a
    probe): a forwarder whose owner has not answered a read by half the
    caller's deadline keeps waiting only if it heard from the owner since it
    sent that read (GrpcPeerClient.get)."""

    DOWN_MIN_S = 1.0
    DOWN_MAX_S = 4.0

    plain_get_only: bool = False  # no Peer/Forward: a seed Go node, or an older node
    down_for: float = 0.0  # the breaker is open (0: closed), for this long between probes
    down_until: float = 0.0  # the next probe is due then (monotonic seconds)
    probing: bool = False
    heard_at: float = float("-inf")  # the peer's server last answered then (monotonic seconds)

    def read_allowed(self) -> bool:
        return not self.down_for

    def probe_due(self, now: float) -> bool:
        return bool(self.down_for) and not self.probing and now >= self.down_until

    def read_unanswered(self, now: float, connected: bool) -> bool:
        """A read got no answer in time; True: start a probe to tell a slow
        peer from a silent one."""
        if not connected:
            self._open(now)
            return False
        return not self.probing and not self.down_for

    def heard_since(self, when: float) -> bool:
        """Whether the peer's server answered anything at or after `when`."""
        return self.heard_at >= when

    def probed(self, now: float, answered: bool) -> None:
        self.probing = False
        if answered:
            self.read_answered(now)
        elif self.down_for:
            self.down_for = min(self.down_for * 2, self.DOWN_MAX_S)
            self.down_until = now + self.down_for
        else:
            self._open(now)

    def silenced(self, now: float) -> None:
        """A read the engine forwarded got no answer, and the peer's server
        no health check, by the read's first wait (engine/src/forward.rs
        probes as Breaker does): open, as a probe without an answer opens."""
        self._open(now)

    def read_answered(self, now: float | None = None) -> None:
        """Any answer closes the breaker; `now`: when it came (heard_at)."""
        self.down_for, self.down_until = 0.0, 0.0
        if now is not None and now > self.heard_at:
            self.heard_at = now

    def _open(self, now: float) -> None:
        if not self.down_for:
            self.down_for, self.down_until = self.DOWN_MIN_S, now + self.DOWN_MIN_S


class PeerClient(Peer, Protocol):
    """What a node needs of one peer: the Group's Peer calls plus writes."""

    addr: str

    async def set(self, group: str, key: str, value: bytes, ttl: float, timeout: float | None) -> None: ...

    async def remove(self, group: str, key: str, timeout: float | None) -> None: ...

    async def handoff(
        self, source: str, group: str, entries: list[tuple[str, bytes, float]], timeout: float | None
    ) -> tuple[int, int]:
        """Offer (key, value, ttl_left) entries to the peer; (accepted, refused)."""
        ...

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
        peek_window: float = 0.0,
        departed_grace: float = 0.0,
        peek_backoff: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`peek_window` 0 names no previous owners (no peeks)."""
        self.self_addr = ""
        self.replicas = replicas
        self.scheme = scheme
        self.close_grace = close_grace
        self.peek_window = peek_window
        self.departed_grace = departed_grace
        self.peek_backoff = peek_backoff
        self._clock = clock
        self.revision = -1
        self.generation = 0
        self.ring = HashRing((), replicas, scheme)
        self._new_client = new_client
        self._clients: dict[str, PeerClient] = {}
        self._leases: dict[str, int] = {}
        self._facts: dict[str, PeerFacts] = {}
        self._closing: set[asyncio.Task] = set()
        self._history: list[tuple[HashRing, float]] = []  # earlier rings, newest first, and when replaced
        self._departed: dict[str, tuple[PeerClient, float, asyncio.TimerHandle]] = {}  # left the ring lately
        self._peek_down: dict[str, float] = {}  # addr -> no peeks before this time
        self._without: dict[tuple[int, str], HashRing] = {}  # (id of a ring in _history, node) -> ring without it

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

    def facts(self, addr: str) -> PeerFacts | None:
        """What this node knows of the peer at addr (its breaker included)."""
        return self._facts.get(addr)

    def lease(self, addr: str) -> int | None:
        """The etcd lease of addr's registration, where the ring said."""
        return self._leases.get(addr)

    def members(self) -> set[str]:
        """Nodes of the ring, and those that left it within departed_grace."""
        now = self._clock()
        return set(self.ring.nodes) | {a for a, (_, until, _) in self._departed.items() if until > now}

    def ring_without_self(self) -> HashRing:
        """Where this node's keys go when it leaves (its ring once it has)."""
        if self.self_addr not in self.ring:
            return self.ring
        return HashRing([n for n in self.ring.nodes if n != self.self_addr], self.replicas, self.scheme)

    # Previous owners (appliance.cache.group.PreviousOwners) -----------------------

    def peek_candidates(self, key: str) -> list[PeerClient]:
        if not self._history:
            return []
        now = self._clock()
        ours = {self.self_addr, self.ring.owner(key)}
        seen = set(ours)
        out: list[PeerClient] = []
        for ring, replaced in self._history:
            if now - replaced > self.peek_window:
                break  # newest first: the rest are older
            owner = ring.owner(key)
            if owner is None or owner in ours:
                continue  # it was ours then, or did not move
            # The previous owner, then where its keys went when it last left
            # (a restarted owner may not have asked for this one back yet).
            for addr in (owner, self._owner_without(ring, owner, key)):
                if addr is None or addr in seen:
                    continue
                seen.add(addr)
                client = self._askable(addr, now)
                if client is not None:
                    out.append(client)
                    if len(out) >= MAX_PEEKS:
                        return out
        return out

    def _owner_without(self, ring: HashRing, node: str | None, key: str) -> str | None:
        if node is None or len(ring) < 2:
            return None
        smaller = self._without.get((id(ring), node))
        if smaller is None:
            smaller = HashRing([n for n in ring.nodes if n != node], self.replicas, self.scheme)
            self._without[(id(ring), node)] = smaller
        return smaller.owner(key)

    def _askable(self, addr: str, now: float) -> PeerClient | None:
        if self._peek_down.get(addr, 0.0) > now:
            return None
        client = self._clients.get(addr)
        if client is None:
            departed = self._departed.get(addr)
            client = departed[0] if departed is not None and departed[1] > now else None
        return client

    def peek_failed(self, addr: str) -> None:
        # Only a peer that left may be dead; one in the ring holds its lease
        # (a slow answer costs that key a load, not the others their peeks).
        if addr not in self.ring:
            self._peek_down[addr] = self._clock() + self.peek_backoff

    @property
    def version(self) -> tuple[int, int]:
        """(revision, generation) of the ring held: it changes with the ring."""
        return self.revision, self.generation

    def set_peers(
        self, peers: list[str], revision: int, leases: Mapping[str, int] | None = None, generation: int = 0
    ) -> bool:
        """Install a ring; False (and no change) for a stale (revision,
        generation): the controller's later decisions within one etcd
        revision come as higher generations.

        `leases` ({addr: etcd lease id}, where known) tells a restarted peer
        from one that stayed: a changed lease gets a fresh client."""
        if (revision, generation) <= (self.revision, self.generation):
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
            if peer not in self.ring:
                facts.read_answered()  # (re)joined: it registered, so it answers; no breaker carried over
            clients[peer] = client or self._new_client(peer, facts)
        kept = set(map(id, clients.values()))
        dropped = [c for c in self._clients.values() if id(c) not in kept]
        self._remember(ring)
        self.ring, self._clients, self.revision, self.generation = ring, clients, revision, generation
        # Kept after a peer leaves, to tell its next process (a new lease) apart.
        self._leases.update(leases)
        self._peek_down.clear()
        for addr in ring.nodes:
            self._undepart(addr)
        for client in dropped:
            if client.addr in ring:  # replaced: a new process at that address
                self._close_later(client)
            else:
                self._depart(client)
        return True

    def _remember(self, ring: HashRing) -> None:
        """Keep the ring being replaced, when placement changes."""
        if not self.peek_window or set(ring.nodes) == set(self.ring.nodes):
            return
        before = self.ring
        if self.revision < 0:  # this process's first ring: we just joined
            before = HashRing([n for n in ring.nodes if n != self.self_addr], self.replicas, self.scheme)
        now = self._clock()
        self._history.insert(0, (before, now))
        del self._history[MAX_HISTORY:]
        while self._history and now - self._history[-1][1] > self.peek_window:
            self._history.pop()
        kept = {id(r) for r, _ in self._history}
        self._without = {k: v for k, v in self._without.items() if k[0] in kept}

    def _depart(self, client: PeerClient) -> None:
        # Still peeked for a while: a planned stop serves until its handoff is done.
        if self.departed_grace <= 0:
            self._close_later(client)
            return
        self._undepart(client.addr)
        timer = asyncio.get_running_loop().call_later(self.departed_grace, self._undepart, client.addr, client)
        self._departed[client.addr] = (client, self._clock() + self.departed_grace, timer)

    def _undepart(self, addr: str, client: PeerClient | None = None) -> None:
        entry = self._departed.get(addr)
        if entry is None or (client is not None and entry[0] is not client):
            return
        del self._departed[addr]
        entry[2].cancel()
        self._close_later(entry[0])

    def _close_later(self, client: PeerClient) -> None:
        # Calls in flight on the old ring get the peer timeout to finish.
        task = asyncio.ensure_future(client.close(self.close_grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client, _, timer in self._departed.values():
            timer.cancel()
            clients.append(client)
        self._departed.clear()
        await asyncio.gather(*(c.close(0) for c in clients), *self._closing, return_exceptions=True)
