"""One line per event on stderr, as logfmt key=value pairs that supervisord
and journald keep and that log tools (Loki, Vector, `grep key=value`) parse.

    time=2025-01-02T03:04:05.678+00:00 level=WARNING role=worker-0 logger=appliance.worker
      msg="origin load failed" group=scores key=k1 cause="OriginError: ..."   (one line, wrapped here)

Values with spaces, quotes or `=` are quoted; newlines are escaped, so an
event (a traceback included) never spans lines: journald would otherwise
store each line as its own entry. Structured fields come from
``event(logger, level, msg, **fields)`` (or ``extra={"fields": {...}}``).

Nothing logs a line per request at the default level: the per-request
story is in the metrics. What is logged: ring changes (revision, peer
count), registrations, graceful stops, origin errors and slow loads
(rate-limited per group, see appliance.ops.box_metrics), and bugs.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

_PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+,[]()")


def quote(value: object) -> str:
    """A logfmt value: bare when safe, else double-quoted with escapes."""
    text = value if isinstance(value, str) else str(value)
    if text and all(c in _PLAIN for c in text):
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        tz = time.strftime("%z", time.localtime(record.created))
        parts = [
            f"time={ts}.{int(record.msecs):03d}{tz[:3]}:{tz[3:]}",
            f"level={record.levelname}",
            f"role={quote(self.role)}",
            f"logger={quote(record.name)}",
            f"msg={quote(message)}",
        ]
        fields = getattr(record, "fields", None)
        if fields:
            parts.extend(f"{k}={quote(v)}" for k, v in fields.items())
        return " ".join(parts)


def event(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    """Log one event with structured fields (key=value after msg)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})


def setup(level: str = "info", role: str = "appliance") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and etcd3 chatter at INFO is not ours to report; aiohttp's access
    # log would be a line per HTTP request.
    for noisy in ("grpc", "etcd3", "asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    threading.excepthook = _thread_exception


def _thread_exception(args) -> None:
    # python3-etcd3's watch thread dies noisily when its channel is closed
    # under it (we close it on purpose when resyncing or stopping).
    name = args.thread.name if args.thread else "?"
    logging.getLogger("appliance.thread").warning(
        "thread %s ended: %s: %s", name, args.exc_type.__name__, args.exc_value
    )
