"""Benchmark 10: what a Python application pays per cached read (issue 20).

One worker on the engine backend holds a hot 100 B key. Applications read
it with `Client.get` (sequential) and `AsyncClient.get` (1 and 16 in
flight), each on the engine's client and on grpc's. The baselines are
measured in the same run on the same box: redis-py `GET` and redis.asyncio
on redis-server, and pymemcache `get` on memcached, each with a 100 B
value, all hits.

Each cell runs in its own process (`python clients.py cell ...`), so no
library's threads or caches linger into the next; it reads for up to
`--seconds` (bounded in count too) after a second of unmeasured reads, and reports
the reads it made and its own CPU seconds (all its threads: the engine's
and grpc's I/O threads count as the application's). Cells alternate over
`--rounds`; the medians are reported, and ratios against the baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time

from fmt import num, opening, ratio, table
from goals import GOALS
from memcached import start_memcached
from processes import HOST, ROOT, Proc, free_port, log, need, wait_port
from rounds import interleave, median
from workers import get_once, start_worker, value_key

SIZE = 100
MAX_READS = 200_000
# A fresh process reads at a higher cost for its first second or so (caches,
# allocator, CPU clocks): what is measured is the steady state after it.
WARM_S = 1.0

# (cell, what it reads with, in flight)
CELLS = (
    ("client/engine", "sync-engine", 1),
    ("client/grpc", "sync-grpc", 1),
    ("redis-py", "redis", 1),
    ("pymemcache", "memcache", 1),
    ("async/engine 1", "async-engine", 1),
    ("async/grpc 1", "async-grpc", 1),
    ("redis.asyncio 1", "redis-async", 1),
    ("async/engine 16", "async-engine", 16),
    ("async/grpc 16", "async-grpc", 16),
    ("redis.asyncio 16", "redis-async", 16),
)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(read, seconds: float) -> dict:
    warm = time.perf_counter() + WARM_S
    for n in range(MAX_READS):
        read()
        if n % 100 == 0 and time.perf_counter() >= warm:
            break
    cpu0, t0 = _cpu(), time.perf_counter()
    n, stop = 0, t0 + seconds
    while n < MAX_READS:
        for _ in range(100):
            read()
        n += 100
        if time.perf_counter() >= stop:
            break
    return {"reads": n, "cpu_s": _cpu() - cpu0, "wall_s": time.perf_counter() - t0}


async def _timed_async(read, seconds: float, inflight: int) -> dict:
    warm = time.perf_counter() + WARM_S
    for _ in range(MAX_READS // inflight):
        await asyncio.gather(*(read() for _ in range(inflight)))
        if time.perf_counter() >= warm:
            break
    cpu0, t0 = _cpu(), time.perf_counter()
    stop = t0 + seconds
    count = [0]

    async def reader() -> None:
        while count[0] < MAX_READS and time.perf_counter() < stop:
            for _ in range(20):
                await read()
            count[0] += 20

    await asyncio.gather(*(reader() for _ in range(inflight)))
    return {"reads": count[0], "cpu_s": _cpu() - cpu0, "wall_s": time.perf_counter() - t0}


def cell(kind: str, port: int, key: str, seconds: float, inflight: int) -> dict:
    """One cell, in this process."""
    addr = f"{HOST}:{port}"
    if kind in ("sync-engine", "sync-grpc"):
        from appliance.client import Client

        with Client([addr], engine=kind == "sync-engine", spread_hot=False) as c:
            assert len(c.get("bench", key)) == SIZE
            return _timed(lambda: c.get("bench", key), seconds)
    if kind == "redis":
        import redis

        r = redis.Redis(host=HOST, port=port)
        assert len(r.get(key)) == SIZE
        return _timed(lambda: r.get(key), seconds)
    if kind == "memcache":
        from pymemcache.client.base import Client as Memcache

        m = Memcache((HOST, port), no_delay=True)
        assert len(m.get(key)) == SIZE
        return _timed(lambda: m.get(key), seconds)
    return asyncio.run(_cell_async(kind, addr, port, key, seconds, inflight))


async def _cell_async(kind: str, addr: str, port: int, key: str, seconds: float, inflight: int) -> dict:
    if kind == "redis-async":
        import redis.asyncio

        r = redis.asyncio.Redis(host=HOST, port=port, max_connections=inflight)
        try:
            assert len(await r.get(key)) == SIZE
            return await _timed_async(lambda: r.get(key), seconds, inflight)
        finally:
            await r.aclose()
    from appliance.client import AsyncClient

    async with AsyncClient([addr], engine=kind == "async-engine", spread_hot=False) as c:
        assert len(await c.get("bench", key)) == SIZE
        return await _timed_async(lambda: c.get("bench", key), seconds, inflight)


def _start_redis() -> tuple[Proc, int]:
    port = free_port()
    cmd = [need("redis-server", "redis-server"), "--bind", HOST, "--port", str(port)]
    proc = Proc([*cmd, "--save", "", "--appendonly", "no", "--io-threads", "1"], "redis")
    wait_port(port, 20, proc)
    return proc, port


def _run_cell(kind: str, port: int, key: str, seconds: float, inflight: int) -> dict:
    cmd = [sys.executable, __file__, "cell", kind, str(port), key, str(seconds), str(inflight)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 4 + 60, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"cell {kind} failed: {out.stderr.strip()[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["cpu_us_per_read"] = res["cpu_s"] / max(res["reads"], 1) * 1e6
    res["reads_per_s"] = res["reads"] / max(res["wall_s"], 1e-9)
    return res


def run(cfg) -> dict:
    import pymemcache.client.base
    import redis

    worker, wport, _ = start_worker("clients-worker", server="engine", mirror=0.0)
    rproc, rport = _start_redis()
    mproc, mport = start_memcached()
    try:
        key = value_key(SIZE, "app")
        value = get_once(wport, key)  # the worker holds it from now on
        assert len(value) == SIZE
        redis.Redis(host=HOST, port=rport).set(key, value)
        pymemcache.client.base.Client((HOST, mport)).set(key, value)
        ports = {"redis": rport, "redis-async": rport, "memcache": mport}
        seconds = max(0.5, cfg.seconds)
        arms = {
            name: (lambda kind=kind, n=n: _run_cell(kind, ports.get(kind, wport), key, seconds, n))
            for name, kind, n in CELLS
        }
        runs = interleave(arms, cfg.rounds)
        cells = {}
        for name, _, _ in CELLS:
            rs = runs[name]
            cells[name] = {
                "cpu_us_per_read": median([r["cpu_us_per_read"] for r in rs]),
                "reads_per_s": median([r["reads_per_s"] for r in rs]),
                "cpu_us_all": [round(r["cpu_us_per_read"], 1) for r in rs],
            }
            log(
                f"  {name}: {cells[name]['cpu_us_per_read']:.1f} us of application CPU per read, "
                f"{cells[name]['reads_per_s']:.0f} reads/s"
            )

        def vs(a: str, b: str) -> dict:
            return {
                "cpu": cells[a]["cpu_us_per_read"] / cells[b]["cpu_us_per_read"],
                "rps": cells[a]["reads_per_s"] / cells[b]["reads_per_s"],
            }

        ratios = {
            "client_vs_redis": vs("client/engine", "redis-py"),
            "client_vs_pymemcache": vs("client/engine", "pymemcache"),
            "client_engine_vs_grpc": vs("client/engine", "client/grpc"),
            "async1_vs_redis": vs("async/engine 1", "redis.asyncio 1"),
            "async16_vs_redis": vs("async/engine 16", "redis.asyncio 16"),
            "async16_engine_vs_grpc": vs("async/engine 16", "async/grpc 16"),
        }
        return {"cells": cells, "ratios": ratios, "cells_order": [c[0] for c in CELLS]}
    finally:
        worker.kill()
        rproc.kill()
        mproc.kill()


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cell", help="one cell, printed as JSON")
    c.add_argument("kind")
    c.add_argument("port", type=int)
    c.add_argument("key")
    c.add_argument("seconds", type=float)
    c.add_argument("inflight", type=int)
    args = p.parse_args()
    print(json.dumps(cell(args.kind, args.port, args.key, args.seconds, args.inflight)))
    return 0


def section(res: dict | None) -> list[str]:
    out, ran = opening("## 10. What an application pays per cached read", res, "clients")
    if not ran:
        return out
    out += [
        "One engine worker holds a hot 100 B key; redis-server and memcached (1 thread) hold the same value. "
        "Each cell is a fresh process reading it, sequentially or with N reads in flight on one event loop; "
        "application CPU is that process's (all its threads). Medians of the rounds.",
        "",
    ]
    rows = []
    for name in res["cells_order"]:
        c = res["cells"][name]
        rows.append([name, num(c["cpu_us_per_read"], 1), num(c["reads_per_s"])])
    out += [table(["reader", "application CPU µs per read (abs.)", "reads/s (abs.)"], rows), ""]
    r = res["ratios"]
    out += [
        f"Engine's client vs grpc's: `Client.get` {ratio(r['client_engine_vs_grpc']['cpu'])} the CPU per read, "
        f"{ratio(r['client_engine_vs_grpc']['rps'])} the reads/s; `AsyncClient.get` with 16 in flight "
        f"{ratio(r['async16_engine_vs_grpc']['cpu'])} the CPU, {ratio(r['async16_engine_vs_grpc']['rps'])} the "
        f"reads/s. `AsyncClient.get`, 1 in flight, vs redis.asyncio: {ratio(r['async1_vs_redis']['cpu'])} the CPU.",
        "",
    ]
    return out


def goal_rows(cl: dict) -> list[tuple[str, str, str, bool]]:
    if not cl.get("ratios"):
        return []
    rows = []
    for goal, ratio_key, label, a, b in (
        ("client_vs_redis", "client_vs_redis", "Client.get vs redis-py", "client/engine", "redis-py"),
        ("client_vs_pymemcache", "client_vs_pymemcache", "Client.get vs pymemcache", "client/engine", "pymemcache"),
        (
            "async16_vs_redis",
            "async16_vs_redis",
            "AsyncClient.get vs redis.asyncio, 16 in flight",
            "async/engine 16",
            "redis.asyncio 16",
        ),
    ):
        g, v = GOALS[goal], cl["ratios"][ratio_key]["cpu"]
        cells = cl["cells"]
        rows.append(
            (
                f"{label}: application CPU per cached read",
                g.target(),
                f"{ratio(v)} ({num(cells[a]['cpu_us_per_read'])} vs {num(cells[b]['cpu_us_per_read'])} µs; "
                f"reads/s {ratio(cl['ratios'][ratio_key]['rps'])})",
                g.met(v),
            )
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
