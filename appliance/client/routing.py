"""What Client and AsyncClient share, with no I/O and no gRPC: the calls'
requests and replies, the ring, which node each try goes to within one
deadline, and the bookkeeping of one channel per peer."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from .. import addr as addrs
from ..cache import errors
from ..cache.promoter import RatePromoter
from ..cache.ring import HashRing
from ..pb import cache_pb2, groupcache_pb2
from ..protocol.metadata import HOT
from ..protocol.status import error_of

# The owner, then up to two other nodes: any node can serve any key.
MAX_TRIES = 3
# A client reads the trailers of one Get in this many (for hot-key hints).
LISTEN_EVERY = 8


@dataclass(frozen=True)
class Method:
    path: str
    request: type[Message]
    response: type[Message]


# A Pool's methods entry on the engine's channels: get_value(group, key,
# metadata, timeout) -> the value (bytes) or the failed outcome (code,
# message, reply, trailers); on the asyncio channel a future of the
# outcome, with the value as its reply.
GET_VALUE = "value of a Get"
GET = Method("/groupcachepb.GroupCache/Get", groupcache_pb2.GetRequest, groupcache_pb2.GetResponse)
GET_MANY = Method("/appliance.cache.Cache/GetMany", cache_pb2.GetManyRequest, cache_pb2.GetManyResponse)
SET = Method("/appliance.cache.Cache/Set", cache_pb2.SetRequest, cache_pb2.ChangeResponse)
REMOVE = Method("/appliance.cache.Cache/Remove", cache_pb2.RemoveRequest, cache_pb2.ChangeResponse)
METHODS = (GET, GET_MANY, SET, REMOVE)


def _same(reply: Any) -> Any:
    return reply


@dataclass(frozen=True)
class Op:
    """One call: the method, the key that picks its node, the request, and
    what the caller gets from the reply."""

    method: Method
    key: str
    request: Message
    reply: Callable[[Any], Any] = _same


# Requests --------------------------------------------------------------------


def checked_str(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value


def get_op(group: str, key: str) -> Op:
    request = groupcache_pb2.GetRequest(group=checked_str("group", group), key=checked_str("key", key))
    return Op(GET, key, request, lambda reply: reply.value)


def set_op(group: str, key: str, value: bytes, ttl: float) -> Op:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"value must be bytes, got {type(value).__name__} (encode text first)")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl >= 0:
        raise ValueError(f"ttl must be a number of seconds >= 0 (0: the group's ttl), got {ttl!r}")
    request = cache_pb2.SetRequest(
        group=checked_str("group", group), key=checked_str("key", key), value=bytes(value), ttl=ttl
    )
    return Op(SET, key, request)


def remove_op(group: str, key: str) -> Op:
    return Op(REMOVE, key, cache_pb2.RemoveRequest(group=checked_str("group", group), key=checked_str("key", key)))


def get_many_ops(ring: HashRing, group: str, keys: Iterable[str]) -> list[Op]:
    """One GetMany per owner, each routed by its first key."""
    if isinstance(keys, (str, bytes)):
        raise TypeError("keys must be a list of str, not a single " + type(keys).__name__)
    checked_str("group", group)
    by_owner: dict[str | None, list[str]] = {}
    for key in dict.fromkeys(keys):
        by_owner.setdefault(ring.owner(checked_str("each key", key)), []).append(key)
    return [
        Op(GET_MANY, batch[0], cache_pb2.GetManyRequest(group=group, keys=batch), _found) for batch in by_owner.values()
    ]


def _found(reply: cache_pb2.GetManyResponse) -> dict[str, bytes]:
    """{key: value} of the keys that exist; any other per-key error raises."""
    found = {}
    for r in reply.results:
        if r.code == 0:
            found[r.key] = r.value
            continue
        error = error_of(r.code, r.error)
        if not isinstance(error, errors.KeyNotFound):
            raise error
    return found


def merge(replies: Iterable[dict[str, bytes]]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for reply in replies:
        found.update(reply)
    return found


# The ring ----------------------------------------------------------------------


def peer_list(peers: Iterable[str]) -> list[str]:
    """Checked "host:port" names, sorted and without repeats."""
    if isinstance(peers, (str, bytes)):
        raise TypeError(f"peers must be a list of 'host:port' names, not a single {type(peers).__name__}")
    peers = list(peers)
    for p in peers:
        addrs.split(p)
    return sorted(set(peers))


class Router:
    """The ring a client routes by, replaced whole on each change."""

    def __init__(self, replicas: int, scheme: str, hot: HotKeys | None = None) -> None:
        self.ring = HashRing((), replicas, scheme)  # checks replicas and scheme
        self.hot = hot
        self.revision = -1  # of the etcd read the ring came from (-1: none)
        self._listen_turn = itertools.count()
        self._lock = threading.Lock()

    def install(self, peers: Iterable[str], revision: int | None = None, *, force: bool = False) -> list[str] | None:
        """Use a new peer list; the peers that left it, or None when nothing
        changed. A revision not newer than the ring's is ignored unless
        `force` (a follower's reads come in order: they are the truth)."""
        nodes = peer_list(peers)
        with self._lock:
            if revision is not None:
                if revision <= self.revision and not force:
                    return None
                self.revision = revision
            ring = HashRing(nodes, self.ring.replicas, self.ring.scheme)
            if ring == self.ring:
                return None
            departed = sorted(set(self.ring.nodes) - set(nodes))
            self.ring = ring
            return departed

    def attempts(self, key: str, deadline: float, first: str | None = None) -> Attempts:
        return Attempts(self, key, deadline, first)

    def listens(self, op: Op) -> bool:
        """Whether to read this call's trailers for a hot-key hint: one Get
        in LISTEN_EVERY (reading them costs a sync call about 12% more; an
        owner says it on every reply while the key stays hot)."""
        return self.hot is not None and op.method is GET and next(self._listen_turn) % LISTEN_EVERY == 0

    def first_get(self, group: str, key: str) -> str | None:
        """Where a Get's first try goes when its trailers need no reading
        (a hot key's next node in turn, else its owner), counting the read
        as plan() does; None: it takes plan() (no ring, or this Get listens
        for a hot-key hint)."""
        ring, hot = self.ring, self.hot
        if hot is None:
            return ring.owner(key)
        if next(self._listen_turn) % LISTEN_EVERY == 0:
            return None
        first = hot.first_try(ring, f"{group}\0{key}")
        return first if first in ring else ring.owner(key)

    def heard(self, op: Op, trailing: Iterable[tuple[str, Any]] | None) -> None:
        """A Get's reply metadata: note the owner's hot-key hint."""
        if self.hot is None or op.method is not GET or not trailing:
            return
        for name, value in trailing:
            if name == HOT[0] and value == HOT[1]:
                self.hot.hinted(f"{getattr(op.request, 'group', '')}\0{op.key}")
                return

    def plan(self, op: Op, deadline: float) -> Attempts:
        """The tries of `op`: a hot key's Get starts at the next node in turn."""
        first = None
        if self.hot is not None and op.method in (GET, SET, REMOVE):
            name = f"{getattr(op.request, 'group', '')}\0{op.key}"
            if op.method is GET:
                first = self.hot.first_try(self.ring, name)
            else:
                self.hot.wrote(name)
        return Attempts(self, op.key, deadline, first)


class HotKeys:
    """Which keys this client reads often enough to spread: the first try
    of a hot key's Get goes to the ring's nodes in turn, not always to its
    owner, so each node's hot cache serves it (rate promotion keeps a copy
    there). A Set or Remove at the owner drops those copies, as it does for
    any hot copy, so reads keep the hot cache's guarantees. A key is hot
    when this client reads it often, or for `hint_s` seconds after its
    owner said so (`x-groupcache-hot` on a reply): the owner sees every
    client's reads, so a key many clients each read a little is spread too."""

    # A key is hot from about 3 Gets a second by this client (a decayed count
    # of 4 at a half-life of 1 s): at 16 (11 Gets/s) the busiest of 12
    # workers answered 1.34x the mean under Zipf 1.1 (bench/skew.py spread),
    # at 4 1.16x, for 5% of Gets forwarded while copies form.
    def __init__(
        self,
        threshold: float = 4.0,
        half_life: float = 1.0,
        capacity: int = 4096,
        hint_s: float = 2.0,
        clock=time.monotonic,
    ):
        self.threshold = threshold
        self.hint_s = hint_s
        self._clock = clock
        self._rates = RatePromoter(half_life=half_life, capacity=capacity, clock=clock)
        self._hinted: dict[str, float] = {}  # key -> until when its owner's hint holds
        self._capacity = capacity
        self._turn = itertools.count()
        self._lock = threading.Lock()  # a Client may be shared by threads

    def first_try(self, ring: HashRing, key: str) -> str | None:
        """Count one Get of `key`; the node to ask first when it is hot (None: its owner)."""
        with self._lock:
            self._rates.seen(key)
            if len(ring) < 2:
                return None
            if self._rates.rate(key) < self.threshold:
                until = self._hinted.get(key)
                if until is None:
                    return None
                if until <= self._clock():
                    del self._hinted[key]
                    return None
            nodes = ring.nodes
            return nodes[next(self._turn) % len(nodes)]

    def hinted(self, key: str) -> None:
        """Its owner said `key` is hot: spread its reads for a while."""
        with self._lock:
            hinted = self._hinted
            if len(hinted) >= self._capacity and key not in hinted:
                now = self._clock()
                for k in [k for k, until in hinted.items() if until <= now]:
                    del hinted[k]
                if len(hinted) >= self._capacity:
                    hinted.pop(next(iter(hinted)))  # the oldest hint
            hinted[key] = self._clock() + self.hint_s

    def wrote(self, key: str) -> None:
        with self._lock:
            self._rates.forget(key)
            self._hinted.pop(key, None)


class Attempts:
    """The tries of one call: its owner, then nodes not tried yet, all
    before one deadline (time.monotonic()).

        tries = router.attempts(key, deadline)
        for peer, seconds_left in tries:
            try: return call(peer, seconds_left)
            except RpcError as err:
                if tries.failed(client_error(err)): refresh the ring
        raise tries.error()
    """

    def __init__(self, router: Router, key: str, deadline: float, first: str | None = None) -> None:
        self._router = router
        self._first = first
        self._key = key
        self._deadline = deadline
        self._tried: set[str] = set()
        self._last: errors.CacheError | None = None

    def __iter__(self) -> Iterator[tuple[str, float]]:
        while len(self._tried) < MAX_TRIES:
            ring = self._router.ring  # read per try: it may change between them
            owner = self._first if self._first in ring else ring.owner(self._key)
            self._first = None
            peer = owner if owner is not None and owner not in self._tried else None
            if peer is None:
                peer = next((p for p in ring.nodes if p not in self._tried), None)
            left = self._deadline - time.monotonic()
            if peer is None or left <= 0:
                return
            self._tried.add(peer)
            yield peer, left

    def after(self, peer: str, error: errors.CacheError) -> bool:
        """As failed(), for a first try made without these tries (Router.first_get)."""
        self._tried.add(peer)
        self._first = None
        return self.failed(error)

    def failed(self, error: errors.CacheError) -> bool:
        """After a failed try: raises what the owner answered on purpose
        (missing key, origin down, bad request); for a PeerError or a node
        without the group, True when the ring should be read again before
        the next try (after the first failure, if time is left)."""
        if not isinstance(error, (errors.PeerError, errors.GroupNotFound)):
            raise error from None
        self._last = error
        return len(self._tried) == 1 and time.monotonic() < self._deadline

    def error(self) -> errors.CacheError:
        return self._last or errors.PeerError("no peers known")


def deadline_of(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return time.monotonic() + timeout


# Channels ----------------------------------------------------------------------

C = TypeVar("C")


class Pool(Generic[C]):
    """One channel per peer (a channel carries any number of concurrent
    calls). The channel of a peer that left the ring is retired: closed
    `linger` seconds later, once calls already on it are over."""

    def __init__(self, dial: Callable[[str], tuple[C, dict[str, Callable]]], linger: float) -> None:
        self._dial = dial
        self.linger = linger
        self._live: dict[str, tuple[C, dict[str, Callable]]] = {}
        self._retired: list[tuple[float, C]] = []
        self._closed = False
        self._lock = threading.Lock()

    def methods(self, peer: str) -> dict[str, Callable]:
        """{method path: callable} on the peer's channel, dialled on first use."""
        with self._lock:
            entry = self._live.get(peer)
            if entry is None:
                if self._closed:
                    raise RuntimeError("the client is closed")
                entry = self._live[peer] = self._dial(peer)
            return entry[1]

    def retire(self, peers: Iterable[str]) -> None:
        until = time.monotonic() + self.linger
        with self._lock:
            for peer in peers:
                entry = self._live.pop(peer, None)
                if entry is not None:
                    self._retired.append((until, entry[0]))

    def expired(self) -> list[C]:
        """Retired channels whose linger is over: the caller closes them."""
        now = time.monotonic()
        with self._lock:
            done = [c for until, c in self._retired if until <= now]
            self._retired = [(until, c) for until, c in self._retired if until > now]
        return done

    def drain(self) -> list[C]:
        """Every channel, live or retired, for the caller to close; no more
        are dialled after this."""
        with self._lock:
            self._closed = True
            channels = [c for c, _ in self._live.values()] + [c for _, c in self._retired]
            self._live.clear()
            self._retired.clear()
        return channels
