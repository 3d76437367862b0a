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

import lib
from lib import GET_MANY_PATH, h2load

BATCHES = (1, 10, 100, 1000)
HEADLINE_BATCH = 100
STREAMS = 8
MEMCASLAP_CONCURRENCY = 16


def _available() -> bool:
    try:
        from appliance.pb import cache_pb2  # noqa: F401
        from appliance.transport.grpc_aio import services
    except ImportError:
        return False
    return hasattr(services, "CACHE_SERVICE")


def run(cfg) -> dict:
    if not _available():
        return {"skipped": "appliance.cache.Cache/GetMany is not in this checkout yet"}
    import grpc

    from appliance.pb import cache_pb2

    mc, mport = lib.start_memcached()
    server = lib.default_server()  # the product's default: the engine answers all-hit batches in Rust
    worker, wport, sock = lib.start_worker("getmany-worker", server=server)
    try:
        keysets = {n: [lib.value_key(100, f"gm{n}-{i}") for i in range(n)] for n in BATCHES}
        with grpc.insecure_channel(f"{lib.HOST}:{wport}") as ch:
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
            n: lib.grpc_body(cache_pb2.GetManyRequest(group="bench", keys=k), f"getmany-{n}")
            for n, k in keysets.items()
        }
        before = lib.group_stats(sock)
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
                r = lib.per_request_cpu(
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
            return lib.memcaslap(mport, max(2.0, cfg.seconds), [mc.pid], concurrency=MEMCASLAP_CONCURRENCY)

        def memcached_multiget():
            return lib.memcaslap(
                mport, max(2.0, cfg.seconds), [mc.pid], division=HEADLINE_BATCH, concurrency=MEMCASLAP_CONCURRENCY
            )

        rows = []
        mc_runs: list[dict] = []
        multi_runs: list[dict] = []
        for n in BATCHES:
            lib.log(f"GetMany: batches of {n}" + (" vs memcached" if n == HEADLINE_BATCH else ""))
            if n == HEADLINE_BATCH:
                runs = lib.interleave(
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
                "keys_per_s": lib.median([r["keys_per_s"] for r in gm]),
                "rps": lib.median([r["rps"] for r in gm]),
                "p50_ms": lib.median([r["p50_ms"] for r in gm]),
                "p99_ms": lib.median([r["p99_ms"] for r in gm]),
                "cpu_us_per_key": lib.median([r["cpu_us_per_key"] for r in gm]),
                "client_cpu_share": lib.median([r["client_cpu_share"] for r in gm]),
            }
            if n == HEADLINE_BATCH:
                row["ratio_vs_memcached"] = lib.median(
                    [g["keys_per_s"] / m["rps"] for g, m in zip(gm, mc_runs, strict=True)]
                )
                row["ratio_vs_memcached_multiget"] = lib.median(
                    [g["keys_per_s"] / m["rps"] for g, m in zip(gm, multi_runs, strict=True)]
                )
            lib.log(f"  {row['keys_per_s']:.0f} keys/s ({row['rps']:.0f} calls/s, p50 {row['p50_ms']:.2f} ms)")
            rows.append(row)
        after = lib.group_stats(sock)
        memc = {
            "gets_per_s": lib.median([m["rps"] for m in mc_runs]),
            "gets_per_s_all": [round(m["rps"]) for m in mc_runs],
            "get_misses": sum(m["get_misses"] for m in mc_runs),
            "cpu_us_per_key": lib.median([m["cpu_us_per_key"] for m in mc_runs]),
            "multiget_keys_per_s": lib.median([m["rps"] for m in multi_runs]),
            "multiget_cpu_us_per_key": lib.median([m["cpu_us_per_key"] for m in multi_runs]),
            "multiget_misses": sum(m["get_misses"] for m in multi_runs),
        }
        head = next(r for r in rows if r["batch"] == HEADLINE_BATCH)
        lib.log(
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
