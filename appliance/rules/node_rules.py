"""The rules of one cache node, whatever server library serves it.

Every front in appliance.fronts calls this one interface: validate,
look up the group (GroupNotFound), get (with a synchronous `hit` for the
fast path), get_many, set, remove, set_peers, stats; and between nodes,
peek and receive_handoff (a stopping node's `handoff`). It knows nothing of
gRPC: failures are appliance.cache.errors, answers are Entries and Change
records, and each front maps both to its wire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..cache import errors
from ..cache.group import Framing, Group, Loader
from ..cache.promoter import Promoter, RandomPromoter, RatePromoter
from ..cache.store import Entry, Store, StoreFactory
from ..logs import event
from .auth import CLUSTER, NONE, Authenticator, Credentials
from .peers import PeerClient, Peers
from .ratelimit import TrustedPeers

if TYPE_CHECKING:
    from ..config import GroupSettings, NodeSettings

log = logging.getLogger(__name__)

MAX_BATCH_KEYS = 10_000
# Room for the fixed fields around a key or value in one message (the
# transports' message limit is max_value_bytes plus this).
MESSAGE_SLACK = 64 * 1024
# A GetMany result's framing beside its key and value: tags, lengths, a TTL.
RESULT_OVERHEAD = 24
# One Handoff call: at most this many entries, and this many bytes (each
# entry counted with room for its framing) unless one entry is larger.
HANDOFF_CALL_ENTRIES = 4096
HANDOFF_CALL_BYTES = 1 << 20
_ENTRY_OVERHEAD = 32


def message_limit(ns: NodeSettings) -> int:
    """The largest message a node sends or takes: a value and the slack."""
    return ns.max_value_bytes + MESSAGE_SLACK


@dataclasses.dataclass
class Ack:
    """What one peer said about a change (Set or Remove)."""

    addr: str
    confirmed: bool
    error: str = ""


@dataclasses.dataclass
class Change:
    owner: str
    acks: list[Ack] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class HandoffReport:
    """What a stopping node handed off (entries; bytes are key + value)."""

    peers: int = 0
    sent: int = 0  # in calls made, answered or not
    accepted: int = 0
    refused: int = 0  # the new owner knew better
    failed: int = 0  # the call failed, or was not made after one to that owner did
    cut: int = 0  # past handoff_bytes or the deadline, or changed since ranked
    accepted_bytes: int = 0
    refused_bytes: int = 0
    failed_bytes: int = 0
    cut_bytes: int = 0
    seconds: float = 0.0


# What a caller without a read credential is told of an origin failure: its
# cause (an HTTP error body, a database's error line, a path) goes to the
# worker's log and metrics, not to whoever asked.
ORIGIN_UNTOLD = "the origin failed; the worker's log has the cause (a caller with a read credential is told it)"


def told(exc: errors.CacheError, shown: bool) -> errors.CacheError:
    """The error as this caller may see it: an origin failure's cause only
    where `shown` (a read credential, or a peer)."""
    if shown or not isinstance(exc, errors.OriginError):
        return exc
    return errors.OriginError(ORIGIN_UNTOLD)


def told_all(results: list, shown: bool) -> list:
    """told() for each error among per-key results (a GetMany's)."""
    if shown:
        return results
    return [told(r, False) if isinstance(r, errors.CacheError) else r for r in results]


class NodeRules:
    def __init__(
        self,
        ns: NodeSettings,
        groups: Mapping[str, GroupSettings],
        loaders: Mapping[str, Loader],
        peers: Peers,
        *,
        framing: Framing,
        auth: Authenticator | None = None,
        store: StoreFactory = Store,
    ) -> None:
        """`ns` and `groups`: the [node] and [groups] tables; `auth` decides
        who may read and write (default: nothing known, only what is open)."""
        missing = set(groups) - set(loaders)
        if missing:
            raise ValueError(f"no loader for group(s): {', '.join(sorted(missing))}")
        self.node_settings = ns
        self.peers = peers
        self.auth = auth if auth is not None else Authenticator(writes_open=False, reads_open=True)
        # Read by the transports' fast path: no credentials to look at when reads are open.
        self.reads_open = self.auth.reads_open
        self.max_key = ns.max_key_bytes
        self.max_group = ns.max_group_bytes
        self.max_value = ns.max_value_bytes
        self.max_reply = message_limit(ns)
        # Called with a limit's name when a call is refused by it (a metric).
        self.on_refused: Callable[[str], None] | None = None
        self.groups: dict[str, Group] = {
            name: Group(
                name,
                loaders[name],
                cache_bytes=spec.cache_bytes,
                policy=spec.policy,
                ttl=spec.ttl,
                picker=peers,
                hot_fraction=ns.hot_cache_fraction,
                promoter=_promoter(ns),
                framing=framing,
                previous=peers if ns.peek_window else None,
                peek_timeout=ns.peek_timeout,
                tombstone_window=ns.fence_window,
                store=store,
            )
            for name, spec in groups.items()
        }
        # IP addresses of the ring's members (and of those that just left it).
        self._trusted = TrustedPeers(lambda: (peers.version, sorted(peers.members())))
        self.last_handoff: HandoffReport | None = None
        self.draining = False
        # Called (synchronously) once a new ring is installed.
        self.on_ring_change: Callable[[], None] | None = None
        # Called (from the loop) whenever `serving` may have changed.
        self.on_serving_change: Callable[[bool], Awaitable[None]] | None = None
        self._ring_changed: asyncio.Condition | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def addr(self) -> str:
        return self.peers.self_addr

    # Requests ------------------------------------------------------------------

    def validate(self, group: str, key: str) -> None:
        if not group:
            raise errors.InvalidRequest("group is required")
        if not key:
            raise errors.InvalidRequest("key is required")
        # A code point is at most 4 bytes in UTF-8: encode only when it matters.
        if len(group) * 4 > self.max_group and len(group.encode("utf-8", "surrogatepass")) > self.max_group:
            raise errors.InvalidRequest(f"group name longer than {self.max_group} bytes")
        if len(key) * 4 > self.max_key and len(key.encode("utf-8", "surrogatepass")) > self.max_key:
            raise errors.InvalidRequest(f"key longer than {self.max_key} bytes")

    def authorize(self, scope: str, what: str, credentials: Credentials = NONE) -> None:
        """Let a call through, or raise Unauthenticated / PermissionDenied."""
        self.auth.require(scope, what, credentials)

    def group(self, name: str) -> Group:
        group = self.groups.get(name)
        if group is None:
            if not name:
                raise errors.InvalidRequest("group is required")
            raise errors.GroupNotFound(f"group {name!r} not found")
        return group

    def hit(
        self, group_name: str, key: str, forwarded: bool = False, credentials: Credentials | None = None
    ) -> Entry | None:
        """The cached entry, or None on a miss (then `fill`). Never suspends,
        so a server can answer hits without a coroutine per call. With reads
        open (`reads_open`), a front need not gather `credentials`."""
        if not self.reads_open:
            self.authorize("read", "Get", credentials or NONE)
        self.validate(group_name, key)
        if not forwarded and self.peers.revision < 0:
            self._no_ring()
        return self.group(group_name).lookup(key, forwarded)

    def hot_owned(self, group_name: str, key: str) -> bool:
        """Whether key is one of this owner's hot keys (after a hit)."""
        return key in self.groups[group_name].owned_hot.hot

    async def fill(self, group_name: str, key: str, *, forwarded: bool, timeout: float | None) -> Entry:
        """The miss path after `hit` returned None."""
        return await self.groups[group_name].fill(key, forwarded=forwarded, timeout=timeout)

    async def get(
        self,
        group_name: str,
        key: str,
        *,
        forwarded: bool = False,
        timeout: float | None = None,
        credentials: Credentials | None = None,
    ) -> Entry:
        entry = self.hit(group_name, key, forwarded, credentials)
        if entry is not None:
            return entry
        return await self.fill(group_name, key, forwarded=forwarded, timeout=timeout)

    async def get_many(
        self,
        group_name: str,
        keys: list[str],
        *,
        forwarded: bool = False,
        timeout: float | None = None,
        credentials: Credentials = NONE,
    ) -> list[Entry | errors.CacheError]:
        """Per key, in order: its Entry or the error for that key alone.
        Raises for the request as a whole (no group, too many keys)."""
        if not self.reads_open:
            self.authorize("read", "GetMany", credentials)
        if len(keys) > MAX_BATCH_KEYS:
            raise errors.InvalidRequest(f"at most {MAX_BATCH_KEYS} keys per GetMany")
        group = self.group(group_name)
        if not forwarded and self.peers.revision < 0:
            self._no_ring()
        results: list[Entry | errors.CacheError | None] = [None] * len(keys)
        valid: list[int] = []
        for i, key in enumerate(keys):
            try:
                self.validate(group_name, key)
                valid.append(i)
            except errors.InvalidRequest as exc:
                results[i] = exc
        entries = await group.get_many([keys[i] for i in valid], forwarded=forwarded, timeout=timeout)
        for i, entry in zip(valid, entries, strict=True):
            results[i] = entry
        # The reply's size, from the entries held (no copy yet): a key asked
        # 10,000 times must not build 10,000 copies of its value first.
        size = sum(len(k.encode("utf-8", "surrogatepass")) + RESULT_OVERHEAD for k in keys)  # bytes on the wire
        size += sum(len(r.data) for r in results if isinstance(r, Entry))
        if size > self.max_reply:
            self.refused("reply_bytes")
            raise errors.TooLarge(
                f"the reply would be {size} bytes, over the limit of {self.max_reply} "
                f"(node.max_value_bytes + {MESSAGE_SLACK}): ask for fewer keys per GetMany"
            )
        return results  # type: ignore[return-value]

    def refused(self, limit: str) -> None:
        if self.on_refused is not None:
            self.on_refused(limit)

    def _no_ring(self) -> None:
        # Without a ring every key looks like ours: a just-started node would
        # load (and keep) keys other nodes hold. Peers' forwards are served.
        raise errors.NotServing(f"{self.addr} has no ring yet (starting): try another node")

    @staticmethod
    def ttl_left(entry: Entry) -> float:
        """Seconds the entry has left (0: it never expires)."""
        return max(entry.expires - time.monotonic(), 0.001) if entry.expires else 0.0

    async def set(
        self,
        group_name: str,
        key: str,
        value: bytes,
        ttl: float,
        *,
        forwarded: bool,
        timeout: float | None,
        credentials: Credentials = NONE,
    ) -> Change:
        """Write through to the owner's main cache; drop every other copy."""
        self.authorize("write", "Set", credentials)
        self.validate(group_name, key)
        if len(value) > self.max_value:
            raise errors.InvalidRequest(f"value larger than {self.max_value} bytes")
        if ttl < 0:
            raise errors.InvalidRequest("ttl must be >= 0")
        group = self.group(group_name)
        if not forwarded and self.peers.revision < 0:
            self._no_ring()
        if forwarded:
            group.set(key, value, ttl or None)
            return Change(self.addr, [Ack(self.addr, True)])

        async def at_owner(client) -> None:
            if client is None:
                group.set(key, value, ttl or None)
            else:
                await client.set(group_name, key, value, ttl, timeout)

        return await self._change(group, key, at_owner, timeout, owner_required=True)

    async def remove(
        self, group_name: str, key: str, *, forwarded: bool, timeout: float | None, credentials: Credentials = NONE
    ) -> Change:
        """Drop key at its owner, here and in every live peer's hot cache."""
        self.authorize("write", "Remove", credentials)
        self.validate(group_name, key)
        group = self.group(group_name)
        if not forwarded and self.peers.revision < 0:
            self._no_ring()
        if forwarded:
            group.remove(key)
            return Change(self.addr, [Ack(self.addr, True)])

        async def at_owner(client) -> None:
            if client is None:
                group.remove(key)
            else:
                await client.remove(group_name, key, timeout)

        return await self._change(group, key, at_owner, timeout, owner_required=False)

    async def _change(self, group: Group, key: str, at_owner, timeout: float | None, *, owner_required: bool) -> Change:
        """Apply at the owner first, then drop every other copy: on this node
        and on every live peer. Returns when each confirmed or failed."""
        peers = self.peers
        owner = peers.owner(key) or self.addr
        change = Change(owner)
        owner_client = None if owner == self.addr else peers.client(owner)
        try:
            await at_owner(owner_client)
            change.acks.append(Ack(owner, True))
        except errors.PeerError as exc:
            if owner_required:
                raise errors.PeerError(f"owner {owner} unreachable, nothing stored: {exc}") from None
            change.acks.append(Ack(owner, False, str(exc)))
        if owner != self.addr:
            group.remove(key)
            change.acks.append(Ack(self.addr, True))
        others = [c for c in peers.clients() if c.addr != owner]
        outcomes = await asyncio.gather(*(c.remove(group.name, key, timeout) for c in others), return_exceptions=True)
        for client, outcome in zip(others, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                change.acks.append(Ack(client.addr, False, str(outcome) or type(outcome).__name__))
            else:
                change.acks.append(Ack(client.addr, True))
        return change

    # Between nodes: peek and handoff -------------------------------------------

    def peek(self, group_name: str, key: str, credentials: Credentials = NONE) -> Entry | None:
        """A previous owner's answer to a peek: its main-cache entry, or None.
        Never loads, and is not a Get (but needs what a Get needs)."""
        if not self.reads_open:
            self.authorize("read", "Peek", credentials)
        self.validate(group_name, key)
        group = self.group(group_name)
        entry = group.main.get(key)
        if entry is None:
            group.stats.peeks_served_misses += 1
        else:
            group.stats.peeks_served_hits += 1
        return entry

    def shows_cause(self, credentials: Credentials | None) -> bool:
        """Whether a caller is told an origin failure's cause: it presents a
        credential with the read scope (a peer's token has it)."""
        if credentials is None:
            return False
        try:
            principal = self.auth.authenticate(credentials)
        except errors.Unauthenticated:
            return False
        return principal is not None and "read" in principal.scopes

    def from_peer(self, marked: bool, credentials: Credentials) -> bool:
        """Whether a call marked as forwarded is a peer's: it must present
        the cluster's token. A client that sets the marker itself is served
        as any client (routed to the owner, through its singleflight), not
        as if this node owned the key. Without a cluster token (nodes built
        by hand) the marker is all there is to go by."""
        if not marked:
            return False
        return self.auth.is_cluster(credentials) if self.auth.knows_cluster else True

    def authorize_peer_write(self, source: str, caller: str, credentials: Credentials = NONE) -> None:
        """The one place that decides whether a peer may write into this
        node's caches (Handoff); raises Unauthenticated / PermissionDenied.
        Unless writes are open, the call carries the cluster's own token
        (an application's write credential may Set, not hand off); `source`
        (the sender's host:port) is in our ring, or left it lately as a
        stopping node does; and `caller` (the call's client IP address) is a
        member's."""
        principal = self.auth.require("write", "Handoff", credentials)
        if principal is not None and principal.name != CLUSTER:
            raise errors.PermissionDenied(
                f"Handoff is for the cluster's own workers; credential {principal.name!r} is not the cluster token"
            )
        if source == self.addr or source not in self.peers.members():
            raise errors.PermissionDenied(f"handoff from {source!r} refused: not a member of the ring of {self.addr}")
        if caller not in self._trusted():
            raise errors.PermissionDenied(f"handoff from {caller!r} refused: not an address of a ring member")

    def receive_handoff(
        self,
        source: str,
        caller: str,
        group_name: str,
        entries: Sequence[tuple[str, bytes, float]],
        credentials: Credentials = NONE,
    ) -> tuple[int, int]:
        """Entries (key, value, ttl_left) a stopping peer hands us; (accepted,
        refused). Each is checked like a Set, the batch refused as a whole
        if one is bad; a valid one is refused when we know better."""
        self.authorize_peer_write(source, caller, credentials)
        if self.draining:
            raise errors.Draining(f"{self.addr} is stopping: it takes no handoff")
        group = self.group(group_name)
        if len(entries) > MAX_BATCH_KEYS:
            raise errors.InvalidRequest(f"at most {MAX_BATCH_KEYS} entries per Handoff")
        for i, (key, value, ttl) in enumerate(entries):
            try:
                self.validate(group_name, key)
            except errors.InvalidRequest as exc:
                raise errors.InvalidRequest(f"entry {i}: {exc}") from None
            if len(value) > self.max_value:
                raise errors.InvalidRequest(f"entry {i}: value larger than {self.max_value} bytes")
            if not 0 <= ttl < math.inf:
                raise errors.InvalidRequest(f"entry {i}: ttl must be >= 0 seconds")
        accepted = sum(group.offer(key, value, ttl) for key, value, ttl in entries)
        return accepted, len(entries) - accepted

    async def handoff(self, timeout: float) -> HandoffReport:
        """Send the main caches, most valuable first, to the keys' owners in
        the ring without us: at most handoff_bytes, within `timeout` seconds.
        Never raises for a peer's failure; one log line says what went."""
        ns = self.node_settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        report = self.last_handoff = HandoffReport()
        ring = self.peers.ring_without_self()
        if ns.handoff_bytes <= 0 or timeout <= 0 or not ring.nodes:
            return report
        deadline = started + timeout
        plans: dict[str, list[tuple[Group, str, Entry]]] = {}
        room = ns.handoff_bytes
        ranked = [[(g, k, e) for k, e in g.handoff_entries()] for g in self.groups.values()]
        for item in itertools.chain.from_iterable(itertools.zip_longest(*ranked)):
            if item is None:
                continue
            group, key, entry = item
            if room < entry.size:
                room = 0  # cut here: what follows is worth less
                self._count_out(report, group, "cut", 1, entry.size)
                continue
            room -= entry.size
            owner = ring.owner(key)
            assert owner is not None
            plans.setdefault(owner, []).append(item)
        report.peers = len(plans)
        sends = []
        for owner, items in plans.items():
            client = self.peers.client(owner)
            if client is not None:
                sends.append(self._hand_to(client, items, deadline, report))
            else:  # not in our ring after all (it changed meanwhile)
                for group, _, entry in items:
                    self._count_out(report, group, "failed", 1, entry.size)
        await asyncio.gather(*sends)
        report.seconds = loop.time() - started
        event(
            log,
            logging.INFO,
            "handoff",
            addr=self.addr,
            peers=report.peers,
            sent=report.sent,
            accepted=report.accepted,
            refused=report.refused,
            failed=report.failed,
            cut=report.cut,
            bytes=report.accepted_bytes,
            seconds=f"{report.seconds:.3f}",
        )
        return report

    async def _hand_to(
        self, client: PeerClient, items: list[tuple[Group, str, Entry]], deadline: float, report: HandoffReport
    ) -> None:
        """One owner's share, in calls of one group each, one after another.
        After a call fails, the rest are not sent (the owner is gone,
        stopping, or too slow) and count as failed."""
        loop = asyncio.get_running_loop()
        failed: str | None = None
        for group, batch in _handoff_calls(items, min(HANDOFF_CALL_BYTES, self.max_value + 32 * 1024)):
            if failed is not None:
                for _, _key, entry in batch:
                    self._count_out(report, group, "failed", 1, entry.size)
                continue
            entries, size, now = [], 0, time.monotonic()
            for _, key, entry in batch:
                if group.main.get(key) != entry:  # removed or replaced since (a copy: compare)
                    self._count_out(report, group, "cut", 1, entry.size)
                    continue
                entries.append((key, entry.value, entry.expires - now if entry.expires else 0.0))
                size += entry.size
            left = deadline - loop.time()
            if left <= 0:
                self._count_out(report, group, "cut", len(entries), size)
                continue
            if not entries:
                continue
            report.sent += len(entries)
            try:
                accepted, refused = await client.handoff(self.addr, group.name, entries, left)
            except errors.CacheError as exc:
                failed = f"{type(exc).__name__}: {exc}"
                event(log, logging.INFO, "handoff stopped", peer=client.addr, cause=failed[:200])
                self._count_out(report, group, "failed", len(entries), size)
                continue
            refused = min(refused, len(entries))
            accepted = len(entries) - refused
            # Bytes split by share: the reply counts entries only.
            self._count_out(report, group, "accepted", accepted, size * accepted // len(entries))
            self._count_out(report, group, "refused", refused, size - size * accepted // len(entries))

    @staticmethod
    def _count_out(report: HandoffReport, group: Group, result: str, entries: int, size: int) -> None:
        setattr(report, result, getattr(report, result) + entries)
        setattr(report, f"{result}_bytes", getattr(report, f"{result}_bytes") + size)
        stats = group.stats
        setattr(stats, f"handoff_out_{result}", getattr(stats, f"handoff_out_{result}") + entries)
        setattr(stats, f"handoff_out_{result}_bytes", getattr(stats, f"handoff_out_{result}_bytes") + size)

    # Membership ----------------------------------------------------------------

    def set_peers(
        self, peers: list[str], revision: int, leases: Mapping[str, int] | None = None, generation: int = 0
    ) -> bool:
        """Install a ring; False (no change) for a (revision, generation) not newer than ours."""
        if not self.peers.set_peers(peers, revision, leases, generation):
            return False
        event(
            log,
            logging.INFO,
            "ring changed",
            revision=revision,
            generation=generation,
            peers=len(self.peers.ring),
            member=str(self.addr in self.peers.ring).lower(),
        )
        self._trusted()  # resolve members' host names now, before a handoff needs them
        if self.on_ring_change is not None:
            self.on_ring_change()
        # Called from sync code: the follow-up runs as a task we keep a
        # reference to (the loop holds tasks only weakly).
        task = asyncio.ensure_future(self._after_ring_change())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    def _condition(self) -> asyncio.Condition:
        if self._ring_changed is None:
            self._ring_changed = asyncio.Condition()
        return self._ring_changed

    async def _after_ring_change(self) -> None:
        if self.on_serving_change is not None:
            await self.on_serving_change(self.serving)
        async with self._condition():
            self._condition().notify_all()

    async def wait_for_ring(self, timeout: float) -> bool:
        """Until a first ring arrives (True), or `timeout` seconds (False)."""
        condition = self._condition()

        async def ringed() -> None:
            async with condition:
                await condition.wait_for(lambda: self.peers.revision >= 0)

        try:
            await asyncio.wait_for(ringed(), timeout)
            return True
        except TimeoutError:
            return False

    async def drain(self, timeout: float) -> bool:
        """Stop reporting SERVING and wait until a ring without us arrives.

        True when it did; False after `timeout` seconds."""
        self.draining = True
        if self.on_serving_change is not None:
            await self.on_serving_change(False)
        condition = self._condition()

        async def out_of_ring() -> None:
            async with condition:
                await condition.wait_for(lambda: self.addr not in self.peers.ring)

        try:
            await asyncio.wait_for(out_of_ring(), timeout)
            return True
        except TimeoutError:
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
            # Each worker's share of the key space (the ring can be uneven).
            "ring_shares": self.peers.ring.shares(),
            "draining": self.draining,
            "groups": groups,
            "last_handoff": dataclasses.asdict(self.last_handoff) if self.last_handoff is not None else None,
        }


def _handoff_calls(items: list[tuple[Group, str, Entry]], max_bytes: int):
    """(group, items) per Handoff call, in the order of `items`: one group
    each, bounded in entries and bytes; the groups' calls take turns."""
    per_group: dict[str, list[list[tuple[Group, str, Entry]]]] = {}
    sizes: dict[str, int] = {}
    for item in items:
        group, _, entry = item
        calls = per_group.setdefault(group.name, [[]])
        cost = entry.size + _ENTRY_OVERHEAD
        if calls[-1] and (len(calls[-1]) >= HANDOFF_CALL_ENTRIES or sizes[group.name] + cost > max_bytes):
            calls.append([])
            sizes[group.name] = 0
        calls[-1].append(item)
        sizes[group.name] = sizes.get(group.name, 0) + cost
    for batch in itertools.chain.from_iterable(itertools.zip_longest(*per_group.values())):
        if batch:
            yield batch[0][0], batch


def _promoter(ns: NodeSettings) -> Promoter:
    """One per group: rates are per group, like the hot cache."""
    if ns.hot_cache_promotion == "rate" and ns.hot_cache_mirror > 0:
        return RatePromoter()
    return RandomPromoter(ns.hot_cache_mirror)
