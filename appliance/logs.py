"""One line per event on stderr, as key=value pairs supervisord and journald keep."""

from __future__ import annotations

import logging
import sys
import threading


def setup(level: str = "info", role: str = "appliance") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s level=%(levelname)s role={role} logger=%(name)s msg=%(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and etcd3 chatter at INFO is not ours to report.
    for noisy in ("grpc", "etcd3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    threading.excepthook = _thread_exception


def _thread_exception(args) -> None:
    # python3-etcd3's watch thread dies noisily when its channel is closed
    # under it (we close it on purpose when resyncing or stopping).
    name = args.thread.name if args.thread else "?"
    logging.getLogger("appliance.thread").warning(
        "thread %s ended: %s: %s", name, args.exc_type.__name__, args.exc_value
    )
