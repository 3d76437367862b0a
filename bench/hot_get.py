"""Benchmark 1: hot Get on one worker against a bare grpc.aio echo server.

Both servers run in their own process and answer the same request (same
.proto, same value size). The key is warmed first, so every worker Get is a
main-cache hit. Runs of the two servers alternate; each ratio is the median
of per-round ratios (worker / echo).
"""

from __future__ import annotations

import lib
from lib import GET_PATH, get_body, get_once, h2load, value_key

CONCURRENCY = (1, 8, 32, 128)
SIZES = (100, 1024, 65536, 1 << 20)
SIZE_STREAMS = 8


def run(cfg) -> dict:
    seconds, rounds = cfg.seconds, cfg.rounds
    echo, eport = lib.start_echo("hot-echo")
    worker, wport, sock = lib.start_worker("hot-worker")
    servers = {"echo": (eport, echo), "worker": (wport, worker)}
    try:
        for size in SIZES:
            key = value_key(size)
            for port, _ in servers.values():
                got = get_once(port, key)
                assert len(got) == size, (size, len(got))
        before = lib.group_stats(sock)
        measured = 0
        guess = {}

        def arm(name: str, size: int, streams: int):
            port, proc = servers[name]
            body = get_body(value_key(size))

            def go():
                nonlocal measured
                g = guess.get((name, size, streams))
                if g is None:  # an unmeasured probe sizes the runs (and warms up)
                    probe = h2load(port, GET_PATH, body, n=300 if size < 65536 else 60, streams=streams,
                                   name=f"hot-probe-{name}", watch=[proc.pid], expect_data=lib.get_response_bytes(size))
                    if name == "worker":
                        measured += probe["succeeded"]
                    g = probe["rps"]
                n = int(min(400_000, max(100, g * seconds)))
                res = lib.per_request_cpu(h2load(port, GET_PATH, body, n=n, streams=streams,
                                                 name=f"hot-{name}-{size}-{streams}", watch=[proc.pid],
                                                 timeout=seconds * 8 + 30, expect_data=lib.get_response_bytes(size)))
                guess[(name, size, streams)] = res["rps"]
                if name == "worker":
                    measured += res["succeeded"]
                return res

            return go

        configs = [(100, s) for s in CONCURRENCY] + [(z, SIZE_STREAMS) for z in SIZES if z != 100]
        table = []
        for size, streams in configs:
            lib.log(f"hot Get: {size} B, {streams} streams")
            arms = {"echo": arm("echo", size, streams), "worker": arm("worker", size, streams)}
            runs = lib.interleave(arms, rounds)
            e, w = runs["echo"], runs["worker"]
            row = {
                "size": size,
                "streams": streams,
                "echo": lib.summarize(e),
                "worker": lib.summarize(w),
                "rps_ratio": lib.median([b["rps"] / a["rps"] for a, b in zip(e, w)]),
                "p50_ratio": lib.median([b["p50_ms"] / a["p50_ms"] for a, b in zip(e, w)]),
                "p99_ratio": lib.median([b["p99_ms"] / a["p99_ms"] for a, b in zip(e, w)]),
                "cpu_ratio": lib.median([b["cpu_us_per_req"] / a["cpu_us_per_req"] for a, b in zip(e, w)]),
            }
            lib.log(f"  echo {row['echo']['rps']:.0f}/s  worker {row['worker']['rps']:.0f}/s  "
                    f"ratio {row['rps_ratio']:.2f}  p50 x{row['p50_ratio']:.2f}  p99 x{row['p99_ratio']:.2f}  "
                    f"CPU/Get x{row['cpu_ratio']:.2f}")
            table.append(row)
        after = lib.group_stats(sock)
        hits = after["main_hits"] - before["main_hits"]
        return {
            "rows": table,
            "check": {"worker_requests": measured, "worker_main_hits": hits, "loads_during_runs": after["loads"] - before["loads"]},
            "seconds": seconds,
            "rounds": rounds,
        }
    finally:
        worker.kill()
        echo.kill()
