"""One worker process: a cache node registered in etcd under its own lease.

Started by supervisord as `appliance worker --index I`. SIGTERM (or the
admin Stop call) starts a graceful stop: deregister, wait for the ring
without us, hand the main cache to the keys' new owners (what is left of
drain_timeout, at most handoff_timeout), finish what is in flight, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from .cluster import etcd
from .cluster.registry import Registration, call_timeout
from .config import Layout, Settings
from .node.metrics import LogThrottle, NodeMetrics, instrument_loader
from .node.serving import Node
from .origins import build_origin
from .tokens import read_token

log = logging.getLogger(__name__)


async def serve(settings: Settings, index: int) -> int:
    ns, layout = settings.node, Layout(settings)
    runtime = layout.runtime_path()
    runtime.mkdir(parents=True, exist_ok=True)
    sock = layout.admin_socket(index)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()  # left by a killed predecessor
    origins = {
        name: build_origin(name, group, state_dir=layout.state_path(), max_value_bytes=ns.max_value_bytes)
        for name, group in settings.groups.items()
    }
    # Origin latency, origin errors and slow loads are observed here, around
    # the loaders, so that appliance.cache stays free of metrics and logs.
    metrics = NodeMetrics()
    throttle = LogThrottle()
    loaders = {
        name: instrument_loader(name, o.load, metrics, slow_load=settings.ops.slow_load, throttle=throttle)
        for name, o in origins.items()
    }
    http_ports = layout.http_ports()
    node = Node(
        settings,
        loaders,
        port=ns.base_port + index,
        admin_address=f"unix:{sock}",
        http_port=http_ports[index] if http_ports else None,
        metrics=metrics,
        token=read_token(layout.token_path()),  # `appliance run` made it
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.request_stop)  # records only
    await node.start()
    # Register once the controller's ring has told us who is there: peers
    # forward to us as soon as we are in their ring, and with no ring we
    # could only load their misses from the origin (not peek at the nodes
    # that held our keys meanwhile). The controller pushes to a new socket
    # within a fraction of a second; without one we register anyway.
    if not await node.rules.wait_for_ring(float(settings.cluster.lease_ttl)):
        log.warning("%s: no ring from the controller yet; registering anyway", node.addr)
    registration = Registration(
        lambda: etcd.connect_to(settings, timeout=call_timeout(settings.cluster.lease_ttl)),
        settings.cluster.service,
        node.addr,
        ttl=settings.cluster.lease_ttl,
        metadata={
            "admin": f"unix:{sock}",
            "box": ns.host,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "worker": index,
        },
        seed_clusters=settings.cluster.seed_interop,
    )
    registration.start()
    try:
        await node.stop_requested.wait()
        drain = node.stop_drain_timeout or ns.drain_timeout
        stopping = loop.time()
        log.info("stopping %s: deregistering, draining for up to %.1fs", node.addr, drain)
        await asyncio.to_thread(registration.deregister)
        left = await node.drain(drain)
        log.info("%s %s the ring; handing off", node.addr, "left" if left else "timed out leaving")
        # The handoff runs inside the drain's time: it never delays the stop beyond drain_timeout.
        await node.handoff(min(ns.handoff_timeout, drain - (loop.time() - stopping)))
    finally:
        await node.stop(grace=ns.peer_timeout)
        await asyncio.gather(*(o.close() for o in origins.values()), return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
    log.info("%s stopped", node.addr)
    return 0


def run(settings: Settings, index: int) -> int:
    """serve() on a SharedLoop: the engine backend's receiving thread answers
    hits under the loop's lock instead of waking the loop for each batch."""
    from .fronts.grpc_engine.loop import run as run_shared

    return run_shared(serve(settings, index))
