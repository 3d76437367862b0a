"""Benchmark 1: hot Get on one worker, against the seed's own Go server,
memcached and a bare echo server, on both server backends.

Servers, each in its own process, all answering the same GetRequest with a
100 B value (key of 98 bytes: the seed's loader returns "v-" + key):

- seed:         the seed's Go server (seednode, GOMAXPROCS=1), built from its
                source by ../shared/seedgo/build.sh; it logs a line per Get
                to a file, as it does;
- echo:         a bare grpc.aio server with the same generated servicer;
- engine:       our worker (appliance.serving.Node) on our Rust engine
                (engine/), where it is built: hits are answered in Rust;
- engine-tls:   the same with [tls] on (rustls; h2load over TLS 1.3, a
                self-signed certificate), on the 100 B rows: a TLS Get
                against the seed's plaintext one;
- grpcio:       our worker on the grpcio backend (the portable path);
- memcached:    memcached (-t 1) under memcaslap (1 thread, gets only, all
                hits), at the same value size and number of requests in
                flight: memcached's text protocol has one request in flight
                per connection, so 1, 8 and 128 streams are 1, 8 and 128
                connections (memcaslap -c N -n 1). memcaslap cannot get one
                key: its key window is at least 1,024 keys per connection,
                all set before the gets; the figures are taken at the server
                after that preload (lib.memcaslap_steady). Where the window
                would not fit the memory given to memcached (1 MiB values:
                8 x 1,024 x 1 MiB), the cell is left out and the row says why.
                memcached listens on 127.0.0.1 only, so it runs on the box's
                own loopback, outside the seed's namespace.

The seed listens on every interface, so it, the workers, the echo server
and h2load run in one private network namespace (loopback only) where the
box allows one; else the seed is left out and the rest run on 127.0.0.1.

Figures per round: Gets/s (h2load; memcached's own count for memcached)
and server CPU seconds (utime+stime of the server process,
/proc/PID/stat), hence Gets per server CPU-second. Runs of the servers
alternate (ABBA...); each ratio is the median of per-round ratios. The key
is warmed first, so every worker Get is a main-cache hit.
"""

from __future__ import annotations

from fmt import size_label

import lib
from appliance.transport import engine_available
from lib import GET_PATH, get_body, h2load, value_key

# (connections, streams per connection): 1, 8 and the 8 x 16 = 128.
CONCURRENCY = ((1, 1), (4, 2), (8, 16))
SIZES = (1024, 65536, 1 << 20)
SIZE_CONC = (4, 2)
SEED_KEY = "k" * 98  # seed value "v-" + key = 100 B; ours: 100 B for a key not named "v<N>-"
MEMCACHED_MB = 1024  # memcached's -m; a cell whose memcaslap window needs more than 60% of it is left out
MEMCACHED_MAX_ITEM = "2m"  # -I: room for a 1 MiB value with its key and header (the default is 1m)
PAIRS = (  # (name, numerator, denominator)
    ("engine_vs_seed", "engine", "seed"),
    ("engine_vs_memcached", "engine", "memcached"),
    ("engine_vs_grpcio", "engine", "grpcio"),
    ("engine_tls_vs_seed", "engine-tls", "seed"),
    ("engine_tls_vs_engine", "engine-tls", "engine"),
    ("grpcio_vs_echo", "grpcio", "echo"),
)
KEYS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "gets_per_cpu_s", "server_cores", "client_cpu_share")
MEMCACHED_KEYS = ("rps", "cpu_us_per_req", "gets_per_cpu_s", "server_cores", "client_cpu_share")  # no latencies


def memcached_unfit(size: int, streams: int) -> str | None:
    """None when memcaslap's window of `size`-byte values for `streams`
    connections fits the memory this bench gives memcached, else why not."""
    window = streams * lib.MEMCASLAP_WINDOW * size
    if window <= 0.6 * (MEMCACHED_MB << 20):
        return None
    total = f"{window / 2**30:g} GiB" if window >= 1 << 30 else size_label(window)
    return (
        f"memcaslap sets at least {lib.MEMCASLAP_WINDOW:,} keys per connection before its gets: "
        f"{streams} × {lib.MEMCASLAP_WINDOW:,} × {size_label(size)} = {total}, more than the "
        f"{MEMCACHED_MB} MiB this bench gives memcached"
    )


def run(cfg) -> dict:
    seconds, rounds = cfg.seconds, cfg.rounds
    why_no_seed = lib.netns_unavailable()
    ns = lib.Netns("hotget") if why_no_seed is None else None
    prefix = ns.prefix if ns else []
    if ns:
        ns.__enter__()
    procs = []
    try:
        servers: dict[str, tuple[int, lib.Proc]] = {}
        if ns:
            try:
                port = lib.free_port()
                seed = lib.start_seed("hot-seed", ns, port)
                procs.append(seed)
                servers["seed"] = (port, seed)
            except RuntimeError as exc:
                why_no_seed = str(exc).splitlines()[0]
        proc, port = lib.start_echo("hot-echo", prefix=prefix)
        procs.append(proc)
        servers["echo"] = (port, proc)
        socks = {}
        backends = ["grpcio"]
        if engine_available() is None:
            backends.insert(0, "engine")
        for backend in backends:
            proc, port, sock = lib.start_worker(f"hot-{backend}", server=backend, prefix=prefix)
            procs.append(proc)
            servers[backend] = (port, proc)
            socks[backend] = sock
        if engine_available() is None:
            tls_dir = lib.self_signed(lib.OUT / "hot-tls")
            proc, port, sock = lib.start_worker(
                "hot-engine-tls", server="engine", prefix=prefix, extra=["--tls-dir", str(tls_dir)]
            )
            procs.append(proc)
            servers["engine-tls"] = (port, proc)
            socks["engine-tls"] = sock
        memcached, mc_port = lib.start_memcached("hot-memcached", memory_mb=MEMCACHED_MB, max_item=MEMCACHED_MAX_ITEM)
        procs.append(memcached)
        mc_check = {"gets": 0, "get_misses": 0, "sets_during": 0}
        before = {b: lib.group_stats(s) for b, s in socks.items()}
        guess: dict = {}
        measured = {b: 0 for b in socks}

        def arm_memcached(size: int, streams: int):
            def go():
                res = lib.memcaslap_steady(
                    mc_port,
                    seconds,
                    memcached,
                    value_size=size,
                    concurrency=streams,
                    name=f"hot-memcached-{size}-{streams}",
                )
                res["gets_per_cpu_s"] = res["succeeded"] / max(res["server_cpu_s"], 1e-9)
                res["server_cores"] = res["server_cpu_s"] / max(res["wall_s"], 1e-9)
                mc_check["gets"] += res["succeeded"]
                mc_check["get_misses"] += res["get_misses"]
                mc_check["sets_during"] += res["sets_during"]
                return res

            return go

        def arm(name: str, key: str, size: int, conns: int, per_conn: int):
            port, proc = servers[name]
            scheme = "https" if name.endswith("-tls") else "http"
            body = get_body(key)
            expect = lib.get_response_bytes(size)
            streams = conns * per_conn

            def go():
                g = guess.get((name, size, streams))
                if g is None:  # an unmeasured probe sizes the runs (and warms up)
                    probe = h2load(
                        port,
                        GET_PATH,
                        body,
                        n=300 if size < 65536 else 60,
                        streams=streams,
                        conns=conns,
                        name=f"hot-probe-{name}",
                        watch=[proc.pid],
                        prefix=prefix,
                        expect_data=expect,
                        scheme=scheme,
                    )
                    g = probe["rps"]
                n = int(min(400_000, max(100, g * seconds)))
                res = lib.per_request_cpu(
                    h2load(
                        port,
                        GET_PATH,
                        body,
                        n=n,
                        streams=streams,
                        conns=conns,
                        name=f"hot-{name}-{size}-{streams}",
                        watch=[proc.pid],
                        prefix=prefix,
                        timeout=seconds * 8 + 30,
                        expect_data=expect,
                        scheme=scheme,
                    )
                )
                res["gets_per_cpu_s"] = res["succeeded"] / max(res["server_cpu_s"], 1e-9)
                res["server_cores"] = res["server_cpu_s"] / max(res["wall_s"], 1e-9)
                guess[(name, size, streams)] = res["rps"]
                if name in measured:
                    measured[name] += res["succeeded"]
                return res

            return go

        table = []
        for size, (conns, per_conn) in [(100, c) for c in CONCURRENCY] + [(z, SIZE_CONC) for z in SIZES]:
            streams = conns * per_conn
            names = [n for n in servers if size == 100 or n not in ("seed", "engine-tls")]
            key = SEED_KEY if size == 100 else value_key(size)
            arms = {n: arm(n, key, size, conns, per_conn) for n in names}
            row = {"size": size, "streams": streams, "conns": conns, "servers": {}}
            unfit = memcached_unfit(size, streams)
            if unfit is None:
                arms["memcached"] = arm_memcached(size, streams)
            else:
                row["memcached_skipped"] = unfit
            lib.log(f"hot Get: {size} B, {conns} x {per_conn} streams: {', '.join(arms)}")
            if unfit:
                lib.log(f"  memcached left out: {unfit}")
            runs = lib.interleave(arms, rounds)
            for n in arms:
                row["servers"][n] = lib.summarize(
                    runs[n], keys=(*(MEMCACHED_KEYS if n == "memcached" else KEYS), "other_cpu_cores")
                )
            for pair, a, b in PAIRS:
                if a in runs and b in runs:
                    both = list(zip(runs[a], runs[b], strict=True))
                    row[pair] = {
                        "rps": lib.median([x["rps"] / y["rps"] for x, y in both]),
                        "per_cpu": lib.median([x["gets_per_cpu_s"] / y["gets_per_cpu_s"] for x, y in both]),
                    }
                    if all("p50_ms" in x and "p50_ms" in y for x, y in both):  # memcaslap gives no percentiles
                        row[pair]["p50"] = lib.median([x["p50_ms"] / y["p50_ms"] for x, y in both])
            lib.log(
                "  "
                + "; ".join(
                    f"{n} {row['servers'][n]['rps']:.0f}/s {row['servers'][n]['gets_per_cpu_s']:.0f}/CPU-s "
                    f"({row['servers'][n]['server_cores']:.2f} cores)"
                    for n in arms
                )
            )
            lib.log(
                "  "
                + "; ".join(
                    f"{p} x{row[p]['rps']:.2f} Gets/s, x{row[p]['per_cpu']:.2f} per CPU-s"
                    for p, *_ in PAIRS
                    if p in row
                )
            )
            table.append(row)
        after = {b: lib.group_stats(s) for b, s in socks.items()}
        return {
            "rows": table,
            "seed": None if "seed" in servers else why_no_seed,
            "namespace": bool(ns),
            "memcached": {
                "threads": 1,
                "memory_mb": MEMCACHED_MB,
                "max_item": MEMCACHED_MAX_ITEM,
                "window_per_connection": lib.MEMCASLAP_WINDOW,
                **mc_check,
            },
            "check": {
                b: {
                    "requests": measured[b],
                    "main_hits": after[b]["main_hits"] - before[b]["main_hits"],
                    "loads_during_runs": after[b]["loads"] - before[b]["loads"],
                }
                for b in socks
            },
            "seconds": seconds,
            "rounds": rounds,
        }
    finally:
        for proc in procs:
            proc.kill()
        if ns:
            ns.__exit__(None, None, None)
