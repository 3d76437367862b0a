"""Benchmark 1: hot Get on one worker, against the seed's own Go server,
memcached and a bare echo server, on both server backends.

Servers, each in its own process, all answering the same GetRequest with a
100 B value (key of 98 bytes: the seed's loader returns "v-" + key):

- seed:         the seed's Go server (seednode, GOMAXPROCS=1), built from its
                source by ../shared/seedgo/build.sh; it logs a line per Get
                to a file, as it does;
- echo:         a bare grpc.aio server with the same generated servicer;
- engine:       our worker (appliance.node.serving.Node) on our Rust engine
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
                after that preload (memcached.memcaslap_steady). Where the window
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

from certs import self_signed
from fmt import num, opening, pct, ratio, size_label, table
from goals import GOALS
from h2load import GET_PATH, get_body, get_response_bytes, h2load
from memcached import MEMCASLAP_WINDOW, memcaslap_steady, start_memcached
from processes import OUT, Proc, free_port, log
from rounds import interleave, median, per_request_cpu, summarize
from seed import Netns, netns_unavailable, start_seed
from workers import group_stats, start_echo, start_worker, value_key

from appliance.fronts import engine_available

# (connections, streams per connection): 1, 8 and the 8 x 16 = 128.
CONCURRENCY = ((1, 1), (4, 2), (8, 16))
HEADLINE_STREAMS = 128  # the row the goals against the seed read
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
    window = streams * MEMCASLAP_WINDOW * size
    if window <= 0.6 * (MEMCACHED_MB << 20):
        return None
    total = f"{window / 2**30:g} GiB" if window >= 1 << 30 else size_label(window)
    return (
        f"memcaslap sets at least {MEMCASLAP_WINDOW:,} keys per connection before its gets: "
        f"{streams} × {MEMCASLAP_WINDOW:,} × {size_label(size)} = {total}, more than the "
        f"{MEMCACHED_MB} MiB this bench gives memcached"
    )


def run(cfg) -> dict:
    seconds, rounds = cfg.seconds, cfg.rounds
    why_no_seed = netns_unavailable()
    ns = Netns("hotget") if why_no_seed is None else None
    prefix = ns.prefix if ns else []
    if ns:
        ns.__enter__()
    procs = []
    try:
        servers: dict[str, tuple[int, Proc]] = {}
        if ns:
            try:
                port = free_port()
                seed = start_seed("hot-seed", ns, port)
                procs.append(seed)
                servers["seed"] = (port, seed)
            except RuntimeError as exc:
                why_no_seed = str(exc).splitlines()[0]
        proc, port = start_echo("hot-echo", prefix=prefix)
        procs.append(proc)
        servers["echo"] = (port, proc)
        socks = {}
        backends = ["grpcio"]
        if engine_available() is None:
            backends.insert(0, "engine")
        for backend in backends:
            proc, port, sock = start_worker(f"hot-{backend}", server=backend, prefix=prefix)
            procs.append(proc)
            servers[backend] = (port, proc)
            socks[backend] = sock
        if engine_available() is None:
            tls_dir = self_signed(OUT / "hot-tls")
            proc, port, sock = start_worker(
                "hot-engine-tls", server="engine", prefix=prefix, extra=["--tls-dir", str(tls_dir)]
            )
            procs.append(proc)
            servers["engine-tls"] = (port, proc)
            socks["engine-tls"] = sock
        memcached, mc_port = start_memcached("hot-memcached", memory_mb=MEMCACHED_MB, max_item=MEMCACHED_MAX_ITEM)
        procs.append(memcached)
        mc_check = {"gets": 0, "get_misses": 0, "sets_during": 0}
        before = {b: group_stats(s) for b, s in socks.items()}
        guess: dict = {}
        measured = {b: 0 for b in socks}

        def arm_memcached(size: int, streams: int):
            def go():
                res = memcaslap_steady(
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
            expect = get_response_bytes(size)
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
                res = per_request_cpu(
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

        rows = []
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
            log(f"hot Get: {size} B, {conns} x {per_conn} streams: {', '.join(arms)}")
            if unfit:
                log(f"  memcached left out: {unfit}")
            runs = interleave(arms, rounds)
            for n in arms:
                row["servers"][n] = summarize(
                    runs[n], keys=(*(MEMCACHED_KEYS if n == "memcached" else KEYS), "other_cpu_cores")
                )
            for pair, a, b in PAIRS:
                if a in runs and b in runs:
                    both = list(zip(runs[a], runs[b], strict=True))
                    row[pair] = {
                        "rps": median([x["rps"] / y["rps"] for x, y in both]),
                        "per_cpu": median([x["gets_per_cpu_s"] / y["gets_per_cpu_s"] for x, y in both]),
                    }
                    if all("p50_ms" in x and "p50_ms" in y for x, y in both):  # memcaslap gives no percentiles
                        row[pair]["p50"] = median([x["p50_ms"] / y["p50_ms"] for x, y in both])
            log(
                "  "
                + "; ".join(
                    f"{n} {row['servers'][n]['rps']:.0f}/s {row['servers'][n]['gets_per_cpu_s']:.0f}/CPU-s "
                    f"({row['servers'][n]['server_cores']:.2f} cores)"
                    for n in arms
                )
            )
            log(
                "  "
                + "; ".join(
                    f"{p} x{row[p]['rps']:.2f} Gets/s, x{row[p]['per_cpu']:.2f} per CPU-s"
                    for p, *_ in PAIRS
                    if p in row
                )
            )
            rows.append(row)
        after = {b: group_stats(s) for b, s in socks.items()}
        return {
            "rows": rows,
            "seed": None if "seed" in servers else why_no_seed,
            "namespace": bool(ns),
            "memcached": {
                "threads": 1,
                "memory_mb": MEMCACHED_MB,
                "max_item": MEMCACHED_MAX_ITEM,
                "window_per_connection": MEMCASLAP_WINDOW,
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


SERVER_LABELS = {  # the servers in the table, in its order; anything else in a row is ignored
    "seed": "seed (Go)",
    "memcached": "memcached (1 thread)",
    "echo": "grpc.aio echo",
    "engine": "worker, engine",
    "engine-tls": "worker, engine + TLS",
    "grpcio": "worker, grpcio",
}
PAIR_LABELS = (  # the ratio table's rows, in its order
    ("engine_vs_seed", "engine / seed"),
    ("engine_vs_memcached", "engine / memcached"),
    ("engine_vs_grpcio", "engine / grpcio worker"),
    ("engine_tls_vs_seed", "engine + TLS / seed"),
    ("engine_tls_vs_engine", "engine + TLS / engine"),
    ("grpcio_vs_echo", "grpcio / grpc.aio echo"),
)


def section(res: dict | None) -> list[str]:
    out, ran = opening(
        "## 1. Hot Get: one worker vs the seed's Go server, memcached and a bare echo server", res, "hot_get"
    )
    if not ran:
        return out
    if res.get("seed"):
        out += [f"_The seed's Go server was not measured: {res['seed']}._", ""]
    mc = res.get("memcached")
    if mc:
        out += [
            f"memcached: `-t {mc.get('threads', 1)}`, `-m {mc.get('memory_mb', '?')}`, `-I {mc.get('max_item', '?')}`, "
            "under memcaslap (1 thread, gets only, one connection per request in flight, the same value size; a window "
            f"of {num(mc.get('window_per_connection'))} keys per connection, set before its gets), measured at the "
            "server after that preload: its own count of gets, its CPU from /proc. memcaslap gives no latency "
            "percentiles.",
            "",
        ]
    names = [n for n in SERVER_LABELS if any(n in r["servers"] for r in res["rows"])]
    rows = []
    for r in res["rows"]:
        for n in names:
            s = r["servers"].get(n)
            if s is None:
                continue
            rows.append(
                [
                    size_label(r["size"]),
                    f"{r['conns']} × {r['streams'] // r['conns']}",
                    SERVER_LABELS[n],
                    num(s["rps"]),
                    num(s["gets_per_cpu_s"]),
                    num(s.get("cpu_us_per_req"), 1),
                    num(s["server_cores"], 2),
                    num(s.get("p50_ms"), 3),
                    num(s.get("p99_ms"), 3),
                    pct(s.get("client_cpu_share")),
                    num(s.get("other_cpu_cores"), 2),
                ]
            )
    out += [
        table(
            [
                "value",
                "conns × streams",
                "server",
                "Gets/s (abs.)",
                "Gets per server CPU-s (abs.)",
                "server CPU µs per Get (abs.)",
                "server cores",
                "p50 ms",
                "p99 ms",
                "client CPU share",
                "others",
            ],
            rows,
        ),
        "",
    ]
    rows = []
    for r in res["rows"]:
        for key, label in PAIR_LABELS:
            if key in r:
                v = r[key]
                rows.append(
                    [
                        size_label(r["size"]),
                        r["streams"],
                        label,
                        f"**{ratio(v['rps'])}**",
                        f"**{ratio(v['per_cpu'])}**",
                        ratio(v.get("p50")),
                    ]
                )
    out += [
        "Ratios (median of per-round ratios, same run):",
        "",
        table(["value", "streams", "pair", "Gets/s", "Gets per CPU-s", "p50"], rows),
        "",
    ]
    skipped = [r for r in res["rows"] if r.get("memcached_skipped")]
    for r in skipped:
        out += [f"memcached not measured at {size_label(r['size'])}, {r['streams']} streams: {r['memcached_skipped']}."]
    if skipped:
        out += [""]
    out += [
        "![hot Get against concurrency](hot_get_concurrency.png)",
        "",
        "![hot Get against value size](hot_get_value_size.png)",
        "",
    ]
    for backend, c in (res.get("check") or {}).items():
        if backend not in SERVER_LABELS:
            continue
        out += [
            f"Check ({backend}): {num(c.get('main_hits'))} main-cache hits for {num(c.get('requests'))} Gets h2load "
            f"completed, {c.get('loads_during_runs')} loads during the runs (the first Get of each key).",
            "",
        ]
    if mc and "gets" in mc:
        out += [
            f"Check (memcached): {num(mc['gets'])} gets measured, {num(mc.get('get_misses'))} misses, "
            f"{num(mc.get('sets_during'))} sets while measured.",
            "",
        ]
    return out


LEGEND = {  # the servers drawn, in legend order; anything else in a row is ignored
    "seed": "seed's Go server",
    "memcached": "memcached (1 thread)",
    "echo": "bare grpc.aio echo",
    "engine": "worker, engine backend",
    "engine-tls": "worker, engine backend + TLS",
    "grpcio": "worker, grpcio backend",
}
STYLE = {  # marker, colour
    "seed": ("D", "C2"),
    "memcached": ("P", "C5"),
    "echo": ("o", "C0"),
    "engine": ("s", "C1"),
    "engine-tls": ("^", "C4"),
    "grpcio": ("v", "C3"),
}


def _size_streams(hot: dict) -> int:
    sizes = [r for r in hot["rows"] if r["size"] != 100]
    return sizes[0]["streams"] if sizes else 8


def _sides(a, b, xs, rows) -> None:
    """Throughput on ``a``, Gets per server CPU-second on ``b``, per server
    measured at two x values or more (memcached has no 1 MiB point)."""
    for name, (marker, color) in STYLE.items():
        pts = [(x, r["servers"][name]) for x, r in zip(xs, rows, strict=True) if name in r["servers"]]
        if len(pts) < 2:
            continue
        px = [x for x, _ in pts]
        a.plot(px, [v["rps"] for _, v in pts], marker=marker, color=color, label=LEGEND[name])
        b.plot(px, [v["gets_per_cpu_s"] for _, v in pts], marker=marker, color=color, label=LEGEND[name])


def plot_concurrency(hot: dict, plt):
    if not hot.get("rows"):
        return None
    conc = [r for r in hot["rows"] if r["size"] == 100]
    xs = [r["streams"] for r in conc]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _sides(a, b, xs, conc)
    for ax, what in ((a, "Gets/s"), (b, "Gets per server CPU-second")):
        ax.set(
            xscale="log",
            xlabel="concurrent streams",
            ylabel=f"{what} (absolute, this box)",
            title=f"Hot Get, 100 B values: {what}",
        )
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(bottom=0)
    a.legend(fontsize=8)
    return fig


def plot_value_size(hot: dict, plt):
    if not hot.get("rows"):
        return None
    streams = _size_streams(hot)
    sizes = sorted({r["size"] for r in hot["rows"] if r["streams"] == streams})
    rows = [next(r for r in hot["rows"] if r["size"] == z and r["streams"] == streams) for z in sizes]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _sides(a, b, sizes, rows)
    for ax, what in ((a, "Gets/s"), (b, "Gets per server CPU-second")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [size_label(z) for z in sizes])
        ax.set(xlabel="value size", ylabel=f"{what} (absolute, this box)", title=f"Hot Get, {streams} streams: {what}")
    a.legend(fontsize=8)
    return fig


FIGURES = {"hot_get_concurrency.png": plot_concurrency, "hot_get_value_size.png": plot_value_size}


def _inverse(x: float | None) -> float | None:
    return 1 / x if x else None


def goal_rows(hot: dict) -> list[tuple[str, str, str, bool | None]]:
    """The engine against the seed (goals), against memcached (the
    reference), and the grpcio backend against its echo."""
    rows: list[tuple[str, str, str, bool | None]] = []
    if not hot.get("rows"):
        return rows
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
                    g.met(v[field]),
                )
            )
    else:
        why = hot.get("seed") or ("no engine worker in this run" if "engine" not in head["servers"] else "?")
        g = GOALS["engine_hot_get_per_cpu_vs_seed"]
        rows.append(("Hot Get on the engine vs the seed's Go server", g.target(), f"not measured: {why}", False))
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
                g.met(v["per_cpu"]),
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
                None,
            )
        )
    elif head.get("memcached_skipped"):
        rows.append((label, "report", f"not measured: {head['memcached_skipped']}", None))
    if "grpcio_vs_echo" in head:
        v = head["grpcio_vs_echo"]
        rows.append(
            (
                "Hot Get on the grpcio backend vs a bare grpc.aio echo",
                "report",
                f"{ratio(v['per_cpu'])} per CPU-second, {ratio(v['rps'])} Gets/s {at}",
                None,
            )
        )
    return rows
