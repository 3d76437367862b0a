"""Benchmark 3: keys per second through GetMany on one worker, against
memcached's single-key get rate under memcaslap, both measured here.

The worker answers appliance.cache.Cache/GetMany for a batch of keys that
are all main-cache hits (warmed by one GetMany first). h2load drives it
with a fixed GetManyRequest body, like the Get benchmarks. memcached runs
with one thread (-t 1) against one memcaslap thread, gets only, 100-byte
values, all hits. For context, memcached's own multi-get of the same
batch size is measured too (memcaslap -d). Runs alternate; the ratio is the median of per-round
ratios (GetMany keys/s / memcached gets/s).
"""

from __future__ import annotations

from fmt import num, opening, pct, ratio, table
from goals import GOALS
from h2load import GET_MANY_PATH, grpc_body, h2load
from memcached import memcaslap, start_memcached
from processes import HOST, log
from rounds import interleave, median, per_request_cpu
from workers import default_server, group_stats, start_worker, value_key

BATCHES = (1, 10, 100, 1000)
HEADLINE_BATCH = 100
STREAMS = 8
MEMCASLAP_CONCURRENCY = 16


def run(cfg) -> dict:
    import grpc

    from appliance.pb import cache_pb2

    mc, mport = start_memcached()
    server = default_server()  # the product's default: the engine answers all-hit batches in Rust
    worker, wport, sock = start_worker("getmany-worker", server=server)
    try:
        keysets = {n: [value_key(100, f"gm{n}-{i}") for i in range(n)] for n in BATCHES}
        with grpc.insecure_channel(f"{HOST}:{wport}") as ch:
            call = ch.unary_unary(
                GET_MANY_PATH,
                request_serializer=cache_pb2.GetManyRequest.SerializeToString,
                response_deserializer=cache_pb2.GetManyResponse.FromString,
            )
            reply_bytes = {}
            for n, keys in keysets.items():
                for _ in range(2):  # load, then check the hits
                    reply = call(cache_pb2.GetManyRequest(group="bench", keys=keys), timeout=30)
                    assert [r.key for r in reply.results] == keys
                    assert all(r.code == 0 and len(r.value) == 100 for r in reply.results), reply.results[:3]
                reply_bytes[n] = 5 + reply.ByteSize()  # a good reply's DATA bytes
        bodies = {
            n: grpc_body(cache_pb2.GetManyRequest(group="bench", keys=k), f"getmany-{n}") for n, k in keysets.items()
        }
        before = group_stats(sock)
        guess = {}
        sent_keys = [0]

        def getmany(n):
            def go():
                rate = guess.get(n)
                if rate is None:
                    rate = h2load(
                        wport,
                        GET_MANY_PATH,
                        bodies[n],
                        n=max(20, 2000 // n),
                        streams=STREAMS,
                        name=f"getmany-probe-{n}",
                        expect_data=reply_bytes[n],
                    )["rps"]
                    sent_keys[0] += max(20, 2000 // n) * n
                reqs = int(min(300_000, max(20, rate * cfg.seconds)))
                r = per_request_cpu(
                    h2load(
                        wport,
                        GET_MANY_PATH,
                        bodies[n],
                        n=reqs,
                        streams=STREAMS,
                        name=f"getmany-{n}",
                        watch=[worker.pid],
                        timeout=cfg.seconds * 8 + 30,
                        expect_data=reply_bytes[n],
                    )
                )
                guess[n] = r["rps"]
                sent_keys[0] += r["succeeded"] * n
                r["keys_per_s"] = r["rps"] * n
                r["cpu_us_per_key"] = r["cpu_us_per_req"] / n
                return r

            return go

        def memcached():
            return memcaslap(mport, max(2.0, cfg.seconds), [mc.pid], concurrency=MEMCASLAP_CONCURRENCY)

        def memcached_multiget():
            return memcaslap(
                mport, max(2.0, cfg.seconds), [mc.pid], division=HEADLINE_BATCH, concurrency=MEMCASLAP_CONCURRENCY
            )

        rows = []
        mc_runs: list[dict] = []
        multi_runs: list[dict] = []
        for n in BATCHES:
            log(f"GetMany: batches of {n}" + (" vs memcached" if n == HEADLINE_BATCH else ""))
            if n == HEADLINE_BATCH:
                runs = interleave(
                    {"memcached": memcached, "getmany": getmany(n), "memcached_multiget": memcached_multiget},
                    cfg.rounds,
                )
                mc_runs = runs["memcached"]
                multi_runs = runs["memcached_multiget"]
                gm = runs["getmany"]
            else:
                gm = [getmany(n)() for _ in range(max(1, cfg.rounds - 1))]
            row = {
                "batch": n,
                "keys_per_s": median([r["keys_per_s"] for r in gm]),
                "rps": median([r["rps"] for r in gm]),
                "p50_ms": median([r["p50_ms"] for r in gm]),
                "p99_ms": median([r["p99_ms"] for r in gm]),
                "cpu_us_per_key": median([r["cpu_us_per_key"] for r in gm]),
                "client_cpu_share": median([r["client_cpu_share"] for r in gm]),
            }
            if n == HEADLINE_BATCH:
                row["ratio_vs_memcached"] = median(
                    [g["keys_per_s"] / m["rps"] for g, m in zip(gm, mc_runs, strict=True)]
                )
                row["ratio_vs_memcached_multiget"] = median(
                    [g["keys_per_s"] / m["rps"] for g, m in zip(gm, multi_runs, strict=True)]
                )
            log(f"  {row['keys_per_s']:.0f} keys/s ({row['rps']:.0f} calls/s, p50 {row['p50_ms']:.2f} ms)")
            rows.append(row)
        after = group_stats(sock)
        memc = {
            "gets_per_s": median([m["rps"] for m in mc_runs]),
            "gets_per_s_all": [round(m["rps"]) for m in mc_runs],
            "get_misses": sum(m["get_misses"] for m in mc_runs),
            "cpu_us_per_key": median([m["cpu_us_per_key"] for m in mc_runs]),
            "multiget_keys_per_s": median([m["rps"] for m in multi_runs]),
            "multiget_cpu_us_per_key": median([m["cpu_us_per_key"] for m in multi_runs]),
            "multiget_misses": sum(m["get_misses"] for m in multi_runs),
        }
        head = next(r for r in rows if r["batch"] == HEADLINE_BATCH)
        log(
            f"  memcached {memc['gets_per_s']:.0f} gets/s; GetMany({HEADLINE_BATCH}) / memcached = "
            f"{head['ratio_vs_memcached']:.2f}"
        )
        return {
            "rows": rows,
            "server": server,
            "memcached": memc,
            "headline_batch": HEADLINE_BATCH,
            "ratio": head["ratio_vs_memcached"],
            "check": {
                "keys_sent": sent_keys[0],
                "main_hits": after["main_hits"] - before["main_hits"],
                "loads": after["loads"] - before["loads"],
            },
        }
    finally:
        worker.kill()
        mc.kill()


def section(res: dict | None) -> list[str]:
    out, ran = opening("## 3. GetMany batching vs memcached", res, "getmany")
    if not ran:
        return out
    mc = res["memcached"]
    out += [
        f"memcached (1 thread) under memcaslap (1 thread, 16 connections, gets only, 100 B values, all hits): "
        f"**{num(mc['gets_per_s'])} gets/s** (absolute; rounds {mc['gets_per_s_all']}, {mc['get_misses']} misses), "
        f"{num(mc['cpu_us_per_key'], 2)} µs of memcached CPU per get. Its own multi-get of "
        f"{res['headline_batch']} keys: {num(mc.get('multiget_keys_per_s'))} keys/s.",
        "",
    ]
    rows = []
    for r in res["rows"]:
        rows.append(
            [
                r["batch"],
                num(r["rps"]),
                num(r["keys_per_s"]),
                f"**{ratio(r['ratio_vs_memcached'])}**"
                if "ratio_vs_memcached" in r
                else ratio(r["keys_per_s"] / mc["gets_per_s"]),
                num(r["p50_ms"], 2),
                num(r["p99_ms"], 2),
                num(r["cpu_us_per_key"], 2),
                pct(r["client_cpu_share"]),
            ]
        )
    out += [
        table(
            [
                "keys per call",
                "calls/s (abs.)",
                "keys/s (abs.)",
                "vs memcached gets/s",
                "p50 ms (abs.)",
                "p99 ms (abs.)",
                "worker CPU µs per key (abs.)",
                "h2load CPU share",
            ],
            rows,
        ),
        "",
        "![GetMany](getmany.png)",
        "",
    ]
    c = res.get("check", {})
    out += [
        f"Check: {num(c.get('keys_sent'))} keys requested, {num(c.get('main_hits'))} main-cache hits, "
        f"{c.get('loads')} loads.",
        "",
    ]
    return out


def plot(gm: dict, plt):
    if not gm.get("rows"):
        return None
    fig, a = plt.subplots(figsize=(6, 4))
    xs = [r["batch"] for r in gm["rows"]]
    a.plot(xs, [r["keys_per_s"] for r in gm["rows"]], "s-", label="worker GetMany (keys/s)")
    a.axhline(gm["memcached"]["gets_per_s"], color="C1", ls="--", label="memcached single-key gets/s")
    if gm["memcached"].get("multiget_keys_per_s"):
        a.axhline(
            gm["memcached"]["multiget_keys_per_s"],
            color="C2",
            ls=":",
            label=f"memcached multi-get of {gm['headline_batch']} (keys/s)",
        )
    a.set(
        xscale="log",
        yscale="log",
        xlabel="keys per GetMany call",
        ylabel="keys/s (absolute, this box)",
        title="GetMany on one worker vs memcached (1 thread)",
    )
    a.set_xticks(xs, [str(x) for x in xs])
    a.legend(fontsize=8)
    return fig


FIGURES = {"getmany.png": plot}


def goal_rows(gm: dict) -> list[tuple[str, str, str, bool]]:
    if not gm.get("rows"):
        return []
    g = GOALS["getmany"]
    head = next(r for r in gm["rows"] if r["batch"] == gm["headline_batch"])
    return [
        (
            f"GetMany keys/s (batches of {gm['headline_batch']}) vs memcached single-key gets/s",
            g.target(),
            f"{ratio(gm['ratio'])} ({num(head['keys_per_s'])} vs {num(gm['memcached']['gets_per_s'])}/s; "
            f"vs memcached's own multi-get: {ratio(head.get('ratio_vs_memcached_multiget'))})",
            g.met(gm["ratio"]),
        )
    ]
