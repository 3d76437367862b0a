"""The benchmarks' goals: one table of thresholds, used both for the text of
the Goals table (the target column) and for its verdicts, and by the plots
that draw a goal line."""

from __future__ import annotations

import math
import operator
import statistics
from dataclasses import dataclass

import worker_limits
from fmt import num, pct, ratio, table


@dataclass(frozen=True)
class Goal:
    """A measured value must satisfy ``op`` against ``threshold``."""

    op: str  # "≥", "≤" or "="
    threshold: float
    unit: str = "×"

    def target(self) -> str:
        value = f"{self.threshold:g}"
        return f"exactly {value}" if self.op == "=" else f"{self.op} {value}{self.unit}"

    def met(self, *values: float) -> bool:
        check = {"≥": operator.ge, "≤": operator.le, "=": operator.eq}[self.op]
        return all(check(v, self.threshold) for v in values)


GOALS = {
    # issue 19: hot Get, 100 B, 8 connections x 16 streams (the setup), on our engine (hits in Rust)
    "engine_hot_get_per_cpu_vs_seed": Goal("≥", 2.5),  # Gets per server CPU-second / the seed's Go server's
    "engine_hot_get_rps_vs_seed": Goal("≥", 2.0),  # Gets/s / the seed's Go server's
    "engine_tls_per_cpu_vs_seed": Goal("≥", 1.5),  # TLS on the engine / the seed's plaintext, per server CPU-s
    "forwarded_vs_before": Goal("≥", 3.0),  # forwarded Gets/s, engine default / grpcio's, each stream count
    "forwarded": Goal("≤", 2.0),  # forwarded / local hit on the same backend, worst of throughput and p50 cost
    # issue 20: forwarded / local hit on the engine with its own client, worst of throughput and p50 cost
    "forwarded_engine_1": Goal("≤", 2.0),
    "forwarded_engine_16": Goal("≤", 1.5),
    "getmany": Goal("≥", 3.0),  # GetMany keys/s (100 per call) / memcached single-key gets/s
    "memory_1k": Goal("≤", 1.5),  # RSS growth / counted bytes at 1 KiB values
    # warm: origin loads / warm keys for each membership change (handoff and peeks on)
    "warm_origin_share": Goal("≤", 0.01, ""),
    "warm_stop_added_s": Goal("≤", 1.0, " s"),  # a handoff of 30,000 × 1 KiB, added to a planned stop
    # skew (issue 24)
    "skew_rr_over_owner": Goal("≤", 1.3),  # round-robin CPU per Get / owner-routed, Zipf 1.1, 3 workers
    "skew_busiest_over_mean": Goal("≤", 1.3),  # 12 workers, ring-aware Client, Zipf 1.1: busiest worker's Gets
    "skew_hot_vs_oracle": Goal("≥", 0.9),  # hot-cache hit share / an oracle's, Zipf 0.9, data 10x the budget
    # application clients (issue 20): application CPU per cached read, engine's client / the baseline's
    "client_vs_redis": Goal("≤", 0.5),  # Client.get / redis-py GET
    "client_vs_pymemcache": Goal("≤", 1.5),  # Client.get / pymemcache get
    "async16_vs_redis": Goal("≤", 0.5),  # AsyncClient.get / redis.asyncio, 16 in flight
}
WARM_CHANGES = ("rolling restart", "scale-out 3→4", "planned stop")  # the goal's; kill -9 is reported
HEADLINE_STREAMS = 128  # the hot-Get row the seed goals read

# The design's bound on ring convergence: lease_ttl plus this many seconds.
CONVERGENCE_SLACK_S = 1.0


def convergence_goal(lease_ttl: float) -> Goal:
    return Goal("≤", lease_ttl + CONVERGENCE_SLACK_S, " s")


def pct_fine(x: float) -> str:
    """A share to 0.01 %: what the warm bench's ≤ 1 % needs."""
    return f"{x:.2%}"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _inverse(x: float | None) -> float | None:
    return 1 / x if x else None


def verdict(flag: bool) -> str:
    return "met" if flag else "**not met**"


def headline(results: dict) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) rows."""
    rows = []
    hot = results.get("hot_get") or {}
    if hot.get("rows"):
        rows += _hot_rows(hot)
    fw = results.get("forwarded") or {}
    if fw.get("setups"):
        g = GOALS["forwarded_vs_before"]
        vs = fw["default_vs_grpcio_forwarded"]
        rows.append(
            (
                "Forwarded Gets/s, engine default vs grpcio (stream) before",
                g.target(),
                "; ".join(f"{r['streams']} stream(s): {ratio(r['rps'])}" for r in vs),
                verdict(g.met(*(r["rps"] for r in vs))),
            )
        )
        for r in fw["setups"]["engine/unary/engine"]["rows"]:
            g = GOALS[f"forwarded_engine_{r['streams']}"]
            vs = next(x for x in fw["engine_client_vs_grpc_aio"] if x["streams"] == r["streams"])
            rows.append(
                (
                    f"Forwarded vs local hit on the engine's client, {r['streams']} stream(s)",
                    g.target(),
                    f"throughput {ratio(r['throughput_cost'])}, p50 {ratio(r['p50_cost'])} "
                    f"(its call {num(r['client_call_cpu_us'])} µs, {pct(r['client_call_share'])} of the CPU; "
                    f"grpc.aio's call costs {ratio(vs['client_call_cpu'])} that)",
                    verdict(g.met(max(r["throughput_cost"], r["p50_cost"]))),
                )
            )
        g = GOALS["forwarded"]
        for label in [x for x in ("grpcio/stream/grpcio",) if x in fw["setups"]]:
            rws = fw["setups"][label]["rows"]
            worst = max(max(r["throughput_cost"], r["p50_cost"]) for r in rws)
            rows.append(
                (
                    f"Forwarded vs local hit, {label}",
                    g.target(),
                    "; ".join(
                        f"{r['streams']} stream(s): throughput {ratio(r['throughput_cost'])}, "
                        f"p50 {ratio(r['p50_cost'])}"
                        f" (client call {pct(r['client_call_share'])} of the CPU)"
                        for r in rws
                    ),
                    verdict(g.met(worst)),
                )
            )
    gm = results.get("getmany") or {}
    if gm.get("rows"):
        g = GOALS["getmany"]
        head = next(r for r in gm["rows"] if r["batch"] == gm["headline_batch"])
        rows.append(
            (
                f"GetMany keys/s (batches of {gm['headline_batch']}) vs memcached single-key gets/s",
                g.target(),
                f"{ratio(gm['ratio'])} ({num(head['keys_per_s'])} vs {num(gm['memcached']['gets_per_s'])}/s; "
                f"vs memcached's own multi-get: {ratio(head.get('ratio_vs_memcached_multiget'))})",
                verdict(g.met(gm["ratio"])),
            )
        )
    st = results.get("storm") or {}
    if st.get("rows"):
        g = Goal("=", st["keys"], "")  # one origin load per key
        loads = [x for r in st["rows"] for x in r["origin_loads"]]
        rows.append(
            (
                f"Miss storm: origin loads for {st['gets']} Gets of {st['keys']} cold keys",
                g.target(),
                ", ".join(f"{r['origin_loads']}" for r in st["rows"]) + " (per storm)",
                verdict(g.met(*loads)),
            )
        )
        rows.append(
            (
                "Miss storm p99 vs origin delay",
                "report",
                "; ".join(
                    f"{r['delay_ms']} ms: p99 {num(r['miss_p99_ms'], 0)} ms ({ratio(r['p99_over_delay'])}; "
                    f"warm floor {num(r['hit_p99_ms'], 0)} ms)"
                    for r in st["rows"]
                ),
                "reported",
            )
        )
    mem = results.get("memory") or {}
    if mem.get("rows"):
        g = GOALS["memory_1k"]
        prod = {r["value_size"]: r for r in mem["rows"] if r["store"] == "product"}
        if 1024 in prod:
            rows.append(
                (
                    "Memory: RSS growth / counted bytes at 1 KiB",
                    g.target(),
                    ratio(prod[1024]["rss_over_counted"])
                    + (
                        f" (100 B: {ratio(prod[100]['rss_over_counted'])}, "
                        f"{num(prod[100]['overhead_per_entry'])} B/entry)"
                        if 100 in prod
                        else ""
                    ),
                    verdict(g.met(prod[1024]["rss_over_counted"])),
                )
            )
    cv = results.get("convergence") or {}
    if cv.get("rows"):
        g = convergence_goal(cv["lease_ttl"])
        worst = max(max(r["death_s"], r["join_s"], r["stop_s"]) for r in cv["rows"])
        rows.append(
            (
                "Convergence (death / join / planned stop)",
                f"≤ lease_ttl + {CONVERGENCE_SLACK_S:g} s = {g.threshold:g} s",
                "; ".join(
                    f"N={r['workers']}: {r['death_s']:.2f} / {r['join_s']:.2f} / {r['stop_s']:.2f} s"
                    for r in cv["rows"]
                ),
                verdict(g.met(worst)),
            )
        )
    wm = results.get("warm") or {}
    if wm.get("rows"):
        g = GOALS["warm_origin_share"]
        after = [r for r in wm["rows"] if r["mode"] == "after"]
        shares = [r["changes"][c]["share"] for r in after for c in WARM_CHANGES]
        bad = sum(r["failed"] + r["wrong"] for r in wm["rows"])
        rows.append(
            (
                "Warm membership changes: origin loads / warm keys (rolling restart, scale-out, planned stop)",
                f"{g.op} {g.threshold:.0%}, 0 failed or wrong reads",
                "; ".join(
                    f"{r['keys']:,} keys: "
                    + " / ".join(pct_fine(r["changes"][c]["share"]) for c in WARM_CHANGES)
                    + " (before: "
                    + " / ".join(pct_fine(b["changes"][c]["share"]) for c in WARM_CHANGES)
                    + ")"
                    for r in after
                    for b in [next(x for x in wm["rows"] if x["mode"] == "before" and x["keys"] == r["keys"])]
                )
                + f"; {bad} failed or wrong",
                verdict(g.met(*shares) and bad == 0),
            )
        )
        g = GOALS["warm_stop_added_s"]
        rows.append(
            (
                "Handoff of 30,000 × 1 KiB: time added to a planned stop",
                g.target(),
                f"{wm['stop_added_s']:.2f} s (handoff itself {wm['stop']['after']['handoff']['seconds']:.2f} s)"
                if wm["stop"]["after"].get("handoff")
                else f"{wm['stop_added_s']:.2f} s",
                verdict(g.met(wm["stop_added_s"])),
            )
        )
    rows += _skew_rows(results.get("skew") or {})
    rows += _client_rows(results.get("clients") or {})
    rows += [
        (label, target, measured, verdict(met))
        for label, target, measured, met in worker_limits.goal_rows(results.get("worker_limits"))
    ]
    sc = results.get("scaling") or {}
    if sc.get("rows") and len(sc["rows"]) > 1:
        last = sc["rows"][-1]
        rows.append(
            (
                f"Scaling N = {sc['rows'][0]['workers']} → {last['workers']} on {sc.get('cpus')} cores",
                "report",
                f"{ratio(last['speedup'])} aggregate; client CPU share "
                + ", ".join(pct(r["client_cpu_share"]) for r in sc["rows"]),
                "reported",
            )
        )
    return rows


def _hot_rows(hot: dict) -> list[tuple[str, str, str, str]]:
    """The hot-Get rows: the engine against the seed (goals), against
    memcached (the reference), and the grpcio backend against its echo."""
    rows = []
    conc = [r for r in hot["rows"] if r["size"] == 100]
    if not conc:
        return rows
    head = next((r for r in conc if r["streams"] == HEADLINE_STREAMS), conc[-1])
    others = [r for r in conc if r is not head]
    at = f"at {head['streams']} streams"
    pair = "engine_vs_seed"
    if pair in head:
        v = head[pair]
        for key, what, field in (
            ("engine_hot_get_per_cpu_vs_seed", "Gets per server CPU-second", "per_cpu"),
            ("engine_hot_get_rps_vs_seed", "Gets/s", "rps"),
        ):
            g = GOALS[key]
            measured = f"{ratio(v[field])} {at}" + "".join(
                f"; {r['streams']}: {ratio(r[pair][field])}" for r in others if pair in r
            )
            rows.append(
                (
                    f"Hot Get on the engine vs the seed's Go server (GOMAXPROCS=1), {what}",
                    g.target(),
                    measured,
                    verdict(g.met(v[field])),
                )
            )
    else:
        why = hot.get("seed") or ("no engine worker in this run" if "engine" not in head["servers"] else "?")
        g = GOALS["engine_hot_get_per_cpu_vs_seed"]
        rows.append(
            ("Hot Get on the engine vs the seed's Go server", g.target(), f"not measured: {why}", "**not met**")
        )
    if "engine_tls_vs_seed" in head:
        g = GOALS["engine_tls_per_cpu_vs_seed"]
        v, e = head["engine_tls_vs_seed"], head["engine_tls_vs_engine"]
        rows.append(
            (
                "Hot Get on the engine with TLS vs the seed's plaintext, Gets per server CPU-second",
                g.target(),
                f"{ratio(v['per_cpu'])} {at} ({ratio(v['rps'])} Gets/s; "
                f"TLS costs {ratio(e['per_cpu'])} of plaintext per CPU-second)"
                + "".join(
                    f"; {r['streams']}: {ratio(r['engine_tls_vs_seed']['per_cpu'])}"
                    for r in others
                    if "engine_tls_vs_seed" in r
                ),
                verdict(g.met(v["per_cpu"])),
            )
        )
    # memcached: the reference for what a cache can cost (issue 19), reported
    label = "Hot Get on the engine vs memcached (1 thread, memcaslap), the reference for what a cache costs"
    pair = "engine_vs_memcached"
    if pair in head:
        v, eng, mc = head[pair], head["servers"]["engine"], head["servers"]["memcached"]
        rows.append(
            (
                label,
                "report",
                f"server CPU per get {at}: engine {num(eng['cpu_us_per_req'], 1)} µs, memcached "
                f"{num(mc['cpu_us_per_req'], 1)} µs: a get costs the engine {ratio(_inverse(v['per_cpu']))} "
                f"what it costs memcached ({ratio(v['per_cpu'])} its Gets per CPU-second), {ratio(v['rps'])} its Gets/s"
                + "".join(
                    f"; {r['streams']}: costs {ratio(_inverse(r[pair]['per_cpu']))}, Gets/s {ratio(r[pair]['rps'])}"
                    for r in others
                    if pair in r
                ),
                "reported",
            )
        )
    elif head.get("memcached_skipped"):
        rows.append((label, "report", f"not measured: {head['memcached_skipped']}", "reported"))
    if "grpcio_vs_echo" in head:
        v = head["grpcio_vs_echo"]
        rows.append(
            (
                "Hot Get on the grpcio backend vs a bare grpc.aio echo",
                "report",
                f"{ratio(v['per_cpu'])} per CPU-second, {ratio(v['rps'])} Gets/s {at}",
                "reported",
            )
        )
    return rows


def _client_rows(cl: dict) -> list[tuple[str, str, str, str]]:
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
                verdict(g.met(v)),
            )
        )
    return rows


def _skew_rows(sk: dict) -> list[tuple[str, str, str, str]]:
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
                verdict(g.met(head["rr_over_owner_cpu"])),
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
                verdict(g.met(sp["spread"]["busiest_over_mean"])),
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
                verdict(g.met(c["origin_loads"])),
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
                verdict(g.met(o["rate_over_oracle"])),
            )
        )
    return rows


def headline_table(results: dict) -> str:
    return table(["goal", "target", "measured (this run)", "verdict"], [list(r) for r in headline(results)])
