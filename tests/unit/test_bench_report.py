"""bench/report.py renders results.md from a results dict (no benchmark is run)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import goals  # noqa: E402
import report  # noqa: E402

ENGINE_VS_SEED = "Hot Get on the engine vs the seed's Go server (GOMAXPROCS=1)"


def cond(**kw):
    return {
        "when": "2026-11-25 18:17:11",
        "elapsed_s": 63.9,
        "loadavg_before": "1.03 1.57 1.51",
        "other_cores_before": 0.02,
        **kw,
    }


def sample_results() -> dict:
    """Every field the report reads, with values near a real run."""

    def side(rps, p50, p99, cpu, share=0.12, others=0.0):
        return {
            "rps": rps,
            "p50_ms": p50,
            "p99_ms": p99,
            "cpu_us_per_req": cpu,
            "client_cpu_share": share,
            "other_cpu_cores": others,
        }

    def server(rps, per_cpu, cores=1.2):
        return {
            "rps": rps,
            "p50_ms": 0.2,
            "p99_ms": 0.6,
            "cpu_us_per_req": 1e6 / per_cpu,
            "gets_per_cpu_s": per_cpu,
            "server_cores": cores,
            "client_cpu_share": 0.2,
            "other_cpu_cores": 0.0,
        }

    def pair(rps, per_cpu):
        return {"rps": rps, "per_cpu": per_cpu, "p50": 1.0}

    hot_rows = []
    for size, conns, streams in ((100, 1, 1), (100, 4, 8), (100, 8, 128), (1024, 4, 8), (65536, 4, 8), (1 << 20, 4, 8)):
        row = {
            "size": size,
            "conns": conns,
            "streams": streams,
            "servers": {
                "echo": server(8000, 6500),
                "engine": server(150000, 160000),
                "grpcio": server(7600, 6100),
            },
        }
        if size == 100:
            row["servers"]["seed"] = server(60000, 60000, 1.0)
            row["servers"]["engine-tls"] = server(110000, 120000)
            row["engine_vs_seed"] = pair(2.4, 2.6)
            row["engine_tls_vs_seed"] = pair(1.8, 1.9)
            row["engine_tls_vs_engine"] = pair(0.75, 0.73)
        if size < 1 << 20:
            mc = server(240000, 250000, 0.96)
            del mc["p50_ms"], mc["p99_ms"]  # memcaslap gives no percentiles
            row["servers"]["memcached"] = mc
            row["engine_vs_memcached"] = {"rps": 0.62, "per_cpu": 0.64}
        else:
            row["memcached_skipped"] = "memcaslap sets at least 1,024 keys per connection before its gets"
        row["engine_vs_grpcio"] = pair(20.0, 26.0)
        row["grpcio_vs_echo"] = pair(0.92, 0.93)
        hot_rows.append(row)

    def fwd_row(streams, cost):
        return {
            "streams": streams,
            "local": side(9000, 0.1, 0.2, 50),
            "forwarded": side(9000 / cost, 0.19, 0.4, 90),
            "throughput_cost": cost,
            "p50_cost": cost,
            "p99_cost": cost,
            "cpu_cost": 1.8,
            "forwarder_cpu_us_per_req": 60,
            "owner_cpu_us_per_req": 30,
            "forwarder_local_hit_cpu_us": 20,
            "client_call_cpu_us": 40,
            "client_call_share": 0.44,
            "forwards_per_get": 1.0,
        }

    prof_target = {
        "categories": {
            "system calls (socket I/O, wakeups)": {"share_of_busy": 0.46},
            "product code (appliance/, own frames)": {"share_of_busy": 0.03},
            "waiting (parked)": {"share_of_busy": 0.5},
        },
        "product_inclusive_share": 0.04,
        "busy_samples": 343,
        "top_leaves": [["sendmsg (libc.so.6)", 0.152], ["getpid (libc.so.6)", 0.12]],
        "top_product_frames": [["Group.get (appliance/cache/group.py:133)", 0.003]],
    }
    return {
        "machine": {
            "cpus": 2,
            "cpu": "Intel(R) Xeon(R) Processor",
            "kernel": "6.18",
            "python": "3.11.7",
            "grpcio": "1.85.3",
            "protobuf": "7.36.2",
            "h2load": "h2load nghttp2/1.52.0",
            "memcached": "memcached 1.6.18",
            "date": "2026-11-25",
        },
        "hot_get": cond(
            rows=hot_rows,
            seed=None,
            namespace=True,
            memcached={
                "threads": 1,
                "memory_mb": 1024,
                "max_item": "2m",
                "window_per_connection": 1024,
                "gets": 2500000,
                "get_misses": 0,
                "sets_during": 0,
            },
            check={"engine": {"main_hits": 167618, "requests": 167619, "loads_during_runs": 1}},
        ),
        "forwarded": cond(
            setups={
                label: {"rows": [fwd_row(1, 1.9), fwd_row(16, 1.5)]}
                for label in (
                    "engine/unary/engine",
                    "engine/unary/grpcio",
                    "grpcio/stream/grpcio",
                )
            },
            default_vs_grpcio_forwarded=[{"streams": 1, "rps": 3.2}, {"streams": 16, "rps": 3.6}],
            engine_client_vs_grpc_aio=[
                {"streams": 1, "rps": 2.5, "forwarder_cpu": 3.0, "client_call_cpu": 6.0},
                {"streams": 16, "rps": 1.4, "forwarder_cpu": 1.6, "client_call_cpu": 2.0},
            ],
        ),
        "getmany": cond(
            memcached={
                "gets_per_s": 243054,
                "gets_per_s_all": [228390, 243054, 247614],
                "get_misses": 0,
                "cpu_us_per_key": 4.2,
                "multiget_keys_per_s": 2879450,
            },
            headline_batch=100,
            ratio=3.17,
            rows=[
                {
                    "batch": b,
                    "rps": 5956 / b * b,
                    "keys_per_s": 5956.0 * b,
                    "p50_ms": 1.27,
                    "p99_ms": 3.04,
                    "cpu_us_per_key": 3.81,
                    "client_cpu_share": 0.09,
                    "ratio_vs_memcached_multiget": 0.10,
                    **({"ratio_vs_memcached": 1.17} if b == 100 else {}),
                }
                for b in (1, 10, 100, 1000)
            ],
            check={"keys_sent": 2540904, "main_hits": 2540904, "loads": 0},
        ),
        "storm": cond(
            gets=1000,
            keys=10,
            workers=3,
            rows=[
                {
                    "delay_ms": d,
                    "origin_loads": [10, 10, 10],
                    "failed": 0,
                    "miss_p50_ms": 79.2,
                    "miss_p99_ms": 136.4,
                    "p99_over_delay": 13.64,
                    "p99_minus_delay_ms": 126.4,
                    "hit_p99_ms": 126.5,
                    "start_spread_ms": 24.2,
                }
                for d in (10, 50, 200)
            ],
        ),
        "memory": cond(
            cache_bytes=64 << 20,
            goal_1k=1.5,
            rows=[
                {
                    "store": store,
                    "value_size": size,
                    "items": 604584,
                    "counted_bytes": 64 << 20,
                    "rss_growth_bytes": 238 << 20,
                    "rss_over_counted": r,
                    "overhead_per_entry": over,
                    "sizeof": {
                        "key_str": 60,
                        "value_bytes_object": 133,
                        "entry_fields": ["data", "expires", "size", "offset"],
                        "entry_namedtuple": 72,
                        "size_int": 28,
                    },
                }
                for store, size, r, over in (
                    ("product", 100, 3.72, 302),
                    ("product", 1024, 1.34, 351),
                    ("dict", 100, 2.12, 124),
                    ("dict", 1024, 1.13, 131),
                )
            ],
        ),
        "convergence": cond(
            lease_ttl=2,
            rows=[
                {
                    "workers": n,
                    "start_s": 2.67,
                    "death_s": 1.67,
                    "death_minus_ttl_s": -0.33,
                    "join_s": 0.38,
                    "join_process_up_s": 0.36,
                    "stop_s": 0.19,
                    "stop_cli_exit": 0,
                }
                for n in (2, 4, 8)
            ],
        ),
        "scaling": cond(
            streams_per_worker=32,
            cpus=2,
            rows=[
                {
                    "workers": n,
                    "rps": 6979 * s,
                    "speedup": s,
                    "rps_all": [7293, 6937, 6979],
                    "rps_best": 7293,
                    "p50_ms": 4.49,
                    "p99_ms": 6.63,
                    "client_cpu_share": 0.10,
                    "box_cpu_used": 1.40,
                    "worker_cpu_us_per_req": 181,
                    "other_cpu_cores": 0.0,
                    "worker_cores": 1.27,
                }
                for n, s in ((1, 1.0), (2, 1.16))
            ],
        ),
        "warm": cond(
            lease_ttl=2,
            value=1024,
            stop_added_s=0.36,
            rows=[
                {
                    "keys": n,
                    "mode": mode,
                    "failed": 0,
                    "wrong": 0,
                    "reads_ok": 300000,
                    "kill_recovered": 0.14,
                    "changes": {
                        c: {"loads": int(share * n), "share": share, "seconds": 2.0}
                        for c, share in zip(
                            ("rolling restart", "scale-out 3→4", "planned stop", "kill -9"),
                            (0.0, 0.0, 0.0, 0.4) if mode == "after" else (1.1, 0.3, 0.25, 0.45),
                            strict=True,
                        )
                    },
                }
                for n in (3000, 30000)
                for mode in ("before", "after")
            ],
            stop={
                "before": {"held": 30000, "worker_stop_s": 0.01, "stop_node_s": 0.45, "handoff": None},
                "after": {
                    "held": 30000,
                    "worker_stop_s": 0.37,
                    "stop_node_s": 0.72,
                    "handoff": {"seconds": 0.36, "accepted": 30000, "refused": 0},
                },
            },
        ),
        "skew": cond(
            workers=3,
            keys=100000,
            conc=64,
            server="engine",
            rows=[
                {
                    "s": s,
                    "rr_over_owner_cpu": r,
                    **{
                        mode: {
                            "gets": 90000,
                            "cpu_us_per_get": cpu,
                            "forwarded_share": fwd,
                            "hot_hit_share": 0.4,
                            "busiest_over_mean": 1.1,
                        }
                        for mode, cpu, fwd in (("owner", 50.0, 0.0), ("rr", 50.0 * r, 0.2))
                    },
                }
                for s, r in (("1.1", 1.25), ("0.9", 1.6), ("uniform", 3.0))
            ],
            cold_start={"origin_loads": 440, "distinct_keys": 440, "duplicates": 0, "client_errors": 0},
            spread={
                "workers": 12,
                "threads": 8,
                "s": "1.1",
                "owner": {
                    "client_gets": 40000,
                    "errors": 0,
                    "served_per_worker": [5400] + [3145] * 11,
                    "forwards_received": 0,
                    "hot_hits": 0,
                    "busiest_over_mean": 1.62,
                },
                "spread": {
                    "client_gets": 40000,
                    "errors": 0,
                    "served_per_worker": [3600] + [3309] * 11,
                    "forwards_received": 120,
                    "hot_hits": 5000,
                    "busiest_over_mean": 1.08,
                },
            },
            oracle={
                "s": 0.9,
                "keys": 100000,
                "data_bytes": 11088890,
                "hot_budget_bytes": 1108889,
                "oracle_keys": 10009,
                "gets_per_s": 2000.0,
                "warm_gets": 200000,
                "measured_gets": 200000,
                "rate": {"hit_share": 0.5, "oracle_share": 0.52, "peak_hot_bytes": 1108800},
                "random": {"hit_share": 0.45, "oracle_share": 0.52, "peak_hot_bytes": 1108889},
                "rate_over_oracle": 0.5 / 0.52,
                "random_over_oracle": 0.45 / 0.52,
            },
        ),
        "profile": cond(
            server="engine",
            hot_get_worker=prof_target,
            forwarding_node=prof_target,
            hot_get_threads={"wall_s": 3.0, "cores_by_thread": {"engine-io": 0.66, "engine-recv": 0.27}},
            handler_time={
                "100": {"handler_us": 6.0, "cpu_us_per_get": 185},
                str(1 << 20): {"handler_us": 12.2, "cpu_us_per_get": 575},
            },
            syscalls_echo={"per_get": {"futex": 8.9, "write": 7.2}, "total_per_get": 36.7},
            syscalls_worker={"per_get": {"futex": 8.6, "write": 7.2}, "total_per_get": 36.3},
            hit_path_perf={
                "by_dso": {"the engine (Rust: h2, hyper, tokio, hits)": 0.64, "the kernel (system calls, TCP)": 0.24},
                "by_thread": [["engine-io", 0.999]],
                "top_symbols": [["h2::frame::headers::HeaderBlock::into_encoding", 0.034]],
                "load": {"rps": 200000.0, "succeeded": 1000000},
            },
        ),
    }


def test_render_writes_results_md_from_the_results_only(tmp_path, capsys):
    report.render(sample_results(), tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Benchmark results\n")
    for section in (
        "## Goals",
        "## 1. Hot Get",
        "## 2. Forwarded",
        "## 3. GetMany",
        "## 4. Miss storm",
        "## 5. Memory",
        "## 6. Convergence",
        "## 7. Scaling",
        "## 8. Warm membership changes",
        "## 9. Skewed load",
        "## Profile of the hot path",
    ):
        assert section in text
    # Fixed prose and the historical experiments live in bench/README.md.
    assert "### Reading" not in text and "--experiment" not in text and "0ad5341" not in text
    assert "| Forwarded vs local hit, grpcio/stream/grpcio | ≤ 2× |" in text
    assert "| Forwarded vs local hit on the engine's client, 16 stream(s) | ≤ 1.5× |" in text
    assert "grpc.aio's call costs 2.00× the engine's" in text
    assert f"| {ENGINE_VS_SEED}, Gets per server CPU-second | ≥ 2.5× |" in text
    assert "`engine-io` 0.66" in text and "The workers served on the engine backend." in text
    assert "| the engine (Rust: h2, hyper, tokio, hits) | 64% |" in text
    assert "Top symbols: `h2::frame::headers::HeaderBlock::into_encoding` 3.4%" in text
    assert "| Convergence (death / join / planned stop) | ≤ lease_ttl + 1 s = 3 s |" in text
    assert "| Handoff of 30,000 × 1 KiB: time added to a planned stop | ≤ 1 s |" in text
    assert "| 30,000 | after | **0.00%** (0) |" in text and "**0.36 s added**" in text
    assert "| Skew: round-robin / owner-routed CPU per Get, Zipf 1.1, 3 workers | ≤ 1.3× | 1.25×" in text
    assert "| Skew: busiest worker's Gets / mean, 12 workers, ring-aware Client, Zipf 1.1 | ≤ 1.3× | 1.08×" in text
    assert "| Skew: cold start, 1 s origin, 2 s deadlines: origin loads / distinct keys |" in text
    assert "| Skew: hot-cache hit share / an oracle's, Zipf 0.9, data 10× the hot budget | ≥ 0.9× | 0.96×" in text
    assert "**not met**" not in text
    assert "| verdict |" in capsys.readouterr().out  # the Goals table is printed too
    assert (BENCH / "README.md").read_text().count("### Hot-path changes, measured with local experiments") == 1


def test_verdicts_come_from_the_goals_table():
    results = sample_results()
    results["forwarded"]["setups"]["grpcio/stream/grpcio"]["rows"][0]["p50_cost"] = (
        goals.GOALS["forwarded"].threshold + 0.01
    )
    results["hot_get"]["rows"][2]["engine_vs_seed"]["rps"] = 1.99
    results["forwarded"]["setups"]["engine/unary/engine"]["rows"][1]["throughput_cost"] = 1.51
    results["memory"]["rows"][1]["rss_over_counted"] = goals.GOALS["memory_1k"].threshold
    results["storm"]["rows"][1]["origin_loads"] = [10, 11, 10]
    results["warm"]["rows"][3]["changes"]["scale-out 3→4"]["share"] = 0.0101
    rows = {r[0]: r for r in goals.headline(results)}
    assert rows["Forwarded vs local hit, grpcio/stream/grpcio"][1:4:2] == ("≤ 2×", "**not met**")
    assert rows["Forwarded vs local hit on the engine's client, 16 stream(s)"][1:4:2] == ("≤ 1.5×", "**not met**")
    assert rows["Forwarded vs local hit on the engine's client, 1 stream(s)"][3] == "met"
    assert rows["Memory: RSS growth / counted bytes at 1 KiB"][1:4:2] == ("≤ 1.5×", "met")  # at the bound
    assert rows["Miss storm: origin loads for 1000 Gets of 10 cold keys"][1:4:2] == ("exactly 10", "**not met**")
    assert rows[f"{ENGINE_VS_SEED}, Gets/s"][1:4:2] == ("≥ 2×", "**not met**")
    assert rows[f"{ENGINE_VS_SEED}, Gets per server CPU-second"][3] == "met"
    results["skew"]["cold_start"]["origin_loads"] = 441
    results["skew"]["oracle"]["rate_over_oracle"] = 0.89
    rows = {r[0]: r for r in goals.headline(results)}
    assert rows["Skew: cold start, 1 s origin, 2 s deadlines: origin loads / distinct keys"][3] == "**not met**"
    assert rows["Skew: hot-cache hit share / an oracle's, Zipf 0.9, data 10× the hot budget"][3] == "**not met**"
    warm = rows["Warm membership changes: origin loads / warm keys (rolling restart, scale-out, planned stop)"]
    assert warm[3] == "**not met**" and "1.01%" in warm[2]


@pytest.mark.parametrize(
    "state, words",
    [
        (None, "has not been run yet"),
        ({"error": "boom"}, "failed in this run"),
        ({"skipped": "no h2load"}, "skipped: no h2load"),
    ],
)
def test_a_missing_benchmark_is_said_so(tmp_path, state, words):
    results = copy.deepcopy(sample_results())
    if state is None:
        del results["getmany"]
    else:
        results["getmany"] = state
    report.render(results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert words in text.split("## 3. GetMany")[1].split("## 4.")[0]
    assert "GetMany keys/s" not in text.split("## Goals")[1].split("## 1.")[0]


def _section(text: str, start: str, end: str) -> str:
    return text.split(start)[1].split(end)[0]


def test_hot_get_shows_the_engine_and_memcached(tmp_path):
    report.render(sample_results(), tmp_path)
    text = (tmp_path / "results.md").read_text()
    hot = _section(text, "## 1. Hot Get", "## 2.")
    assert "| 100 B | 8 × 16 | worker, engine | 150,000 | 160,000 |" in hot
    assert "| 100 B | 8 × 16 | worker, engine + TLS |" in hot
    assert "| 100 B | 8 × 16 | memcached (1 thread) | 240,000 | 250,000 | 4.0 | 0.96 | – | – |" in hot
    assert "| 100 B | 128 | engine / memcached | **0.62×** | **0.64×** | – |" in hot
    assert "| 64 KiB | 8 | engine / memcached |" in hot and "| 1 MiB | 8 | engine / memcached |" not in hot
    assert "memcached not measured at 1 MiB, 8 streams: memcaslap sets at least 1,024 keys" in hot
    assert "Check (memcached): 2,500,000 gets measured, 0 misses" in hot
    ref = {r[0]: r for r in goals.headline(sample_results())}[
        "Hot Get on the engine vs memcached (1 thread, memcaslap), the reference for what a cache costs"
    ]
    assert ref[1] == "report" and ref[3] == "reported"
    assert ref[2].startswith(
        "server CPU per get at 128 streams: engine 6.2 µs, memcached 4.0 µs: a get costs the engine 1.56× what it "
        "costs memcached (0.64× its Gets per CPU-second), 0.62× its Gets/s; 1: costs 1.56×, Gets/s 0.62×; 8: "
    )


def test_rows_of_a_removed_backend_are_ignored(tmp_path):
    """An older results.json still holds the native backend's rows: they are left out, nothing breaks."""
    results = sample_results()
    for row in results["hot_get"]["rows"]:
        row["servers"]["native"] = row["servers"]["native-echo"] = row["servers"]["engine"]
        row["native_vs_grpcio"] = row["engine_vs_native"] = {"rps": 9.0, "per_cpu": 9.0, "p50": 1.0}
        row["servers"].pop("memcached", None)
        row.pop("engine_vs_memcached", None)
        row.pop("memcached_skipped", None)
    del results["hot_get"]["memcached"]
    results["hot_get"]["check"]["native"] = results["hot_get"]["check"]["engine"]
    setups = results["forwarded"]["setups"]
    setups["native/unary/grpcio"] = copy.deepcopy(setups["grpcio/stream/grpcio"])
    del results["profile"]["server"]
    report.render(results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "native" not in text
    assert "memcached (1 thread)" not in _section(text, "## 1. Hot Get", "## 2.")
    assert "reference for what a cache costs" not in text
    profile = text.split("## Profile of the hot path")[1]
    assert "on a backend the product no longer has; re-run it" in profile and "py-spy samples" not in profile


def test_worker_limits_renders_its_section_and_judges_its_goals():
    import worker_limits

    def row(server, added, code="RESOURCE_EXHAUSTED", served=True):
        return {
            "server": server,
            "idle_s": 10.0,
            "idle_cores": 0.002,
            "code": code,
            "hwm_before_mib": 60.0,
            "hwm_added_mib": added,
            "served_after": served,
        }

    res = {"rows": [row("engine", 0.3), row("grpcio", 2.2)], "request_mib": 50}
    text = "\n".join(worker_limits.section(res))
    assert "| engine | 0.20% | RESOURCE_EXHAUSTED | 60.0 | **0.3** | yes |" in text
    assert "peak added 0.14×" in text
    assert [met for *_, met in worker_limits.goal_rows(res)] == [True, True]
    res["rows"][0] = row("engine", 5.0)  # over the 4 MiB goal
    assert [met for *_, met in worker_limits.goal_rows(res)] == [True, False]
    res["rows"][0] = row("engine", 0.3, code="OK")  # taken whole, not refused
    assert [met for *_, met in worker_limits.goal_rows(res)] == [True, False]
    assert worker_limits.goal_rows({"rows": [row("grpcio", 2.2)]}) == []  # no engine here: no engine goals
    assert "has not been run yet" in "\n".join(worker_limits.section(None))
