"""supervisord's XML-RPC interface over its unix socket."""

from __future__ import annotations

import math
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

RUNNING_STATES = {"STARTING", "RUNNING", "BACKOFF", "STOPPING"}
# supervisord checks a program's stopwaitsecs once a second, then SIGKILLs
# and reaps it: how long past its grace a program can still be seen up.
KILL_LAG = 2.0


def connect(sock: Path, auth: tuple[str, str] | None = None) -> Any:
    """The ``supervisor`` namespace of supervisord's XML-RPC interface
    (`auth`: its unix_http_server's username and password)."""
    username, password = auth or (None, None)
    transport = SupervisorTransport(username, password, serverurl=f"unix://{sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def states(supervisor: Any) -> dict[str, str]:
    return {p["name"]: p["statename"] for p in supervisor.getAllProcessInfo()}


def stop_wait(grace: float) -> float:
    """Longest a program with this stop grace (its stopwaitsecs) takes to be down."""
    return math.ceil(grace) + KILL_LAG


def stop_all(supervisor: Any, names: list[str], grace: float) -> list[str]:
    """Stop programs together (not one by one), given their stop grace;
    waits until they are down (at most ``stop_wait(grace)``) and returns
    the names still up then."""
    for name in names:
        try:
            supervisor.stopProcess(name, False)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString and "BAD_NAME" not in fault.faultString:
                raise
    deadline = time.monotonic() + stop_wait(grace)
    while True:
        current = states(supervisor)
        up = [n for n in names if current.get(n) in RUNNING_STATES]
        if not up or time.monotonic() >= deadline:
            return up
        time.sleep(0.1)
