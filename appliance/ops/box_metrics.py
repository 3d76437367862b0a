"""Prometheus metrics: each worker keeps its own registry, the controller
serves one endpoint per box that asks every local worker at scrape time.

Worker side: appliance.node.metrics (`NodeMetrics`, one registry per node,
returned in the text format by the admin RPC `Admin.Metrics`).

Box side (`BoxCollector`): a custom collector in the controller. At each
scrape it calls `Admin.Metrics` on every local worker's unix socket (in
parallel, with a deadline), parses the text with prometheus_client's own
parser and re-emits every family with a `worker="host:port"` label, plus
`groupcache_worker_up` per worker, the controller's ring view and whether
it reaches etcd (`groupcache_controller_etcd_up`).

Why not prometheus_client's multiprocess mode: it needs a shared directory
of mmap files that must be wiped at every start, it cannot express gauges
of processes that restarted (a dead worker's last cache bytes linger, or
vanish, depending on the aggregation mode), it has no custom collectors, so
ring state and cache sizes (read from live objects) would need a write on
every change, and it loses the `worker` identity unless each sample carries
a pid. Asking the live workers gives exact, current values, a worker that
does not answer shows up as `groupcache_worker_up 0` instead of stale
numbers, and the worker keeps no metrics files. The price is one unix-socket
call per worker and scrape (about a millisecond each).

The families are listed in appliance.node.metrics; each gets a `worker`
label here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from .. import addr as addrs
from ..admin_client import AdminClient
from ..config import Layout, dirs
from ..logs import event

if TYPE_CHECKING:
    from ..config import Settings, TlsSettings

log = logging.getLogger(__name__)


class RingView(Protocol):
    """What the endpoint reports of the controller's ring."""

    revision: int
    peers: list[str]
    etcd_ok: bool

    def unproven(self) -> list[str]: ...


# The box endpoint (controller) -------------------------------------------------


class BoxCollector:
    """Collects every local worker's registry at scrape time, labelled `worker`."""

    def __init__(
        self,
        sockets: Callable[[], list[str]],
        *,
        fallback_label: Callable[[str], str] = lambda path: path,
        controller: RingView | None = None,
        refusals: Callable[[], dict[str, int]] | None = None,
        timeout: float = 2.0,
        min_interval: float = 1.0,
    ) -> None:
        """`min_interval`: scrapes closer together than this share one
        round of asking the workers (a flood of scrapes costs them nothing more).
        `refusals()`: what the box's own limits refused, by limit."""
        self._refusals = refusals
        self._sockets = sockets
        self.min_interval = min_interval
        self._round_lock = threading.Lock()
        self._round: tuple[float, list[Metric]] | None = None  # (when, families)
        self._fallback = fallback_label
        self._controller = controller
        self.timeout = timeout
        self._lock = threading.Lock()
        self._clients: dict[str, AdminClient] = {}

    def describe(self) -> Iterable[Metric]:
        return []

    def _client(self, path: str) -> AdminClient:
        with self._lock:
            client = self._clients.get(path)
            if client is None:
                client = self._clients[path] = AdminClient(path, timeout=self.timeout)
            return client

    def _drop(self, path: str) -> None:
        with self._lock:
            client = self._clients.pop(path, None)
        if client is not None:
            client.close()

    def collect(self) -> Iterable[Metric]:
        with self._round_lock:  # concurrent scrapes wait for one round and share it
            now = time.monotonic()
            if self._round is None or now - self._round[0] >= self.min_interval:
                self._round = (now, list(self._ask_workers()))
            return list(self._round[1]) + list(self._box_families())  # the box's own: fresh at each scrape

    def _ask_workers(self) -> Iterable[Metric]:
        paths = self._sockets()
        with self._lock:
            gone = set(self._clients) - set(paths)
        for path in gone:
            self._drop(path)
        calls = [(path, self._client(path).metrics_future(timeout=self.timeout)) for path in paths]
        up = GaugeMetricFamily(
            "groupcache_worker_up", "1 when the worker answered this scrape, else 0.", labels=["worker"]
        )
        families: dict[str, Metric] = {}
        for path, call in calls:
            try:
                reply = call.result()
                parsed = list(text_string_to_metric_families(reply.text))
            except grpc.RpcError:
                up.add_metric([self._fallback(path)], 0)
                self._drop(path)
                continue
            except ValueError as exc:  # cannot happen with our own workers
                log.warning("unparsable metrics from %s: %s", path, exc)
                up.add_metric([self._fallback(path)], 0)
                continue
            worker = reply.addr or self._fallback(path)
            up.add_metric([worker], 1)
            # The text format has no `_created` samples: the parser turns
            # them into gauge families of their own. Drop those.
            created = {f.name + "_created" for f in parsed if f.type in ("counter", "histogram", "summary")}
            for family in parsed:
                if family.name in created and family.type == "gauge":
                    continue
                out = families.get(family.name)
                if out is None:
                    out = families[family.name] = Metric(family.name, family.documentation, family.type)
                for s in family.samples:
                    out.add_sample(s.name, {"worker": worker, **s.labels}, s.value, s.timestamp, s.exemplar)
        yield up
        yield from families.values()

    def _box_families(self) -> Iterable[Metric]:
        if self._refusals is not None:
            refused = CounterMetricFamily(
                "groupcache_box_refusals",
                "Refused by a limit of the box (metrics_connections: scrapes over ops.metrics_connections; "
                "stats_backlog: stats requests past the backlog; unsigned_requests: etcd requests not signed "
                "with the cluster token).",
                labels=["limit"],
            )
            for limit, count in sorted(self._refusals().items()):
                refused.add_metric([limit], count)
            yield refused
        c = self._controller
        if c is not None:
            yield GaugeMetricFamily(
                "groupcache_controller_ring_revision",
                "etcd revision of the ring the controller pushes.",
                value=c.revision,
            )
            yield GaugeMetricFamily(
                "groupcache_controller_ring_peers", "Live nodes the controller sees in etcd.", value=len(c.peers)
            )
            yield GaugeMetricFamily(
                "groupcache_controller_unproven_members",
                "etcd members kept out of the ring: their address did not prove it is a worker of this cluster.",
                value=len(c.unproven()),
            )
            yield GaugeMetricFamily(
                "groupcache_controller_etcd_up",
                "1 while the controller's etcd watch and probe work, else 0.",
                value=int(c.etcd_ok),
            )

    def close(self) -> None:
        with self._lock:
            paths = list(self._clients)
        for path in paths:
            self._drop(path)


def box_registry(collector: BoxCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def _bound_connections(
    server: Any, limit: int, idle_timeout: float, on_refused: Callable[[], None] = lambda: None
) -> None:
    """At most `limit` connections served at once by prometheus_client's
    threading server (a thread each); past it a connection is closed at
    once (`on_refused()`), and a connection idle `idle_timeout` seconds is closed."""
    slots = threading.BoundedSemaphore(limit)
    accept, serve = server.process_request, server.process_request_thread
    server.RequestHandlerClass = type("BoundedHandler", (server.RequestHandlerClass,), {"timeout": idle_timeout})

    def process_request(request: Any, client_address: Any) -> None:
        if not slots.acquire(blocking=False):
            on_refused()
            server.shutdown_request(request)
            return
        try:
            accept(request, client_address)  # starts the thread
        except BaseException:
            slots.release()
            raise

    def process_request_thread(request: Any, client_address: Any) -> None:
        try:
            serve(request, client_address)
        finally:
            slots.release()

    server.process_request = process_request
    server.process_request_thread = process_request_thread


def serve_metrics(
    addr: str,
    registry: CollectorRegistry,
    tls: TlsSettings | None = None,
    *,
    max_connections: int = 4,
    idle_timeout: float = 10.0,
    on_refused: Callable[[], None] = lambda: None,
) -> Callable[[], None]:
    """Serve `registry` on http(s)://addr/metrics from a daemon thread;
    returns a function that stops it. With `tls` (enabled TlsSettings) the
    endpoint speaks HTTPS, and with client_auth it requires a client cert."""
    from prometheus_client import start_http_server

    host, port = addrs.split(addr)
    kwargs: dict[str, Any] = {}
    if tls is not None and tls.enabled:
        kwargs = {
            "certfile": str(tls.cert),
            "keyfile": str(tls.key),
            "client_cafile": str(tls.ca) if tls.ca else None,
            "client_auth_required": bool(tls.client_auth),
        }
    server, thread = start_http_server(port, addr=host, registry=registry, **kwargs)
    _bound_connections(server, max_connections, idle_timeout, on_refused)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


def serve_box_metrics(
    settings: Settings, controller: RingView | None = None, refusals: Callable[[], dict[str, int]] | None = None
) -> Callable[[], None]:
    """The box's endpoint at ops.metrics_addr, run by the controller; a
    function that stops it. A port that cannot be bound is logged, not
    fatal: the controller's real job is the ring."""
    ops, ns = settings.ops, settings.node
    if not ops.metrics_addr:
        return lambda: None

    def fallback(path: str) -> str:
        # worker-3.sock -> the address worker 3 serves, for a worker that does not answer
        index = dirs.admin_socket_index(path)
        return addrs.join(ns.host, ns.base_port + index) if index is not None else path

    scrapes_refused = [0]  # by the endpoint's one accepting thread

    def all_refusals() -> dict[str, int]:
        return {"metrics_connections": scrapes_refused[0], **(refusals() if refusals is not None else {})}

    def refused_scrape() -> None:
        scrapes_refused[0] += 1

    collector = BoxCollector(
        Layout(settings).admin_sockets, fallback_label=fallback, controller=controller, refusals=all_refusals
    )
    tls = settings.tls if ops.metrics_tls and settings.tls.enabled else None
    try:
        stop = serve_metrics(
            ops.metrics_addr,
            box_registry(collector),
            tls,
            max_connections=ops.metrics_connections,
            on_refused=refused_scrape,
        )
    except OSError as exc:
        event(log, logging.ERROR, "metrics endpoint not started", addr=ops.metrics_addr, cause=str(exc))
        collector.close()
        return lambda: None
    event(
        log, logging.INFO, "metrics endpoint serving", url=f"{'https' if tls else 'http'}://{ops.metrics_addr}/metrics"
    )

    def stop_all() -> None:
        stop()
        collector.close()

    return stop_all
