"""A group: one cache namespace with a loader, as in golang/groupcache.

A node keeps two stores per group. The main cache holds keys this node owns
(it loaded them from the origin). The hot cache mirrors a few popular keys
owned by other nodes, so that a hot key does not cost a network hop every
time. Both share one byte budget; the hot cache gets a bounded share.

I/O comes in from outside as two callables: the loader (the origin) and a
peer picker (the ring plus clients). Nothing here touches the network.

Membership changes keep the cache warm in two ways, both fenced: `offer`
takes an entry another node handed off before it stopped, and a miss that
would load from the origin first peeks at the key's previous owners (after
a ring change; `previous`). Neither value is kept if this node saw the key
removed or set lately (Tombstones), holds it already, or is loading it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from .errors import CacheError, KeyNotFound, PeerError
from .promoter import OwnedHotKeys, Promoter, RatePromoter
from .singleflight import SingleFlight
from .store import Entry, Store, StoreFactory, entry_size
from .tombstones import Tombstones

Loader = Callable[[str], Awaitable[bytes]]


class Framing(Protocol):
    """How a value is kept: behind a prefix that turns it into the wire form
    a server can send as is (a hit then copies nothing of the value's size)."""

    def prefix(self, value: bytes) -> bytes: ...

    def offset(self, data: bytes) -> int:
        """Where the value starts in framed data."""
        ...


class NoFraming:
    def prefix(self, value: bytes) -> bytes:
        return b""

    def offset(self, data: bytes) -> int:
        return 0


class Peer(Protocol):
    addr: str

    async def get(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float]:
        """The owner's value, framed, and its remaining TTL in seconds (0 = none).

        Raises PeerError when the owner cannot answer in time; KeyNotFound
        and OriginError are the owner's authoritative answers."""
        ...

    async def get_many(
        self, group: str, keys: list[str], timeout: float | None
    ) -> dict[str, tuple[bytes, float] | CacheError]:
        """Many keys in one call: per key, (value, ttl) or the owner's error.

        Raises PeerError when the call as a whole fails."""
        ...

    async def peek(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float] | None:
        """The peer's main-cache entry, framed, and its remaining TTL; None
        when it holds none. Never loads. Raises PeerError."""
        ...


class PeerPicker(Protocol):
    def pick(self, key: str) -> Peer | None:
        """The owner of key, or None when this node owns it."""
        ...


class PreviousOwners(Protocol):
    """Who owned a key before the last ring changes (appliance.rules.peers)."""

    def peek_candidates(self, key: str) -> Sequence[Peer]:
        """Live previous owners of key to ask, most recent first; [] when
        the key did not move lately."""
        ...

    def peek_failed(self, addr: str) -> None:
        """A peek at addr failed: do not ask it again for a while."""
        ...


@dataclasses.dataclass
class Stats:
    gets: int = 0  # every Get, local or forwarded
    main_hits: int = 0
    hot_hits: int = 0
    loads: int = 0  # gets that missed both caches
    loads_deduped: int = 0  # loads that ran after singleflight
    peer_loads: int = 0  # values fetched from the owner
    peer_errors: int = 0  # owner unreachable: loaded locally instead
    local_loads: int = 0  # origin loads that returned a value
    local_load_errs: int = 0  # origin loads that failed (not NOT_FOUND)
    not_found: int = 0  # origin said the key does not exist
    server_requests: int = 0  # gets forwarded here by peers
    # Peeks this node made at previous owners instead of loading.
    peek_hits: int = 0  # a previous owner had it: stored, no origin load
    peek_misses: int = 0  # it had none
    peek_errors: int = 0  # it did not answer in time
    peek_refused: int = 0  # it had one, but a Remove or Set came meanwhile
    # Peeks this node answered as a previous owner.
    peeks_served_hits: int = 0
    peeks_served_misses: int = 0
    # Entries handed to this node by stopping peers.
    handoff_in_accepted: int = 0
    handoff_in_accepted_bytes: int = 0
    handoff_in_refused: int = 0  # it knew better: tombstone, own entry, load in flight
    handoff_in_refused_bytes: int = 0
    # Entries this node handed off when it stopped.
    handoff_out_accepted: int = 0
    handoff_out_accepted_bytes: int = 0
    handoff_out_refused: int = 0
    handoff_out_refused_bytes: int = 0
    handoff_out_failed: int = 0  # sent, but the call failed (peer gone, draining, too slow)
    handoff_out_failed_bytes: int = 0
    handoff_out_cut: int = 0  # not sent: past handoff_bytes or handoff_timeout
    handoff_out_cut_bytes: int = 0

    @property
    def hits(self) -> int:
        return self.main_hits + self.hot_hits


class _Fence:
    """A flight's claim on a key: only the flight holding the key's current
    fence may fill the cache with what it got. `kind`: "load" (from the
    origin, as the owner), "peek" (at a previous owner) or "fetch" (from the
    owner, as a non-owner: a hot copy at most)."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


class Group:
    def __init__(
        self,
        name: str,
        loader: Loader,
        *,
        cache_bytes: int,
        policy: str = "lru",
        ttl: float = 0.0,
        picker: PeerPicker | None = None,
        hot_fraction: float = 0.125,
        promoter: Promoter | None = None,
        clock: Callable[[], float] = time.monotonic,
        framing: Framing | None = None,
        previous: PreviousOwners | None = None,
        peek_timeout: float = 0.25,
        tombstone_window: float = 0.0,
        store: StoreFactory = Store,
    ) -> None:
        """`previous` enables peeks at previous owners (each key's peeks get
        `peek_timeout` seconds in all); `tombstone_window` is how long a
        Remove or Set refuses handed-off and peeked values (see Tombstones);
        `store` makes the main and hot stores (the engine's keeps their
        bytes where its server answers hits without us: see absorb)."""
        if not 0 <= hot_fraction < 1:
            raise ValueError("hot_fraction must be in [0, 1)")
        self.name = name
        self.loader = loader
        self.picker = picker
        self.cache_bytes = cache_bytes
        self.ttl = ttl
        self.hot_fraction = hot_fraction
        # Which fetched values get a hot copy: by request rate unless told.
        self.promoter: Promoter = promoter if promoter is not None else RatePromoter(clock=clock)
        # Which of our own keys are hot (replies to clients say so).
        self.owned_hot = OwnedHotKeys(clock=clock)
        self.main = store(policy, cache_bytes, clock)
        self.hot = store(policy, int(cache_bytes * hot_fraction), clock)
        self._stats = Stats()
        # Takes what a server answered from the stores without us, and
        # passes it to absorb(); called before the counters are read.
        self.collect: Callable[[], None] | None = None
        self.framing = framing or NoFraming()
        self._clock = clock
        self.previous = previous
        self.peek_timeout = peek_timeout
        self._tombstones = Tombstones(tombstone_window, clock)
        # Route flights may forward to a peer; load flights only hit the
        # origin. Forwarded requests join load flights only, so two nodes
        # whose rings disagree never wait on each other in a cycle.
        self._route: SingleFlight[str, Entry] = SingleFlight()
        self._load: SingleFlight[str, Entry] = SingleFlight()
        # key -> fence of the flight allowed to fill the cache; Remove and
        # Set revoke it so an in-flight load cannot bring back old data.
        self._fences: dict[str, _Fence] = {}

    @property
    def stats(self) -> Stats:
        """The counters, with the hits a server answered by itself."""
        if self.collect is not None:
            self.collect()
        return self._stats

    def absorb(
        self,
        gets: int,
        main_hits: int,
        hot_hits: int,
        server_requests: int = 0,
        owned: Sequence[tuple[str, int]] = (),
        seen: Sequence[tuple[str, int]] = (),
        forward_gets: int = 0,
        fetches: int = 0,
        peer_loads: int = 0,
    ) -> None:
        """Gets a server answered without lookup(): hits from the stores
        (`server_requests`: those a peer forwarded), with `owned` (key,
        counted main hits: 1 in owned_hot.every) for the owner's hot keys,
        and `seen` (key, hot-cache hits and forwarded misses) for the
        promoter; and misses it forwards to their owners itself
        (`forward_gets`, counted as lookup() counts a miss, as they arrive;
        less those it handed back), in `fetches` calls (counted as
        _route_load counts one), `peer_loads` of which brought a value."""
        stats = self._stats
        stats.gets += gets + forward_gets
        stats.loads += forward_gets
        stats.loads_deduped += fetches
        stats.peer_loads += peer_loads
        stats.main_hits += main_hits
        stats.hot_hits += hot_hits
        stats.server_requests += server_requests
        for key, times in owned:
            self.owned_hot.counted(key, times)
        for key, times in seen:
            self.promoter.seen(key, times)

    # Public API --------------------------------------------------------------

    async def get(self, key: str, *, forwarded: bool = False, timeout: float | None = None) -> Entry:
        """Value of key. `forwarded` marks a request a peer sent to us as the
        owner: serve it here whatever our ring says."""
        entry = self.lookup(key, forwarded)
        if entry is not None:
            return entry
        return await self.fill(key, forwarded=forwarded, timeout=timeout)

    async def fill(self, key: str, *, forwarded: bool = False, timeout: float | None = None) -> Entry:
        """The miss path of get(), after lookup() counted the Get and missed:
        from the owner, or loaded here. A server's fast path answers hits
        with lookup() alone and awaits this only for misses."""
        if forwarded:
            return await self._load.do(key, lambda: self._load_as_owner(key))
        return await self._route.do(key, lambda: self._route_load(key, timeout))

    async def get_many(
        self, keys: list[str], *, forwarded: bool = False, timeout: float | None = None
    ) -> list[Entry | CacheError]:
        """Entries (or the error for that key) in the order of keys.

        Misses owned elsewhere go to each owner in one call; every key still
        has its own singleflight, shared with plain Gets."""
        results: list[Entry | CacheError | None] = [None] * len(keys)
        misses: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            results[i] = self.lookup(key, forwarded)
            if results[i] is None:
                misses.setdefault(key, []).append(i)
        flights: dict[str, asyncio.Future] = {}
        batches: dict[str, tuple[Peer, list[str]]] = {}
        for key in misses:
            if forwarded:
                flights[key] = asyncio.ensure_future(self._load.do(key, functools.partial(self._load_as_owner, key)))
                continue
            peer = None
            if self.picker is not None and not self._route.in_flight(key):
                peer = self.picker.pick(key)
            if peer is None:
                flights[key] = asyncio.ensure_future(
                    self._route.do(key, functools.partial(self._route_load, key, timeout))
                )
            else:
                batches.setdefault(peer.addr, (peer, []))[1].append(key)
        for peer, batch in batches.values():
            fetch = asyncio.ensure_future(peer.get_many(self.name, batch, timeout))
            fetch.add_done_callback(lambda f: f.cancelled() or f.exception())
            for key in batch:
                flights[key] = asyncio.ensure_future(
                    self._route.do(key, functools.partial(self._from_batch, key, fetch))
                )
        outcomes = await asyncio.gather(*flights.values(), return_exceptions=True)
        for key, outcome in zip(flights, outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, CacheError):
                raise outcome
            for i in misses[key]:
                results[i] = outcome
        return results  # type: ignore[return-value]

    def lookup(self, key: str, forwarded: bool = False) -> Entry | None:
        """Count one Get and answer it from the caches when they can (None:
        a miss, counted as a load; fill() serves it). Never suspends."""
        stats = self._stats
        stats.gets += 1
        if forwarded:
            stats.server_requests += 1
        entry = self.main.get(key)
        if entry is not None:
            stats.main_hits += 1
            self.owned_hot.hit(key)
            return entry
        self.promoter.seen(key)
        entry = self.hot.get(key)
        if entry is not None:
            stats.hot_hits += 1
            return entry
        stats.loads += 1
        return None

    def peek(self, key: str) -> Entry | None:
        """Cached entry without loading or counting."""
        return self.main.get(key) or self.hot.get(key)

    def remove(self, key: str) -> bool:
        """Drop key from both caches and stop in-flight loads, peeks and
        handoffs from caching it."""
        self._tombstones.add(key)
        self._fences.pop(key, None)
        self._route.forget(key)
        self._load.forget(key)
        removed_main = self.main.remove(key)
        removed_hot = self.hot.remove(key)
        return removed_main or removed_hot

    def set(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        """Write through as the owner; the hot copy (if any) is dropped."""
        self.remove(key)
        data, offset = self._frame(value)
        return self._populate(self.main, key, data, self._expiry(ttl), offset)

    # Handoff -------------------------------------------------------------------

    def handoff_entries(self) -> list[tuple[str, Entry]]:
        """The main cache, most valuable first (lru: most recently used),
        for a stopping node to hand to the keys' new owners."""
        return self.main.ranked()

    def offer(self, key: str, value: bytes, ttl_left: float) -> bool:
        """A handed-off entry: another node's main-cache value with its
        remaining TTL (0: none). Kept in the main cache unless this node may
        know better: a Remove or Set of the key seen lately, an entry of its
        own, or an origin load in flight (its value is at least as new). A
        peek in flight asks the same node that sent this, and may fail as it
        stops; a fetch from the owner in flight asks the old owner as a
        non-owner and keeps at most a hot copy: the entry is kept for both
        (else the stopping owner's key is lost once it exits)."""
        stats = self._stats
        # A flight not started yet checks the caches first: it finds this.
        fence = self._fences.get(key)
        loading = fence is not None and fence.kind == "load"
        if key in self._tombstones or loading or self.main.get(key) is not None:
            stats.handoff_in_refused += 1
            stats.handoff_in_refused_bytes += entry_size(key, value)
            return False
        data, offset = self._frame(value)
        self.hot.remove(key)  # the main copy is at least as new
        if not self._populate(self.main, key, data, self._carried_expiry(ttl_left), offset):
            stats.handoff_in_refused += 1
            stats.handoff_in_refused_bytes += entry_size(key, value)
            return False
        stats.handoff_in_accepted += 1
        stats.handoff_in_accepted_bytes += entry_size(key, value)
        return True

    # Flights -----------------------------------------------------------------

    async def _route_load(self, key: str, timeout: float | None) -> Entry:
        entry = self.peek(key)  # filled while we waited to become leader
        if entry is not None:
            return entry
        peer = self.picker.pick(key) if self.picker is not None else None
        if peer is None:
            return await self._load.do(key, lambda: self._load_as_owner(key))
        self._stats.loads_deduped += 1
        fence = self._fence(key, "fetch")
        try:
            try:
                value, ttl_left = await peer.get(self.name, key, timeout)
            except PeerError:
                pass
            else:
                return self._from_peer(key, value, ttl_left, fence)
        finally:
            self._unfence(key, fence)
        return await self._owner_failed(key)

    async def _from_batch(self, key: str, fetch: asyncio.Future) -> Entry:
        self._stats.loads_deduped += 1
        fence = self._fence(key, "fetch")
        try:
            try:
                outcome = (await asyncio.shield(fetch))[key]
            except PeerError:
                outcome = None
            if outcome is None or isinstance(outcome, PeerError):
                self._unfence(key, fence)
                return await self._owner_failed(key)
            if isinstance(outcome, CacheError):
                raise outcome
            value, ttl_left = outcome
            return self._from_peer(key, self._frame(value)[0], ttl_left, fence)
        finally:
            self._unfence(key, fence)

    async def _owner_failed(self, key: str) -> Entry:
        # The owner is down or slow: the client still gets its value, but
        # we are not the owner, so nothing is cached.
        self._stats.peer_errors += 1
        data, offset = self._frame(await self._load_origin(key))
        return Entry(data, 0.0, 0, offset)

    def _from_peer(self, key: str, data: bytes, ttl_left: float, fence: _Fence) -> Entry:
        """An owner's framed value."""
        self._stats.peer_loads += 1
        expires = self._carried_expiry(ttl_left)
        offset = self.framing.offset(data)
        # No hot copy of a key handed to us meanwhile: the main one serves.
        if (
            self._fences.get(key) is fence
            and key not in self.main
            and self._admit_hot(key, entry_size(key, data) - offset)
        ):
            self._populate(self.hot, key, data, expires, offset)
        return Entry(data, expires, 0, offset)

    def _admit_hot(self, key: str, size: int) -> bool:
        hot = self.hot
        if hot.fits(size):
            return self.promoter.admit(key, None, room=True)
        return self.promoter.admit(key, hot.victim(size))

    async def _load_as_owner(self, key: str) -> Entry:
        entry = self.main.get(key)
        if entry is not None:
            return entry
        self._stats.loads_deduped += 1
        entry = await self._peek_previous(key) or self.main.get(key)  # or handed to us meanwhile
        if entry is not None:
            return entry
        fence = self._fence(key, "load")
        try:
            data, offset = self._frame(await self._load_origin(key))
            expires = self._expiry(None)
            if self._fences.get(key) is fence:
                self._populate(self.main, key, data, expires, offset)
            return Entry(data, expires, 0, offset)
        finally:
            self._unfence(key, fence)

    async def _peek_previous(self, key: str) -> Entry | None:
        """The key's value from a previous owner that still holds it, kept
        as ours; None: load it from the origin. A Remove or Set of the key
        seen lately, or arriving during the peek, voids the peeked value."""
        previous = self.previous
        if previous is None or key in self._tombstones:
            return None
        candidates = previous.peek_candidates(key)
        if not candidates:
            return None
        stats = self._stats
        fence = self._fence(key, "peek")
        found = None
        deadline = self._clock() + self.peek_timeout
        try:
            for peer in candidates:
                left = deadline - self._clock()
                if left <= 0:
                    break
                try:
                    found = await peer.peek(self.name, key, left)
                except CacheError:
                    stats.peek_errors += 1
                    previous.peek_failed(peer.addr)
                    continue
                if found is not None:
                    break
                stats.peek_misses += 1
        finally:
            ours = self._fences.get(key) is fence
            self._unfence(key, fence)
        if found is None:
            return None
        if not ours:
            stats.peek_refused += 1
            return self.main.get(key)  # a Set may have stored the new value
        data, ttl_left = found
        try:
            offset = self.framing.offset(data)
        except ValueError:  # not a value we can keep
            stats.peek_errors += 1
            return None
        expires = self._carried_expiry(ttl_left)
        self._populate(self.main, key, data, expires, offset)
        stats.peek_hits += 1
        return Entry(data, expires, 0, offset)

    async def _load_origin(self, key: str) -> bytes:
        try:
            value = await self.loader(key)
        except KeyNotFound:
            self._stats.not_found += 1
            raise
        except Exception:
            self._stats.local_load_errs += 1
            raise
        self._stats.local_loads += 1
        return value

    # Cache bookkeeping -------------------------------------------------------

    def _frame(self, value: bytes) -> tuple[bytes, int]:
        prefix = self.framing.prefix(value)
        return (prefix + value if prefix else value), len(prefix)

    def _expiry(self, ttl: float | None) -> float:
        ttl = self.ttl if ttl is None else ttl
        return self._clock() + ttl if ttl > 0 else 0.0

    def _carried_expiry(self, ttl_left: float) -> float:
        """Expiry of a value another node holds with ttl_left seconds left
        (0: none): never later than there, nor than our group's ttl."""
        expires = self._expiry(None)
        if ttl_left:
            carried = self._clock() + ttl_left
            expires = min(expires, carried) if expires else carried
        return expires

    def _populate(self, store: Store, key: str, data: bytes, expires: float, offset: int = 0) -> bool:
        stored = store.set(key, data, expires, offset)
        # One budget for both stores: trim the hot cache while it holds
        # more than its share of what is in use, else the main cache.
        main, hot = self.main, self.hot
        share = self.hot_fraction / (1 - self.hot_fraction)
        while main.bytes + hot.bytes > self.cache_bytes:
            victim = hot if hot.bytes and hot.bytes > main.bytes * share else main
            if not victim.evict_one():
                break
        return stored

    def _fence(self, key: str, kind: str) -> _Fence:
        token = self._fences[key] = _Fence(kind)
        return token

    def _unfence(self, key: str, token: _Fence) -> None:
        if self._fences.get(key) is token:
            del self._fences[key]
