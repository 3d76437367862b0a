"""The controller process (`appliance controller`, started by supervisord):
the ring controller over etcd plus the box's metrics endpoint, stopped by
SIGTERM or SIGINT."""

from __future__ import annotations

import signal

from ..config import Settings
from ..ops.metrics import serve_box_metrics
from . import etcd
from .controller import Controller


def run_controller(settings: Settings) -> int:
    """Run until a signal; returns the exit status (0)."""
    controller = Controller(
        lambda: etcd.connect(settings.cluster, socket=settings.etcd_socket()),
        settings.cluster.service,
        settings.admin_sockets,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: controller.stop_event.set())  # records only
    stop_metrics = serve_box_metrics(settings, controller)
    try:
        controller.run()
    finally:
        stop_metrics()
    return 0
