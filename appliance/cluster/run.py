"""The controller process (`appliance controller`, started by supervisord):
the ring controller over etcd, the box's side of cluster-wide operations
(box_ops: stop-node and stats for this box's workers) and the box's
metrics endpoint, stopped by SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal

from ..config import Layout, Settings
from ..ops.box_metrics import serve_box_metrics
from ..tokens import TokenFileError, read_token
from . import etcd
from .box_ops import BoxOps
from .controller import Controller
from .vetting import HealthProver

log = logging.getLogger(__name__)


def run_controller(settings: Settings) -> int:
    """Run until a signal; returns the exit status (0)."""
    try:
        token: str | None = read_token(Layout(settings).token_path())  # `appliance run` made it
    except TokenFileError as exc:
        log.warning(
            "cluster-wide requests are refused and etcd members join unproven: cannot read the cluster token (%s)",
            exc,
        )
        token = None
    prover = None
    if settings.cluster.seed_interop:
        log.info("etcd members join the ring unproven: the seed's Go nodes (cluster.seed_interop) cannot prove")
    elif token is not None:
        prover = HealthProver(token, settings.tls)
    controller = Controller(
        lambda: etcd.connect_to(settings, timeout=1.0),  # a stuck member fails the probe within a second
        settings.cluster.service,
        Layout(settings).admin_sockets,
        prover=prover,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: controller.stop_event.set())  # records only
    ops = BoxOps(
        settings, lambda: etcd.connect_to(settings, timeout=1.0), stop_event=controller.stop_event, token=token
    )
    stop_metrics = serve_box_metrics(settings, controller, ops.refusals)
    ops.start()
    try:
        controller.run()
    finally:
        stop_metrics()
        ops.join(5)
    return 0
