"""Per-client-address token buckets on the data port (`[ops] rate_limit`).

Each client IP address gets a bucket of `burst` tokens refilled at `rate`
tokens per second; a request takes one token or is refused with
RESOURCE_EXHAUSTED, whose details carry a google.rpc.RetryInfo (when a token
will be there) and an ErrorInfo with reason RATE_LIMITED. The HTTP read API
shares the buckets and answers 429 with Retry-After.

Only the data services (groupcachepb.GroupCache, appliance.cache.Cache) are
limited: health checks and reflection are not, so a busy client cannot make
a load balancer think the node is down. When rate_limit = 0 nothing is
installed and the Get path is untouched.

Forwarded calls (a peer asking the owner, marked `x-groupcache-forwarded`)
are exempt, but only when they come from the address of a node in the
current ring. Trade-off: the header is set by the caller, so trusting it
from anyone would let any client skip the limit by setting it. Checking the
source address against the ring closes that for remote clients; a client
that shares an address with a node (on the same box, or behind the same
NAT) can still claim to be a peer. With mTLS (`[tls] client_auth`) only
holders of a CA-signed certificate reach the port at all. Ring members
named by host name are resolved in the background; until then their
forwarded calls are limited like any client's, which at worst makes the
forwarding node load the value itself (a peer error, never a failed Get).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Hashable


class TokenBuckets:
    """One bucket per key (a client address). Not thread-safe: one event loop."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, last refill]

    def take(self, key: str, cost: float = 1.0) -> float:
        """0.0 when the call may go ahead, charged `cost` tokens; else the
        seconds until it may. A call costing more than the burst goes ahead
        on one token and leaves the bucket in debt: the client pays the
        whole cost before its next call (a GetMany of many keys costs what
        as many Gets would, and is never refused outright)."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._sweep(now)
            self._buckets[key] = [self.burst - cost, now]
            return 0.0
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - cost
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        # A full bucket is the same as no bucket: drop those. If every
        # client is active, forget them all rather than grow without bound.
        full = [k for k, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_clients:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)


def token_buckets(rate: float, burst: int) -> TokenBuckets:
    """The engine's TokenBuckets where it is built (the same rule in Rust,
    which its hit path charges too: one rate per client, whichever side
    answers), else this module's."""
    try:
        from appliance_engine import TokenBuckets as EngineBuckets
    except ImportError:
        return TokenBuckets(rate, burst)
    return EngineBuckets(rate, burst)


def client_address(peer: str) -> str:
    """The IP address in a grpc peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host.strip("[]")
    return peer


class TrustedPeers:
    """IP addresses of the ring's nodes, recomputed when the ring changes."""

    def __init__(
        self, ring_nodes: Callable[[], tuple[Hashable, list[str]]], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        """`loop` resolves host names; a caller on another thread (the engine
        backend's receiving thread) may ask, the lookups still run there."""
        self._ring_nodes = ring_nodes  # () -> (ring version, ["host:port", ...])
        self._loop = loop
        self._revision: Hashable = None
        self._ips: set[str] = set()
        self._resolving: set[str] = set()
        self._tasks: set = set()

    def __call__(self) -> set[str]:
        revision, nodes = self._ring_nodes()
        if revision != self._revision:
            self._revision = revision
            ips, names = set(), set()
            for node in nodes:
                host = node.rpartition(":")[0].strip("[]")
                try:
                    ips.add(str(ipaddress.ip_address(host)))
                except ValueError:
                    names.add(host)
            self._ips = ips
            for name in names - self._resolving:
                self._resolve(name, revision)
        return self._ips

    def _resolve(self, name: str, revision: Hashable) -> None:
        loop = self._loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
        self._resolving.add(name)
        loop.call_soon_threadsafe(self._start_resolving, loop, name, revision)

    def _start_resolving(self, loop: asyncio.AbstractEventLoop, name: str, revision: Hashable) -> None:

        async def resolve() -> None:
            try:
                infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
                if self._revision == revision:
                    # An IP family's sockaddr: (address, port, ...), the address a str.
                    self._ips |= {str(info[4][0]) for info in infos}
            except OSError:
                pass
            finally:
                self._resolving.discard(name)

        task = loop.create_task(resolve())
        self._tasks.add(task)  # the loop holds tasks only weakly
        task.add_done_callback(self._tasks.discard)


class RateLimiter:
    """The data port's limit, shared by every backend and the HTTP API:
    forwarded calls from ring members pass, everyone else takes a token."""

    def __init__(self, buckets: TokenBuckets, trusted: Callable[[], set[str]] = set) -> None:
        self.buckets = buckets
        self.trusted = trusted
        self.on_limited: dict[str, Callable[[], None]] = {}  # protocol -> counter

    def admit(self, client: str, *, forwarded: bool = False, protocol: str = "grpc", cost: float = 1.0) -> float:
        """0.0 to serve the call; else the seconds until the client may retry.
        `cost`: the tokens it takes (a GetMany: one per distinct key)."""
        if forwarded and client in self.trusted():
            return 0.0
        wait = self.buckets.take(client, cost)
        if wait:
            counted = self.on_limited.get(protocol)
            if counted is not None:
                counted()
        return wait
