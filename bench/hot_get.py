"""Benchmark 1: hot Get on one worker, against the seed's own Go server and
two echo servers, on both server backends.

Servers, each in its own process, all answering the same GetRequest with a
100 B value (key of 98 bytes: the seed's loader returns "v-" + key):

- seed:         the seed's Go server (seednode, GOMAXPROCS=1), built from its
                source by ../shared/seedgo/build.sh; it logs a line per Get
                to a file, as it does;
- echo:         a bare grpc.aio server with the same generated servicer;
- native-echo:  pygrpc-native's low-level NativeGrpcFront echo, parsing each
                GetRequest: the floor of the native backend;
- engine:       our worker on our Rust engine (engine/), where it is built;
- engine-tls:   the same with [tls] on (rustls; h2load over TLS 1.3, a
                self-signed certificate), on the 100 B rows: a TLS Get
                against the seed's plaintext one;
- native:       our worker (appliance.node.Node) on the native backend;
- grpcio:       our worker on the grpcio backend (what served before).

The seed listens on every interface, so all of them and h2load run in one
private network namespace (loopback only) where the box allows one; else
the seed is left out and the rest run on 127.0.0.1.

Figures per round: Gets/s (h2load) and server CPU seconds (utime+stime of
the server process, /proc/PID/stat), hence Gets per server CPU-second. Runs
of the servers alternate (ABBA...); each ratio is the median of per-round
ratios. The key is warmed first, so every worker Get is a main-cache hit.
"""

from __future__ import annotations

import lib
from appliance.transport import engine_available
from lib import GET_PATH, get_body, h2load, value_key

# (connections, streams per connection): 1, 8 and the 8 x 16 = 128.
CONCURRENCY = ((1, 1), (4, 2), (8, 16))
SIZES = (1024, 65536, 1 << 20)
SIZE_CONC = (4, 2)
SEED_KEY = "k" * 98  # seed value "v-" + key = 100 B; ours: 100 B for a key not named "v<N>-"
PAIRS = (  # (name, numerator, denominator)
    ("engine_vs_seed", "engine", "seed"),
    ("engine_vs_native", "engine", "native"),
    ("engine_vs_grpcio", "engine", "grpcio"),
    ("engine_tls_vs_seed", "engine-tls", "seed"),
    ("engine_tls_vs_engine", "engine-tls", "engine"),
    ("native_vs_seed", "native", "seed"),
    ("native_vs_grpcio", "native", "grpcio"),
    ("native_vs_native_echo", "native", "native-echo"),
    ("grpcio_vs_echo", "grpcio", "echo"),
    ("native_echo_vs_seed", "native-echo", "seed"),
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
        for kind, name in (("echo", "echo"), ("native-echo", "native-echo")):
            proc, port = lib.start_echo(f"hot-{name}", kind=kind, prefix=prefix)
            procs.append(proc)
            servers[name] = (port, proc)
        socks = {}
        backends = ["native", "grpcio"]
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
        before = {b: lib.group_stats(s) for b, s in socks.items()}
        guess: dict = {}
        measured = {b: 0 for b in socks}

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
            lib.log(f"hot Get: {size} B, {conns} x {per_conn} streams: {', '.join(names)}")
            key = SEED_KEY if size == 100 else value_key(size)
            runs = lib.interleave({n: arm(n, key, size, conns, per_conn) for n in names}, rounds)
            row = {"size": size, "streams": streams, "conns": conns, "servers": {}}
            for n in names:
                row["servers"][n] = lib.summarize(
                    runs[n],
                    keys=(
                        "rps",
                        "p50_ms",
                        "p99_ms",
                        "cpu_us_per_req",
                        "gets_per_cpu_s",
                        "server_cores",
                        "client_cpu_share",
                        "other_cpu_cores",
                    ),
                )
            for pair, a, b in PAIRS:
                if a in runs and b in runs:
                    row[pair] = {
                        "rps": lib.median([x["rps"] / y["rps"] for x, y in zip(runs[a], runs[b], strict=False)]),
                        "per_cpu": lib.median(
                            [x["gets_per_cpu_s"] / y["gets_per_cpu_s"] for x, y in zip(runs[a], runs[b], strict=False)]
                        ),
                        "p50": lib.median([x["p50_ms"] / y["p50_ms"] for x, y in zip(runs[a], runs[b], strict=False)]),
                    }
            lib.log(
                "  "
                + "; ".join(
                    f"{n} {row['servers'][n]['rps']:.0f}/s {row['servers'][n]['gets_per_cpu_s']:.0f}/CPU-s "
                    f"({row['servers'][n]['server_cores']:.2f} cores)"
                    for n in names
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
