"""Skewed load (issue 24): Zipf keys from zipfload (grpc-go, the seed's
proto) against 3 workers, round robin vs owner-routed, at s = 0.9, 1.1 and
uniform; then a cold start with a 1 s origin and 2 s deadlines: origin
loads vs distinct keys requested (duplicates: the same key loaded twice in
the cluster), and the Gets that failed. Then two more figures:

- spread: 12 workers and our ring-aware `Client` (threads in this process),
  Zipf 1.1, with and without hot-key spreading: the busiest worker's Gets
  over the mean (a count, so it holds on 2 cores);
- oracle: the hot cache of one non-owner (the real Group, RatePromoter and
  Store; an in-memory owner, a simulated clock) fed Zipf 0.9 over a data set
  10x its budget: its hit share over that of an oracle holding the hottest
  keys that fit, with random admission (the old mirror) beside it.

Each cell gets fresh workers with a cache of 16 MiB (the hot budget, 2 MiB,
is a fifth of the 100,000-key data set), warmed by one unmeasured run of
the same load before the measured one. Worker CPU comes from /proc; Gets, forwards and hot hits from
each worker's stats. The ratio reported is round-robin CPU per Get over
owner-routed CPU per Get at the same s, measured in the same run.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

from fmt import num, opening, pct, ratio, table
from goals import GOALS, Goal
from processes import log
from workers import default_server, group_stats, start_ring

KEYS = 100_000
CONC = 64
CELLS = (("1.1", False), ("0.9", False), ("1.1", True))  # (s, uniform)
ZIPFLOAD = Path(os.environ.get("SEEDGO_BIN", "/tmp/seedgo-bin")) / "zipfload"


SERVER = default_server()


def zipfload(addrs: list[str], mode: str, s: str, uniform: bool, seconds: float, **kw) -> dict:
    cmd = [str(ZIPFLOAD), "-addrs", ",".join(addrs), "-group", "bench", "-mode", mode, "-s", s, "-json"]
    cmd += ["-keys", str(kw.get("keys", KEYS)), "-conc", str(kw.get("conc", CONC)), "-duration", f"{seconds}s"]
    cmd += ["-prefix", kw.get("prefix", "v100-k"), "-timeout", kw.get("timeout", "2s")]
    if uniform:
        cmd.append("-uniform")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("JSON {")), None)
    if line is None:
        raise RuntimeError(f"zipfload printed no JSON: {out.stderr[-500:]}")
    return json.loads(line[len("JSON ") :])


def cell(mode: str, s: str, uniform: bool, seconds: float) -> dict:
    nodes = start_ring([f"skew-{i}" for i in range(3)], cache_bytes="16MiB", server=SERVER)
    procs = [n[0] for n in nodes]
    socks = [n[2] for n in nodes]
    addrs = [n[3] for n in nodes]
    try:
        # Unmeasured first: a cell reports the steady state, not the cold
        # misses every cell starts with (they are the cold-start figure's).
        zipfload(addrs, mode, s, uniform, seconds)
        base = [group_stats(x) for x in socks]
        cpu0 = [p.cpu() for p in procs]
        load = zipfload(addrs, mode, s, uniform, seconds)
        cpu = [p.cpu() - c for p, c in zip(procs, cpu0, strict=True)]
        stats = [
            {k: v - b.get(k, 0) for k, v in group_stats(x).items() if isinstance(v, int | float)}
            for x, b in zip(socks, base, strict=True)
        ]
    finally:
        for p in procs:
            p.kill()
    gets = [x["gets"] - x["server_requests"] for x in stats]  # Gets from the load generator
    total = max(1, sum(gets))
    return {
        "mode": mode,
        "s": "uniform" if uniform else s,
        "gets": sum(gets),
        "gets_per_worker": gets,
        "cpu_per_worker_s": cpu,
        "cpu_us_per_get": sum(cpu) / total * 1e6,
        "forwarded_share": sum(x["peer_loads"] + x["peer_errors"] for x in stats) / total,
        "hot_hit_share": sum(x["hot_hits"] for x in stats) / total,
        "busiest_over_mean": max(gets) / (total / len(gets)),
        "zipfload": load,
    }


def cold_start(seconds: float) -> dict:
    """A 1 s origin, 2 s client deadlines: origin loads vs distinct keys requested."""
    nodes = start_ring([f"skew-cold-{i}" for i in range(3)], cache_bytes="16MiB", server=SERVER)
    try:
        load = zipfload(
            [n[3] for n in nodes], "rr", "1.1", False, seconds, keys=1000, prefix="v100-d1000-k", timeout="2s"
        )
        stats = [group_stats(n[2]) for n in nodes]
    finally:
        for n in nodes:
            n[0].kill()
    loads = sum(x["local_loads"] for x in stats)
    distinct = load["distinct_keys"]
    return {
        "origin_loads": loads,
        "distinct_keys": distinct,
        "duplicates": loads - distinct,
        "client_errors": load["errors"],  # Gets that missed their 2 s deadline (or failed)
        "zipfload": load,
    }


def zipf_cdf(n: int, s: float) -> list[float]:
    """Cumulative probabilities of ranks 0..n-1 (rank r weighs 1/(r+1)^s)."""
    weights = [1.0 / (r + 1) ** s for r in range(n)]
    total = sum(weights)
    return [x / total for x in itertools.accumulate(weights)]


def zipf_ranks(cdf: list[float], rng: random.Random):
    last = len(cdf) - 1
    while True:
        yield min(bisect.bisect_left(cdf, rng.random()), last)


SPREAD_WORKERS = 12
SPREAD_THREADS = 8


def _drive(client, cdf: list[float], per_thread: int, stop_at: float, seed: int = 0) -> list[tuple[int, int]]:
    """SPREAD_THREADS threads of Zipf Gets through `client`, each bounded in
    count and time; (Gets, failed) per thread."""
    counts = [(0, 0)] * SPREAD_THREADS

    def work(i: int) -> None:
        ranks = zipf_ranks(cdf, random.Random(seed * 1000 + i))
        n = e = 0
        while n < per_thread and time.monotonic() < stop_at:
            try:
                client.get("bench", f"v100-k{next(ranks)}", timeout=5)
            except Exception:
                e += 1
            n += 1
        counts[i] = (n, e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(SPREAD_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def spread(seconds: float, max_gets: int = 40_000) -> dict:
    """12 workers, our Client from SPREAD_THREADS threads, Zipf 1.1 over KEYS
    keys: per-worker Gets (all a worker answered: clients' and forwards)
    without hot-key spreading, then with it, on the same warm ring. Each
    arm's client first makes half as many Gets unmeasured, so the figure is
    its steady state (as the round-robin cells'), not its first second of
    learning which keys are hot."""
    from appliance.client import Client

    nodes = start_ring([f"skew-spread-{i}" for i in range(SPREAD_WORKERS)], cache_bytes="16MiB", server=SERVER)
    addrs = [n[3] for n in nodes]
    socks = [n[2] for n in nodes]
    cdf = zipf_cdf(KEYS, 1.1)
    out = {"workers": SPREAD_WORKERS, "threads": SPREAD_THREADS, "s": "1.1"}
    try:
        for arm, hot in (("owner", False), ("spread", True)):
            with Client(addrs, spread_hot=hot) as client:
                _drive(client, cdf, max_gets // SPREAD_THREADS // 2, time.monotonic() + seconds / 2, seed=1)
                before = [group_stats(x) for x in socks]
                counts = _drive(client, cdf, max_gets // SPREAD_THREADS, time.monotonic() + seconds, seed=2)
                after = [group_stats(x) for x in socks]
            served = [a["gets"] - b["gets"] for a, b in zip(after, before, strict=True)]
            forwarded_in = [a["server_requests"] - b["server_requests"] for a, b in zip(after, before, strict=True)]
            hot_hits = sum(a["hot_hits"] - b["hot_hits"] for a, b in zip(after, before, strict=True))
            mean = sum(served) / len(served)
            out[arm] = {
                "client_gets": sum(n for n, _ in counts),
                "errors": sum(e for _, e in counts),
                "served_per_worker": served,
                "forwards_received": sum(forwarded_in),
                "hot_hits": hot_hits,
                "busiest_over_mean": max(served) / mean if mean else float("nan"),
            }
    finally:
        for n in nodes:
            n[0].kill()
    return out


class _Owner:
    """An owner in memory: every fetch answers at once with a 100 B value."""

    addr = "owner"

    async def get(self, group: str, key: str, timeout: float | None) -> tuple[bytes, float]:
        return b"v" * 100, 0.0


class _Picker:
    def __init__(self) -> None:
        self.owner = _Owner()

    def pick(self, key: str):
        return self.owner


def oracle(
    s: float = 0.9, keys: int = KEYS, rate: float = 2000.0, warm: int = 200_000, measured: int = 200_000
) -> dict:
    """The hot cache of one non-owner fed `warm + measured` Gets of Zipf `s`
    keys that another node owns, at `rate` Gets/s of simulated time, with
    a budget a tenth of the data; hit share over the measured Gets, vs an
    oracle that holds the hottest keys that fit (same Gets)."""
    from appliance.cache.group import Group
    from appliance.cache.promoter import RandomPromoter, RatePromoter
    from appliance.cache.store import entry_size

    names = [f"v100-k{r}" for r in range(keys)]
    sizes = [entry_size(k, b"v" * 100) for k in names]
    budget = sum(sizes) // 10
    fraction = 0.125
    cache_bytes = int(budget / fraction) + 1
    fits, used = 0, 0
    while fits < keys and used + sizes[fits] <= budget:
        used += sizes[fits]
        fits += 1
    cdf = zipf_cdf(keys, s)

    def play(promoter_of) -> dict:
        now = [0.0]
        clock = lambda: now[0]  # noqa: E731
        group = Group(
            "bench", None, cache_bytes=cache_bytes, picker=_Picker(), promoter=promoter_of(clock), clock=clock
        )
        ranks = zipf_ranks(cdf, random.Random(7))
        hits = oracle_hits = 0
        peak = 0

        async def feed() -> None:
            nonlocal hits, oracle_hits, peak
            for i in range(warm + measured):
                now[0] += 1.0 / rate
                r = next(ranks)
                before = group.stats.hot_hits
                if group.lookup(names[r]) is None:
                    await group.fill(names[r])
                peak = max(peak, group.hot.bytes)
                if i >= warm:
                    hits += group.stats.hot_hits - before
                    oracle_hits += r < fits

        asyncio.run(feed())
        return {"hit_share": hits / measured, "oracle_share": oracle_hits / measured, "peak_hot_bytes": peak}

    rate_arm = play(lambda clock: RatePromoter(clock=clock))
    random_arm = play(lambda clock: RandomPromoter(0.1, random.Random(3).random))
    return {
        "s": s,
        "keys": keys,
        "data_bytes": sum(sizes),
        "hot_budget_bytes": budget,
        "oracle_keys": fits,
        "gets_per_s": rate,
        "warm_gets": warm,
        "measured_gets": measured,
        "rate": rate_arm,
        "random": random_arm,
        "rate_over_oracle": rate_arm["hit_share"] / rate_arm["oracle_share"],
        "random_over_oracle": random_arm["hit_share"] / random_arm["oracle_share"],
    }


def run(cfg) -> dict:
    if not ZIPFLOAD.exists():
        raise RuntimeError(f"{ZIPFLOAD} missing: run `bash /work/shared/seedgo/build.sh` (or set SEEDGO_BIN)")
    seconds = max(5.0, cfg.seconds * 4)
    rows = []
    for s, uniform in CELLS:
        pair = {}
        for mode in ("owner", "rr"):
            log(f"skew: {mode} s={'uniform' if uniform else s}, {seconds:.0f} s")
            pair[mode] = cell(mode, s, uniform, seconds)
            c = pair[mode]
            log(
                f"  {c['gets']} Gets, {c['cpu_us_per_get']:.0f} us CPU/Get, forwarded {c['forwarded_share']:.1%}, "
                f"hot hits {c['hot_hit_share']:.1%}, busiest/mean {c['busiest_over_mean']:.2f}"
            )
        ratio = pair["rr"]["cpu_us_per_get"] / pair["owner"]["cpu_us_per_get"]
        log(f"  round robin / owner-routed CPU per Get: {ratio:.2f}x")
        rows.append({"s": pair["rr"]["s"], "rr_over_owner_cpu": ratio, **pair})
    log("skew: cold start, 1 s origin, 2 s deadlines")
    cold = cold_start(max(3.0, seconds))
    log(
        f"  origin loads {cold['origin_loads']}, distinct keys {cold['distinct_keys']}, "
        f"duplicate loads {cold['duplicates']}, client errors {cold['client_errors']}"
    )
    log(f"skew: spread, {SPREAD_WORKERS} workers, Client x {SPREAD_THREADS} threads, Zipf 1.1")
    spreading = spread(seconds * 1.5)
    for arm in ("owner", "spread"):
        a = spreading[arm]
        log(
            f"  {arm}: {a['client_gets']} Gets ({a['errors']} failed), busiest/mean {a['busiest_over_mean']:.2f}, "
            f"forwards {a['forwards_received']}, hot hits {a['hot_hits']}"
        )
    log("skew: hot cache vs oracle, Zipf 0.9, data 10x the hot budget (simulated clock)")
    hot = oracle()
    log(
        f"  rate promotion {hot['rate']['hit_share']:.1%} vs oracle {hot['rate']['oracle_share']:.1%} "
        f"({hot['rate_over_oracle']:.2f}); random 0.1: {hot['random_over_oracle']:.2f}; "
        f"peak hot bytes {hot['rate']['peak_hot_bytes']} of {hot['hot_budget_bytes']}"
    )
    return {
        "rows": rows,
        "cold_start": cold,
        "spread": spreading,
        "oracle": hot,
        "workers": 3,
        "keys": KEYS,
        "conc": CONC,
        "server": SERVER,
    }


def section(res: dict | None) -> list[str]:
    out, ran = opening("## 9. Skewed load: round robin vs owner-routed, spreading, hot-cache admission", res, "skew")
    if not ran:
        return out
    out += [
        f"zipfload (grpc-go, the seed's proto), {res['conc']} callers, Zipf keys over {res['keys']:,} keys, "
        f"{res['workers']} workers on the {res.get('server', '?')} server, fresh workers per cell, "
        "measured after one unmeasured run of the same load (the steady state; cold misses are the "
        "cold-start figure's). "
        "CPU is the workers' (from /proc); Gets, forwards and hot hits from their stats.",
        "",
    ]
    rows = []
    for r in res["rows"]:
        for mode in ("owner", "rr"):
            c = r[mode]
            rows.append(
                [
                    r["s"],
                    "owner-routed" if mode == "owner" else "round robin",
                    num(c["gets"]),
                    num(c["cpu_us_per_get"]),
                    pct(c["forwarded_share"]),
                    pct(c["hot_hit_share"]),
                    ratio(c["busiest_over_mean"]),
                    f"**{ratio(r['rr_over_owner_cpu'])}**" if mode == "rr" else "",
                ]
            )
    out += [
        table(
            [
                "Zipf s",
                "clients",
                "Gets",
                "worker CPU µs/Get (abs.)",
                "forwarded",
                "hot hits",
                "busiest/mean",
                "rr / owner CPU",
            ],
            rows,
        ),
        "",
    ]
    if sp := res.get("spread"):
        out += [
            f"Ring-aware `Client`, {sp['threads']} threads, Zipf {sp['s']}, {sp['workers']} workers: Gets each "
            "worker answered (clients' and forwards), measured after the same client made half as many Gets "
            "unmeasured (its steady state).",
            "",
            table(
                [
                    "hot-key spreading",
                    "client Gets",
                    "failed",
                    "busiest / mean",
                    "forwards received",
                    "hot hits",
                    "Gets per worker",
                ],
                [
                    [
                        arm,
                        num(sp[key]["client_gets"]),
                        sp[key]["errors"],
                        f"**{ratio(sp[key]['busiest_over_mean'])}**",
                        num(sp[key]["forwards_received"]),
                        num(sp[key]["hot_hits"]),
                        ", ".join(str(x) for x in sp[key]["served_per_worker"]),
                    ]
                    for arm, key in (("off", "owner"), ("on", "spread"))
                ],
            ),
            "",
        ]
    if c := res.get("cold_start"):
        out += [
            f"Cold start, 1 s origin, 2 s deadlines, round robin: **{c['origin_loads']}** origin loads for "
            f"{c['distinct_keys']} distinct keys ({c['duplicates']} duplicates), {c['client_errors']} failed Gets.",
            "",
        ]
    if o := res.get("oracle"):
        out += [
            f"Hot cache of one non-owner, Zipf {o['s']} over {o['keys']:,} keys ({num(o['data_bytes'])} B, 10× the "
            f"hot budget of {num(o['hot_budget_bytes'])} B; the oracle holds the {num(o['oracle_keys'])} hottest), "
            f"{num(o['gets_per_s'])} Gets/s of simulated time, {num(o['warm_gets'])} Gets to warm up, then "
            f"{num(o['measured_gets'])} measured:",
            "",
            table(
                ["admission", "hit share", "oracle", "over the oracle", "peak hot bytes"],
                [
                    [
                        name,
                        f"{o[key]['hit_share']:.1%}",
                        f"{o[key]['oracle_share']:.1%}",
                        f"**{ratio(o[f'{key}_over_oracle'])}**",
                        num(o[key]["peak_hot_bytes"]),
                    ]
                    for name, key in (("by rate (default)", "rate"), ("random 0.1", "random"))
                ],
            ),
            "",
        ]
    return out


def goal_rows(sk: dict) -> list[tuple[str, str, str, bool]]:
    rows = []
    if sk.get("rows"):
        g = GOALS["skew_rr_over_owner"]
        head = next((r for r in sk["rows"] if r["s"] == "1.1"), sk["rows"][0])
        rows.append(
            (
                f"Skew: round-robin / owner-routed CPU per Get, Zipf {head['s']}, {sk['workers']} workers",
                g.target(),
                f"{ratio(head['rr_over_owner_cpu'])} (others: "
                + ", ".join(f"s={r['s']}: {ratio(r['rr_over_owner_cpu'])}" for r in sk["rows"] if r is not head)
                + ")",
                g.met(head["rr_over_owner_cpu"]),
            )
        )
    if sk.get("spread"):
        g = GOALS["skew_busiest_over_mean"]
        sp = sk["spread"]
        rows.append(
            (
                f"Skew: busiest worker's Gets / mean, {sp['workers']} workers, ring-aware Client, Zipf {sp['s']}",
                g.target(),
                f"{ratio(sp['spread']['busiest_over_mean'])} "
                f"(without spreading: {ratio(sp['owner']['busiest_over_mean'])})",
                g.met(sp["spread"]["busiest_over_mean"]),
            )
        )
    if sk.get("cold_start"):
        c = sk["cold_start"]
        g = Goal("=", c["distinct_keys"], "")
        rows.append(
            (
                "Skew: cold start, 1 s origin, 2 s deadlines: origin loads / distinct keys",
                "origin loads = distinct keys",
                f"{c['origin_loads']} / {c['distinct_keys']} ({c['client_errors']} failed Gets)",
                g.met(c["origin_loads"]),
            )
        )
    if sk.get("oracle"):
        g = GOALS["skew_hot_vs_oracle"]
        o = sk["oracle"]
        rows.append(
            (
                f"Skew: hot-cache hit share / an oracle's, Zipf {o['s']}, data 10× the hot budget",
                g.target(),
                f"{ratio(o['rate_over_oracle'])} ({o['rate']['hit_share']:.1%} vs {o['rate']['oracle_share']:.1%}; "
                f"random admission: {ratio(o['random_over_oracle'])})",
                g.met(o["rate_over_oracle"]),
            )
        )
    return rows
