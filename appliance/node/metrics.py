"""Prometheus metrics of one worker (the box endpoint is appliance.ops.box_metrics).

`NodeMetrics` is a `CollectorRegistry` per node. Its collector reads the
group counters (`appliance.cache.group.Stats`), the stores and the ring when
scraped, so the numbers are exact and cost nothing on the Get path. The
origin load latency histogram is observed by `instrument_loader`, the
wrapper worker.py puts around each group's loader (the cache core stays free
of metrics). The admin RPC `Admin.Metrics` returns the registry in the
Prometheus text format; the controller re-labels and serves it per box.

Families (counters since the worker started; labels `group`, `cache` =
main|hot, `result` = ok|not_found|error):

    groupcache_gets_total, groupcache_hits_total{cache},
    groupcache_loads_total, groupcache_loads_deduped_total,
    groupcache_peer_loads_total, groupcache_peer_errors_total,
    groupcache_server_requests_total, groupcache_origin_loads_total{result},
    groupcache_origin_load_seconds{result} (histogram),
    groupcache_cache_bytes{cache}, groupcache_cache_items{cache},
    groupcache_cache_evictions_total{cache}, groupcache_cache_limit_bytes,
    groupcache_ring_revision, groupcache_ring_peers, groupcache_ring_member,
    groupcache_draining, groupcache_rate_limited_total{protocol},
    groupcache_limit_refusals_total{limit},
    groupcache_peeks_total{result} (hit|miss|error|refused: this worker's
    peeks at previous owners), groupcache_peeks_served_total{result}
    (hit|miss: peeks it answered), groupcache_handoff_entries_total and
    groupcache_handoff_bytes_total{direction, result} (direction out: what
    it handed off when it stopped, result accepted|refused|failed|cut; in:
    what stopping peers handed it, accepted|refused),
    groupcache_handoff_seconds (its last handoff's duration)

Ratios (hit ratio, origin error ratio) are not exported: they belong in
PromQL, over rate() of the counters (ops/prometheus/groupcache.rules.yml
records them), where they are defined over any window and never NaN.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..cache.errors import InvalidRequest, KeyNotFound
from ..cache.group import Loader
from ..logs import event

if TYPE_CHECKING:
    from .serving import Node

log = logging.getLogger(__name__)

# Handoff counters: direction -> results (Stats fields handoff_<direction>_<result>[_bytes]).
HANDOFF_RESULTS = (("out", ("accepted", "refused", "failed", "cut")), ("in", ("accepted", "refused")))
# Origin loads span a cached-file read (~100 us) to a timed-out database (5 s+).
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)


class NodeMetrics:
    """The registry of one node (one worker process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.origin_seconds = Histogram(
            "groupcache_origin_load_seconds",
            "Time of each origin load on this worker, by outcome.",
            ["group", "result"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "groupcache_rate_limited",
            "Requests refused by the per-client-address rate limit.",
            ["protocol"],
            registry=self.registry,
        )
        for protocol in ("grpc", "http"):
            self.rate_limited.labels(protocol)  # 0, not absent, while nothing is limited
        self.refused = Counter(
            "groupcache_limit_refusals",
            "Refused by a limit before the work (limit: reply_bytes, http_connections).",
            ["limit"],
            registry=self.registry,
        )
        self.refused.labels("reply_bytes")
        self.refused.labels("http_connections")
        self._node: Node | None = None

    def attach(self, node: Node) -> None:
        """Report this node's groups and ring (once; Node does it)."""
        if self._node is None:
            self._node = node
            self.registry.register(_NodeCollector(node))

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


class _NodeCollector:
    """Reads a live node at scrape time: exact counters, current sizes."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> Iterable[Metric]:
        return []  # no registration-time check: families depend on the groups

    def collect(self) -> Iterable[Metric]:
        g = ["group"]
        gc = ["group", "cache"]
        counters = {
            "gets": CounterMetricFamily(
                "groupcache_gets", "Gets served by this worker (local or forwarded).", labels=g
            ),
            "hits": CounterMetricFamily("groupcache_hits", "Gets answered from the main or the hot cache.", labels=gc),
            "loads": CounterMetricFamily("groupcache_loads", "Gets that missed both caches.", labels=g),
            "loads_deduped": CounterMetricFamily(
                "groupcache_loads_deduped", "Loads that ran after singleflight (one per key and flight).", labels=g
            ),
            "peer_loads": CounterMetricFamily(
                "groupcache_peer_loads", "Values fetched from the owning peer.", labels=g
            ),
            "peer_errors": CounterMetricFamily(
                "groupcache_peer_errors", "Owner unreachable in time: loaded locally instead.", labels=g
            ),
            "server_requests": CounterMetricFamily(
                "groupcache_server_requests", "Gets forwarded to this worker by peers.", labels=g
            ),
            "origin": CounterMetricFamily(
                "groupcache_origin_loads", "Origin loads by outcome.", labels=["group", "result"]
            ),
            "evictions": CounterMetricFamily(
                "groupcache_cache_evictions", "Entries evicted to stay in budget.", labels=gc
            ),
            "peeks": CounterMetricFamily(
                "groupcache_peeks",
                "Misses that asked a previous owner after a ring change, by outcome.",
                labels=["group", "result"],
            ),
            "peeks_served": CounterMetricFamily(
                "groupcache_peeks_served", "Peeks this worker answered as a previous owner.", labels=["group", "result"]
            ),
            "handoff_entries": CounterMetricFamily(
                "groupcache_handoff_entries",
                "Entries handed off (out: by this worker when it stopped; in: to it).",
                labels=["group", "direction", "result"],
            ),
            "handoff_bytes": CounterMetricFamily(
                "groupcache_handoff_bytes",
                "Key + value bytes of the entries handed off, as handoff_entries.",
                labels=["group", "direction", "result"],
            ),
        }
        size = GaugeMetricFamily("groupcache_cache_bytes", "Key + value bytes held.", labels=gc)
        items = GaugeMetricFamily("groupcache_cache_items", "Entries held.", labels=gc)
        limit = GaugeMetricFamily("groupcache_cache_limit_bytes", "The group's cache_bytes budget.", labels=g)
        for name, group in self.node.groups.items():
            s = group.stats
            counters["gets"].add_metric([name], s.gets)
            counters["hits"].add_metric([name, "main"], s.main_hits)
            counters["hits"].add_metric([name, "hot"], s.hot_hits)
            counters["loads"].add_metric([name], s.loads)
            counters["loads_deduped"].add_metric([name], s.loads_deduped)
            counters["peer_loads"].add_metric([name], s.peer_loads)
            counters["peer_errors"].add_metric([name], s.peer_errors)
            counters["server_requests"].add_metric([name], s.server_requests)
            counters["origin"].add_metric([name, "ok"], s.local_loads)
            counters["origin"].add_metric([name, "not_found"], s.not_found)
            counters["origin"].add_metric([name, "error"], s.local_load_errs)
            peeks = {"hit": s.peek_hits, "miss": s.peek_misses, "error": s.peek_errors, "refused": s.peek_refused}
            for result, count in peeks.items():
                counters["peeks"].add_metric([name, result], count)
            counters["peeks_served"].add_metric([name, "hit"], s.peeks_served_hits)
            counters["peeks_served"].add_metric([name, "miss"], s.peeks_served_misses)
            for direction, results in HANDOFF_RESULTS:
                for result in results:
                    field = f"handoff_{direction}_{result}"
                    counters["handoff_entries"].add_metric([name, direction, result], getattr(s, field))
                    counters["handoff_bytes"].add_metric([name, direction, result], getattr(s, f"{field}_bytes"))
            limit.add_metric([name], group.cache_bytes)
            for label, store in (("main", group.main), ("hot", group.hot)):
                counters["evictions"].add_metric([name, label], store.evictions)
                size.add_metric([name, label], store.bytes)
                items.add_metric([name, label], len(store))
        yield from counters.values()
        yield from (size, items, limit)
        peers = self.node.peers
        yield GaugeMetricFamily(
            "groupcache_ring_revision", "etcd revision of the ring this worker holds.", value=peers.revision
        )
        yield GaugeMetricFamily("groupcache_ring_peers", "Nodes in the ring this worker holds.", value=len(peers.ring))
        owned = GaugeMetricFamily(
            "groupcache_ring_share", "Share of the key space each node of this worker's ring owns.", labels=["peer"]
        )
        for peer, share in peers.ring.shares().items():
            owned.add_metric([peer], share)
        yield owned
        yield GaugeMetricFamily(
            "groupcache_ring_member", "1 when this worker is in its own ring.", value=int(self.node.addr in peers.ring)
        )
        yield GaugeMetricFamily(
            "groupcache_draining", "1 while the worker drains before a stop.", value=int(self.node.draining)
        )
        refusals = getattr(self.node.transport, "socket_refusals", None)
        if refusals is not None:  # the engine counts what it refuses before Python sees it
            socket = CounterMetricFamily(
                "groupcache_socket_refusals",
                "Refused at the socket by the engine (limit: request_bytes at the gRPC length prefix, "
                "connections over node.max_connections).",
                labels=["limit"],
            )
            for name, count in refusals().items():
                socket.add_metric([name], count)
            yield socket
        last = self.node.rules.last_handoff
        yield GaugeMetricFamily(
            "groupcache_handoff_seconds",
            "Duration of this worker's last handoff (0: none yet).",
            value=last.seconds if last is not None else 0.0,
        )


# The loader wrapper ------------------------------------------------------------


class LogThrottle:
    """At most one line per (group, kind) per `interval` seconds; the next
    line says how many were left out, so an origin outage under load
    costs a few lines, not one per request."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._skipped: dict[tuple[str, str], int] = {}

    def allow(self, group: str, kind: str) -> int | None:
        """None to stay quiet, else the number of lines left out before this one."""
        key = (group, kind)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._skipped.pop(key, 0)


def instrument_loader(
    group: str,
    loader: Loader,
    metrics: NodeMetrics,
    *,
    slow_load: float = 1.0,
    throttle: LogThrottle | None = None,
) -> Loader:
    """The loader with its latency observed, origin errors logged at WARNING
    and loads slower than `slow_load` seconds (0: never) logged at INFO."""
    throttle = throttle or LogThrottle()
    ok = metrics.origin_seconds.labels(group, "ok")
    missing = metrics.origin_seconds.labels(group, "not_found")
    failed = metrics.origin_seconds.labels(group, "error")
    clock = time.perf_counter

    async def load(key: str) -> bytes:
        start = clock()
        try:
            value = await loader(key)
        except KeyNotFound:
            missing.observe(clock() - start)
            raise
        except InvalidRequest:
            failed.observe(clock() - start)  # as Stats counts it; the client's fault, not logged
            raise
        except Exception as exc:
            elapsed = clock() - start
            failed.observe(elapsed)
            skipped = throttle.allow(group, "error")
            if skipped is not None:
                event(
                    log,
                    logging.WARNING,
                    "origin load failed",
                    group=group,
                    key=key[:120],
                    cause=f"{type(exc).__name__}: {exc}",
                    seconds=f"{elapsed:.3f}",
                    suppressed=skipped,
                )
            raise
        elapsed = clock() - start
        ok.observe(elapsed)
        if slow_load and elapsed >= slow_load:
            skipped = throttle.allow(group, "slow")
            if skipped is not None:
                event(
                    log,
                    logging.INFO,
                    "slow origin load",
                    group=group,
                    key=key[:120],
                    seconds=f"{elapsed:.3f}",
                    threshold=f"{slow_load:g}",
                    bytes=len(value),
                    suppressed=skipped,
                )
        return value

    return load
