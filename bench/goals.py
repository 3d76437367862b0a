"""The benchmarks' goals: one table of thresholds, used both for the text of
the Goals table (the target column) and for its verdicts, and by the plots
that draw a goal line."""

from __future__ import annotations

import math
import operator
import statistics
from dataclasses import dataclass

from fmt import num, pct, ratio, size_label, table


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
    "hot_get": Goal("≥", 0.9),  # worker / bare grpc.aio echo throughput, 100 B, median over streams
    "hot_get_large": Goal("≥", 0.9),  # the same at 64 KiB and above
    "forwarded": Goal("≤", 2.2),  # forwarded / local hit, worst of throughput and p50 cost, 1 stream
    "getmany": Goal("≥", 1.0),  # GetMany keys/s / memcached single-key gets/s
    "memory_1k": Goal("≤", 1.5),  # RSS growth / counted bytes at 1 KiB values
}
# The design's bound on ring convergence: lease_ttl plus this many seconds.
CONVERGENCE_SLACK_S = 1.0


def convergence_goal(lease_ttl: float) -> Goal:
    return Goal("≤", lease_ttl + CONVERGENCE_SLACK_S, " s")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def verdict(flag: bool) -> str:
    return "met" if flag else "**not met**"


def headline(results: dict) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) rows."""
    rows = []
    hot = results.get("hot_get") or {}
    if hot.get("rows"):
        g = GOALS["hot_get"]
        conc = [r for r in hot["rows"] if r["size"] == 100]
        med = _median([r["rps_ratio"] for r in conc])
        cpu = _median([1 / r["cpu_ratio"] for r in conc])
        rows.append(
            (
                "Hot Get vs bare grpc.aio echo (100 B)",
                g.target(),
                f"throughput {ratio(med)} (median over 1–128 streams; "
                f"{', '.join(ratio(r['rps_ratio']) for r in conc)}); CPU efficiency {ratio(cpu)}",
                verdict(g.met(med)),
            )
        )
        big = [r for r in hot["rows"] if r["size"] >= 65536]
        if big:
            g = GOALS["hot_get_large"]
            rows.append(
                (
                    "Hot Get vs echo, large values",
                    g.target(),
                    "; ".join(f"{size_label(r['size'])}: {ratio(r['rps_ratio'])}" for r in big),
                    verdict(g.met(*(r["rps_ratio"] for r in big))),
                )
            )
    fw = results.get("forwarded") or {}
    if fw.get("rows"):
        g = GOALS["forwarded"]
        r1 = fw["rows"][0]
        worst = max(r1["throughput_cost"], r1["p50_cost"])
        rows.append(
            (
                "Forwarded Get vs local hit (cost)",
                g.target(),
                f"{r1['streams']} stream: throughput {ratio(r1['throughput_cost'])}, p50 {ratio(r1['p50_cost'])}, "
                f"CPU/Get {ratio(r1['cpu_cost'])}"
                + (
                    f"; seen from a grpc.aio client: p50 {ratio(fw['peer_call']['python_client_p50_cost'])}"
                    if fw.get("peer_call", {}).get("python_client_p50_cost")
                    else ""
                )
                + "".join(
                    f"; {r['streams']} streams: {ratio(r['throughput_cost'])} "
                    f"({r['forwards_per_get']:.2f} calls to the owner per Get)"
                    for r in fw["rows"][1:]
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


def headline_table(results: dict) -> str:
    return table(["goal", "target", "measured (this run)", "verdict"], [list(r) for r in headline(results)])
