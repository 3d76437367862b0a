"""supervisord's XML-RPC interface over its unix socket."""

from __future__ import annotations

import time
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

RUNNING_STATES = {"STARTING", "RUNNING", "BACKOFF", "STOPPING"}


def connect(sock: Path):
    transport = SupervisorTransport(None, None, serverurl=f"unix://{sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def states(supervisor) -> dict[str, str]:
    return {p["name"]: p["statename"] for p in supervisor.getAllProcessInfo()}


def stop_all(supervisor, names: list[str], timeout: float) -> list[str]:
    """Stop programs together (not one by one); the names still up at timeout."""
    for name in names:
        try:
            supervisor.stopProcess(name, False)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString and "BAD_NAME" not in fault.faultString:
                raise
    deadline = time.monotonic() + timeout
    while True:
        current = states(supervisor)
        up = [n for n in names if current.get(n) in RUNNING_STATES]
        if not up or time.monotonic() >= deadline:
            return up
        time.sleep(0.1)
