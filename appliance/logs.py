"""One line per event on stderr, as key=value pairs supervisord and journald keep."""

from __future__ import annotations

import logging
import sys


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
