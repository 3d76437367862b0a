"""The rules of one cache node, whatever server library serves it.

Every backend in appliance.transport calls this one interface: validate,
look up the group (GroupNotFound), get (with a synchronous `hit` for the
fast path), get_many, set, remove, set_peers, stats. It knows nothing of
gRPC: failures are appliance.cache.errors, answers are Entries and Change
records, and the transport maps both to its wire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping

from ..cache import errors
from ..cache.group import Framing, Group
from ..cache.store import Entry
from ..logs import event
from .auth import NONE, Authenticator, Credentials
from .peers import Peers

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

Loader = Callable[[str], Awaitable[bytes]]
MAX_BATCH_KEYS = 10_000


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


class NodeInstance:
    def __init__(
        self,
        settings: Settings,
        loaders: Mapping[str, Loader],
        peers: Peers,
        *,
        framing: Framing,
        auth: Authenticator | None = None,
    ) -> None:
        """`auth` decides who may read and write (default: [auth] with no
        credentials known, i.e. only what is open)."""
        ns = settings.node
        missing = set(settings.groups) - set(loaders)
        if missing:
            raise ValueError(f"no loader for group(s): {', '.join(sorted(missing))}")
        self.settings = settings
        self.peers = peers
        self.auth = auth if auth is not None else Authenticator.from_settings(settings, None)
        # Read by the transports' fast path: no credentials to look at when reads are open.
        self.reads_open = self.auth.reads_open
        self.max_key = ns.max_key_bytes
        self.max_group = ns.max_group_bytes
        self.max_value = ns.max_value_bytes
        self.groups: dict[str, Group] = {
            name: Group(
                name,
                loaders[name],
                cache_bytes=spec.cache_bytes,
                policy=spec.policy,
                ttl=spec.ttl,
                picker=peers,
                hot_fraction=ns.hot_cache_fraction,
                mirror_probability=ns.hot_cache_mirror,
                framing=framing,
            )
            for name, spec in settings.groups.items()
        }
        self.draining = False
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
        open (`reads_open`), a transport need not gather `credentials`."""
        if not self.reads_open:
            self.authorize("read", "Get", credentials or NONE)
        self.validate(group_name, key)
        return self.group(group_name).lookup(key, forwarded)

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
        results: list[Entry | errors.CacheError | None] = [None] * len(keys)
        valid: list[int] = []
        for i, key in enumerate(keys):
            try:
                self.validate(group_name, key)
                valid.append(i)
            except errors.InvalidRequest as exc:
                results[i] = exc
        entries = await group.get_many([keys[i] for i in valid], forwarded=forwarded, timeout=timeout)
        for i, entry in zip(valid, entries):
            results[i] = entry
        return results  # type: ignore[return-value]

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
        for client, outcome in zip(others, outcomes):
            if isinstance(outcome, BaseException):
                change.acks.append(Ack(client.addr, False, str(outcome) or type(outcome).__name__))
            else:
                change.acks.append(Ack(client.addr, True))
        return change

    # Membership ----------------------------------------------------------------

    def set_peers(self, peers: list[str], revision: int, leases: Mapping[str, int] | None = None) -> bool:
        """Install a ring; False (no change) for a revision not newer than ours."""
        if not self.peers.set_peers(peers, revision, leases):
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

    def _condition(self) -> asyncio.Condition:
        if self._ring_changed is None:
            self._ring_changed = asyncio.Condition()
        return self._ring_changed

    async def _after_ring_change(self) -> None:
        if self.on_serving_change is not None:
            await self.on_serving_change(self.serving)
        async with self._condition():
            self._condition().notify_all()

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
