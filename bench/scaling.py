"""Benchmark 7: scaling. Aggregate hot-Get throughput of N = 1 and N = 2
workers on this box, with the client's CPU share.

max(N) worker processes share one ring. For each N, one h2load process per
worker (one thread each, 32 streams) drives the first N workers at the same
time, each with a key that worker owns (main-cache hits, no forwarding).
Runs for the different N alternate. CPU: h2load's own (its rusage) and the
workers' (/proc/<pid>/stat before and after); client share = client CPU /
(client + workers). On a larger box: `python bench/run.py scaling
--scaling-workers 1,2,4,8 --worker-cpus 0-7 --client-cpus 8-11`
(see results.md).
"""

from __future__ import annotations

import os
import threading
import time

from fmt import num, opening, pct, ratio, table
from h2load import GET_PATH, get_body, get_response_bytes, h2load
from processes import box_busy_s, log
from rounds import interleave, median
from workers import get_once, owned_key, start_ring

STREAMS = 32


def run(cfg) -> dict:
    sizes = [int(x) for x in str(cfg.scaling_workers).split(",") if x]
    names = [f"scale-{i}" for i in range(max(sizes))]
    # Optional pinning (a larger box): workers on one set of CPUs, the
    # h2load clients on another, through taskset.
    wpin = ["taskset", "-c", cfg.worker_cpus] if getattr(cfg, "worker_cpus", None) else []
    cpin = ["taskset", "-c", cfg.client_cpus] if getattr(cfg, "client_cpus", None) else []
    nodes = start_ring(names, prefix=wpin)
    addrs = [addr for *_, addr in nodes]
    try:
        bodies = []
        for i, (_proc, port, _sock, addr) in enumerate(nodes):
            key = owned_key(addr, addrs, 100, f"scale{i}-")
            assert len(get_once(port, key)) == 100
            bodies.append(get_body(key))
        guess = {n: 5000.0 for n in sizes}

        def drive(n: int):
            def go():
                per = int(min(300_000, max(500, guess[n] * cfg.seconds * 1.5)))
                results: list = [None] * n
                before = {p.pid: p.cpu() for p, *_ in nodes[:n]}
                busy0 = box_busy_s()
                t0 = time.monotonic()

                def one(i):
                    proc, port, *_ = nodes[i]
                    results[i] = h2load(
                        port,
                        GET_PATH,
                        bodies[i],
                        n=per,
                        streams=STREAMS,
                        name=f"scale-{n}-{i}",
                        timeout=cfg.seconds * 10 + 30,
                        prefix=cpin,
                        expect_data=get_response_bytes(100),
                    )

                threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.monotonic() - t0
                busy = box_busy_s() - busy0
                worker_cpu = sum(p.cpu() - before[p.pid] for p, *_ in nodes[:n])
                client_cpu = sum(r["client_cpu_s"] for r in results)
                done = sum(r["succeeded"] for r in results)
                # Aggregate rate over the span all h2loads were running.
                rate = sum(r["rps"] for r in results)
                guess[n] = rate / n
                return {
                    "workers": n,
                    "rps": rate,
                    "requests": done,
                    "wall_s": wall,
                    "per_worker_rps": [r["rps"] for r in results],
                    "p50_ms": median([r["p50_ms"] for r in results]),
                    "p99_ms": max(r["p99_ms"] for r in results),
                    "worker_cpu_s": worker_cpu,
                    "client_cpu_s": client_cpu,
                    "client_cpu_share": client_cpu / max(1e-9, client_cpu + worker_cpu),
                    "box_cpu_used": (client_cpu + worker_cpu) / wall,
                    "other_cpu_cores": max(0.0, busy - client_cpu - worker_cpu) / wall,
                }

            return go

        for n in sizes:  # warm-up, sizes the runs
            drive(n)()
        runs = interleave({n: drive(n) for n in sizes}, cfg.rounds)
        rows = []
        base = None
        for n in sizes:
            rs = runs[n]
            row = {
                "workers": n,
                "rps": median([r["rps"] for r in rs]),
                "rps_all": [round(r["rps"]) for r in rs],
                "p50_ms": median([r["p50_ms"] for r in rs]),
                "p99_ms": median([r["p99_ms"] for r in rs]),
                "client_cpu_share": median([r["client_cpu_share"] for r in rs]),
                "box_cpu_used": median([r["box_cpu_used"] for r in rs]),
                "worker_cores": median([r["worker_cpu_s"] / r["wall_s"] for r in rs]),
                "other_cpu_cores": median([r["other_cpu_cores"] for r in rs]),
                "rps_best": max(r["rps"] for r in rs),
                "worker_cpu_us_per_req": median([r["worker_cpu_s"] / max(1, r["requests"]) * 1e6 for r in rs]),
            }
            if base is None:
                base = runs[n]
            row["speedup"] = median([r["rps"] / b["rps"] for r, b in zip(rs, base, strict=True)])
            log(
                f"scaling: N={n}: {row['rps']:.0f} Gets/s (x{row['speedup']:.2f} N={sizes[0]}), client CPU share "
                f"{row['client_cpu_share']:.0%}, bench CPU {row['box_cpu_used']:.2f} cores, others "
                f"{row['other_cpu_cores']:.2f} cores; rounds {row['rps_all']}"
            )
            rows.append(row)
        return {
            "rows": rows,
            "streams_per_worker": STREAMS,
            "cpus": os.cpu_count(),
            "worker_cpus": getattr(cfg, "worker_cpus", None),
            "client_cpus": getattr(cfg, "client_cpus", None),
        }
    finally:
        for proc, *_ in nodes:
            proc.kill()


def section(res: dict | None) -> list[str]:
    out, ran = opening("## 7. Scaling", res, "scaling")
    if not ran:
        return out
    out += [
        f"One h2load process (1 thread, {res['streams_per_worker']} streams) per worker, each worker sent a key it "
        "owns; runs for the different N alternate.",
        "",
    ]
    rows = []
    for r in res["rows"]:
        rows.append(
            [
                r["workers"],
                num(r["rps"]),
                f"**{ratio(r['speedup'])}**",
                str(r["rps_all"]),
                num(r["rps_best"]),
                num(r["p50_ms"], 2),
                num(r["p99_ms"], 2),
                pct(r["client_cpu_share"]),
                num(r["box_cpu_used"], 2),
                num(r["worker_cpu_us_per_req"]),
                num(r["other_cpu_cores"], 2),
            ]
        )
    out += [
        table(
            [
                "N",
                "aggregate Gets/s (abs.)",
                "vs N=1",
                "rounds",
                "best round",
                "p50 ms",
                "p99 ms (worst worker)",
                "client CPU share",
                "cores used by bench",
                "worker CPU µs per Get",
                "others",
            ],
            rows,
        ),
        "",
        "![scaling](scaling.png)",
        "",
        f"One worker alone used {num(res['rows'][0].get('worker_cores'), 2)} cores of the {res.get('cpus')}"
        + (
            f"; workers pinned to CPUs {res['worker_cpus']}, clients to {res['client_cpus']}"
            if res.get("worker_cpus")
            else ""
        )
        + ".",
        "",
    ]
    return out


def plot(sc: dict, plt):
    if not sc.get("rows"):
        return None
    fig, a = plt.subplots(figsize=(6, 4))
    ns = [r["workers"] for r in sc["rows"]]
    a.bar(range(len(ns)), [r["rps"] for r in sc["rows"]], color="C0")
    for i, r in enumerate(sc["rows"]):
        a.text(
            i,
            r["rps"],
            f"{r['speedup']:.2f}×\nclient {r['client_cpu_share']:.0%} of CPU",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    a.set_xticks(range(len(ns)), [f"N = {n}" for n in ns])
    a.set(
        ylabel="aggregate Gets/s (absolute, this box)",
        title=f"Scaling on {sc.get('cpus', '?')} cores (hot Gets, 100 B)",
    )
    a.set_ylim(top=max(r["rps"] for r in sc["rows"]) * 1.3)
    return fig


FIGURES = {"scaling.png": plot}


def goal_rows(sc: dict) -> list[tuple[str, str, str, None]]:
    if not sc.get("rows") or len(sc["rows"]) < 2:
        return []
    last = sc["rows"][-1]
    return [
        (
            f"Scaling N = {sc['rows'][0]['workers']} → {last['workers']} on {sc.get('cpus')} cores",
            "report",
            f"{ratio(last['speedup'])} aggregate; client CPU share "
            + ", ".join(pct(r["client_cpu_share"]) for r in sc["rows"]),
            None,
        )
    ]
