"""The benchmarks' goals: one table of thresholds, used both for the text of
the Goals table (the target column) and for its verdicts, and by the figures
that draw a goal line; and the Goals table itself, made of the rows each
benchmark module judges (`goal_rows`, see benches.py)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import benches
from fmt import table


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

# The design's bound on ring convergence: lease_ttl plus this many seconds.
CONVERGENCE_SLACK_S = 1.0


def convergence_goal(lease_ttl: float) -> Goal:
    return Goal("≤", lease_ttl + CONVERGENCE_SLACK_S, " s")


def verdict(met: bool | None) -> str:
    if met is None:
        return "reported"
    return "met" if met else "**not met**"


def headline(results: dict) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) rows: each benchmark's goal_rows."""
    rows = []
    for name, module in benches.modules(benches.GOALS_ORDER):
        if hasattr(module, "goal_rows"):
            rows += [
                (goal, target, measured, verdict(met))
                for goal, target, measured, met in module.goal_rows(results.get(name) or {})
            ]
    return rows


def headline_table(results: dict) -> str:
    return table(["goal", "target", "measured (this run)", "verdict"], [list(r) for r in headline(results)])
