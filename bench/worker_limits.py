"""Benchmark: one worker at rest, and under one huge request, on each backend.

- idle: a worker that has a ring and has served (a few Gets, so every
  thread and timer is up), then nothing for IDLE_S seconds: its CPU
  (utime + stime, /proc/PID/stat) over that time, as a share of a core.
- huge: a GetRequest of REQUEST_MIB MiB (raw bytes on a grpc channel, as
  tests/reliability/test_worker_limits.py sends it), refused with
  RESOURCE_EXHAUSTED; the worker's peak RSS (VmHWM) before and after: what
  the refusal added. Then one ordinary Get, which must still be served.

Baseline: the grpcio backend, measured in the same run. Goals (issue 19): on
the engine, idle under 1% of a core, and the refused request adds under
4 MiB to the peak.
"""

from __future__ import annotations

import time

from fmt import missing, num, pct, ratio, table
from processes import HOST, log
from workers import default_server, get_once, start_worker, value_key

IDLE_S = 10.0
REQUEST_MIB = 50
MiB = 1 << 20
IDLE_GOAL = 0.01  # of a core
ADDED_GOAL_MIB = 4.0


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _huge(port: int, pid: int) -> dict:
    import grpc

    from appliance.pb import groupcache_pb2

    body = groupcache_pb2.GetRequest(group="bench", key="k" * (REQUEST_MIB * MiB)).SerializeToString()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    before = _hwm_kib(pid)
    with grpc.insecure_channel(f"{HOST}:{port}", options=options) as channel:
        try:
            channel.unary_unary("/groupcachepb.GroupCache/Get")(body, timeout=60)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
    added = (_hwm_kib(pid) - before) / 1024
    served_after = get_once(port, value_key(100, "after")) == b"v" * 100
    return {"code": code, "hwm_before_mib": before / 1024, "hwm_added_mib": added, "served_after": served_after}


def run(cfg) -> dict:
    rows = []
    for server in ("engine", "grpcio"):
        if server == "engine" and default_server() != "engine":
            continue  # not built here: the grpcio row alone
        proc, port, _ = start_worker(f"limits-{server}", server=server)
        try:
            for _ in range(20):  # warm: a miss, then hits (the engine's hit path opens with the ring)
                get_once(port, value_key(100, "warm"))
            log(f"worker_limits: {server} idle for {IDLE_S:g} s")
            cpu0, t0 = proc.cpu(), time.monotonic()
            time.sleep(IDLE_S)  # the measurement itself: a worker left alone for this long
            idle_cores = (proc.cpu() - cpu0) / (time.monotonic() - t0)
            log(f"worker_limits: {server}, one {REQUEST_MIB} MiB request")
            huge = _huge(port, proc.pid)
        finally:
            proc.kill()
        rows.append({"server": server, "idle_s": IDLE_S, "idle_cores": idle_cores, **huge})
    return {"rows": rows, "request_mib": REQUEST_MIB}


def _row(res: dict, server: str) -> dict | None:
    return next((r for r in res.get("rows", []) if r["server"] == server), None)


def section(res: dict | None) -> list[str]:
    out = ["## Worker at rest, and one huge request", ""]
    if msg := missing(res, "worker_limits"):
        return out + [msg, ""]
    assert res is not None
    out += [
        f"One worker per backend (`servers.py worker`), warmed with 20 Gets, then left alone for "
        f"{num(IDLE_S)} s; then one {res['request_mib']} MiB GetRequest, and one ordinary Get after it. "
        "CPU from /proc/PID/stat, peak memory from VmHWM. *Absolute*, this machine.",
        "",
        table(
            [
                "backend",
                "idle CPU (share of a core)",
                "huge request's status",
                "peak before, MiB",
                "peak added, MiB",
                "served after",
            ],
            [
                [
                    r["server"],
                    f"{r['idle_cores']:.2%}",
                    r["code"],
                    num(r["hwm_before_mib"], 1),
                    f"**{num(r['hwm_added_mib'], 1)}**",
                    "yes" if r["served_after"] else "**no**",
                ]
                for r in res["rows"]
            ],
        ),
        "",
    ]
    engine, grpcio = _row(res, "engine"), _row(res, "grpcio")
    if engine and grpcio:
        out += [
            f"Engine / grpcio: idle CPU {ratio(engine['idle_cores'] / max(grpcio['idle_cores'], 1e-9))}, "
            f"peak added {ratio(engine['hwm_added_mib'] / max(grpcio['hwm_added_mib'], 1e-3))}.",
            "",
        ]
    return out


def goal_rows(res: dict | None) -> list[tuple[str, str, str, bool]]:
    """(goal, target, measured, met) for the Goals table (goals.headline)."""
    engine = _row(res or {}, "engine")
    if engine is None:
        return []
    refused = engine["code"] == "RESOURCE_EXHAUSTED" and engine["served_after"]
    return [
        (
            f"Engine worker at rest ({num(engine['idle_s'])} s)",
            f"< {pct(IDLE_GOAL)} of a core",
            f"{engine['idle_cores']:.2%}",
            engine["idle_cores"] < IDLE_GOAL,
        ),
        (
            f"Engine worker, one {REQUEST_MIB} MiB request: peak memory added",
            f"< {ADDED_GOAL_MIB:g} MiB, refused",
            f"{num(engine['hwm_added_mib'], 1)} MiB ({engine['code']}"
            + (", serves on" if engine["served_after"] else ", **not served after**")
            + ")",
            refused and engine["hwm_added_mib"] < ADDED_GOAL_MIB,
        ),
    ]
