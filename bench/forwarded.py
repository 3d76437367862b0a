"""Benchmark 2: a Get sent to a non-owner (forwarded) against a local hit,
on each server backend and way of forwarding.

Two workers A and B share a ring, with hot_cache_mirror = 0 so A never
keeps a copy: every Get sent to A for a key B owns costs A one call to B.
The local case is the same key sent straight to B (a main-cache hit).

Setups (A and B on the same backend), labelled server/forward/client:
- engine/unary/engine:  the engine backend's default: A forwards a unary
                        GroupCache/Get on the engine's own client (Rust),
                        which B serves in the engine;
- engine/unary/grpcio:  the same, A's call made by grpc.aio (what the
                        engine did before it had a client);
- grpcio/stream/grpcio: the grpcio backend's default, the portable path:
                        A forwards over the Peer/Forward stream.

Cost ratios (forwarded / local, same backend): throughput (local rps /
forwarded rps), p50 latency, CPU per request (A+B for forwarded, B for
local). The forwarder's own call to the owner: A's CPU per forwarded Get
minus A's CPU per local hit (what serving any hit costs A), and its share
of the forwarded Get's whole CPU. With many streams A's singleflight joins
concurrent Gets of the one hot key into fewer calls to B;
`forwards_per_get` reports how many.
"""

from __future__ import annotations

from fmt import num, opening, pct, ratio, table
from goals import GOALS
from h2load import GET_PATH, get_body, get_response_bytes, h2load
from processes import HOST, free_port, log
from rounds import interleave, median, per_request_cpu, summarize
from workers import get_once, group_stats, owned_key, start_worker

STREAMS = (1, 16)
SETUPS = (
    ("engine", "unary", "engine"),
    ("engine", "unary", "grpcio"),
    ("grpcio", "stream", "grpcio"),
)
DEFAULT = "engine/unary/engine"  # what `auto` runs where Rust is built
BEFORE = "grpcio/stream/grpcio"  # what forwarding was before the engine (and where Rust is not built)


def run(cfg) -> dict:
    out = {"setups": {}}
    for server, forward, library in SETUPS:
        label = f"{server}/{forward}/{library}"
        log(f"forwarded Get: {label}")
        out["setups"][label] = _setup(cfg, server, forward, library)
    setups = out["setups"]
    out["default_vs_grpcio_forwarded"] = [
        {"streams": a["streams"], "rps": a["forwarded"]["rps"] / b["forwarded"]["rps"]}
        for a, b in zip(setups[DEFAULT]["rows"], setups[BEFORE]["rows"], strict=False)
    ]
    # Issue 20's figure: the same engine backend, the forwarder's call made
    # by the engine's client against grpc.aio's.
    out["engine_client_vs_grpc_aio"] = [
        {
            "streams": a["streams"],
            "rps": a["forwarded"]["rps"] / b["forwarded"]["rps"],
            "forwarder_cpu": b["forwarder_cpu_us_per_req"] / max(a["forwarder_cpu_us_per_req"], 1e-9),
            "client_call_cpu": b["client_call_cpu_us"] / max(a["client_call_cpu_us"], 1e-9),
        }
        for a, b in zip(setups[DEFAULT]["rows"], setups["engine/unary/grpcio"]["rows"], strict=False)
    ]
    return out


def _setup(cfg, server: str, forward: str, library: str) -> dict:
    tag = f"fwd-{server}-{forward}-{library}"
    # Only the engine backend has a choice of client library.
    knobs = {"forward": forward, "peer_library": library if server == "engine" else ""}
    ports = [free_port(), free_port()]
    peers = [f"{HOST}:{p}" for p in ports]
    a, aport, asock = start_worker(f"{tag}-a", port=ports[0], peers=peers, mirror=0.0, server=server, **knobs)
    b, bport, bsock = start_worker(f"{tag}-b", port=ports[1], peers=peers, mirror=0.0, server=server, **knobs)
    try:
        key = owned_key(peers[1], peers, 100, "fwd")
        mine = owned_key(peers[0], peers, 100, "own")
        assert len(get_once(aport, key)) == 100  # B loads it, A forwards
        assert len(get_once(aport, mine)) == 100  # A's own key, for A's cost of a local hit
        body, own_body = get_body(key), get_body(mine)
        sa0, sb0 = group_stats(asock), group_stats(bsock)
        assert sb0["main_items"] == 1 and sa0["hot_items"] == 0 and sa0["peer_loads"] == 1, (sa0, sb0)
        rows = []
        guess: dict = {}
        expect = get_response_bytes(100)

        for streams in STREAMS:

            def sized(kind, default, streams=streams):
                return int(min(200_000, max(200, guess.get((kind, streams), default) * cfg.seconds)))

            def hit(kind, port, body, proc, streams=streams):
                """Hits on the key's owner: `local` on B (the forwarded key), `local_a` on A (its own key)."""
                r = h2load(
                    port,
                    GET_PATH,
                    body,
                    n=sized(kind, 3000),
                    streams=streams,
                    name=f"{tag}-{kind.replace('_', '-')}-{streams}",
                    watch=[proc.pid],
                    expect_data=expect,
                )
                guess[(kind, streams)] = r["rps"]
                return per_request_cpu(r)

            def local():
                return hit("local", bport, body, b)

            def local_a():
                return hit("local_a", aport, own_body, a)

            def forwarded(streams=streams):
                before = group_stats(bsock)["server_requests"]
                ca, cb = a.cpu(), b.cpu()
                r = h2load(
                    aport,
                    GET_PATH,
                    body,
                    n=sized("fwd", 1500),
                    streams=streams,
                    name=f"{tag}-fwd-{streams}",
                    watch=[a.pid, b.pid],
                    expect_data=expect,
                )
                ok = max(1, r["succeeded"])
                r["a_cpu_us_per_req"] = (a.cpu() - ca) / ok * 1e6  # the forwarder: server + client call
                r["b_cpu_us_per_req"] = (b.cpu() - cb) / ok * 1e6  # the owner
                r["forwards_per_get"] = (group_stats(bsock)["server_requests"] - before) / ok
                guess[("fwd", streams)] = r["rps"]
                return per_request_cpu(r)

            local(), local_a(), forwarded()  # warm-up, sizes the runs
            runs = interleave({"local": local, "local_a": local_a, "forwarded": forwarded}, cfg.rounds)
            lo, la, fw = runs["local"], runs["local_a"], runs["forwarded"]
            a_fwd = median([y["a_cpu_us_per_req"] for y in fw])
            a_hit = median([x["cpu_us_per_req"] for x in la])
            total = median([y["cpu_us_per_req"] for y in fw])
            row = {
                "streams": streams,
                "local": summarize(lo),
                "forwarded": summarize(fw),
                "throughput_cost": median([x["rps"] / y["rps"] for x, y in zip(lo, fw, strict=False)]),
                "p50_cost": median([y["p50_ms"] / x["p50_ms"] for x, y in zip(lo, fw, strict=False)]),
                "p99_cost": median([y["p99_ms"] / x["p99_ms"] for x, y in zip(lo, fw, strict=False)]),
                "cpu_cost": median([y["cpu_us_per_req"] / x["cpu_us_per_req"] for x, y in zip(lo, fw, strict=False)]),
                "forwards_per_get": median([y["forwards_per_get"] for y in fw]),
                "forwarder_cpu_us_per_req": a_fwd,
                "owner_cpu_us_per_req": median([y["b_cpu_us_per_req"] for y in fw]),
                "forwarder_local_hit_cpu_us": a_hit,
                "client_call_cpu_us": max(0.0, a_fwd - a_hit),
                "client_call_share": max(0.0, a_fwd - a_hit) / max(total, 1e-9),
            }
            log(
                f"  {streams} streams: local {row['local']['rps']:.0f}/s p50 {row['local']['p50_ms']:.3f} ms; "
                f"forwarded {row['forwarded']['rps']:.0f}/s p50 {row['forwarded']['p50_ms']:.3f} ms; "
                f"cost x{row['throughput_cost']:.2f} (p50 x{row['p50_cost']:.2f}, cpu x{row['cpu_cost']:.2f}); "
                f"client call {row['client_call_cpu_us']:.0f} us = {row['client_call_share']:.0%} of the CPU; "
                f"{row['forwards_per_get']:.2f} forwards/get"
            )
            rows.append(row)
        sa1, sb1 = group_stats(asock), group_stats(bsock)
        return {
            "rows": rows,
            "check": {
                "a_hot_items": sa1["hot_items"],
                "b_local_loads": sb1["local_loads"],
                "a_peer_errors": sa1["peer_errors"],
            },
        }
    finally:
        a.kill()
        b.kill()


FORWARD_SERVERS = ("engine", "grpcio")


def section(res: dict | None) -> list[str]:
    out, ran = opening("## 2. Forwarded Get vs local hit", res, "forwarded")
    if not ran:
        return out
    out += [
        "Two workers on one backend, `hot_cache_mirror = 0`. Local: the key sent to its owner. Forwarded: the same "
        "key sent to the other worker, which calls the owner. Cost = forwarded / local. Setups are "
        "server/forward/client: the client is the library the forwarder calls the owner with (the engine's own, "
        "or grpc.aio). The client call is that call's CPU per forwarded Get beyond what serving a local hit costs "
        "the forwarder.",
        "",
    ]
    rows = []
    for label, setup in res["setups"].items():
        if label.split("/")[0] not in FORWARD_SERVERS:
            continue  # a backend the bench no longer runs (an older results.json)
        for r in setup["rows"]:
            rows.append(
                [
                    label,
                    r["streams"],
                    num(r["local"]["rps"]),
                    num(r["forwarded"]["rps"]),
                    f"**{ratio(r['throughput_cost'])}**",
                    f"{num(r['local']['p50_ms'], 3)} / {num(r['forwarded']['p50_ms'], 3)}",
                    f"**{ratio(r['p50_cost'])}**",
                    f"{num(r['local']['cpu_us_per_req'])} / {num(r.get('forwarder_cpu_us_per_req'))} + "
                    f"{num(r.get('owner_cpu_us_per_req'))}",
                    f"{num(r['client_call_cpu_us'])} ({pct(r['client_call_share'])})",
                    f"{r['forwards_per_get']:.2f}",
                ]
            )
    out += [
        table(
            [
                "setup",
                "streams",
                "local Gets/s (abs.)",
                "forwarded Gets/s (abs.)",
                "throughput cost",
                "p50 ms local / fwd (abs.)",
                "p50 cost",
                "CPU µs per Get: local / forwarder + owner (abs.)",
                "client call µs (share)",
                "owner calls per Get",
            ],
            rows,
        ),
        "",
        "Forwarded Gets/s, engine default vs grpcio before: "
        + "; ".join(f"{r['streams']} stream(s) {ratio(r['rps'])}" for r in res["default_vs_grpcio_forwarded"]),
        "",
        "The engine's client against grpc.aio's, same engine backend: "
        + "; ".join(
            f"{r['streams']} stream(s): forwarded Gets/s {ratio(r['rps'])}, grpc.aio's call costs "
            f"{ratio(r['client_call_cpu'])} the engine's in forwarder CPU ({ratio(r['forwarder_cpu'])} all told)"
            for r in res["engine_client_vs_grpc_aio"]
        ),
        "",
    ]
    return out


def goal_rows(fw: dict) -> list[tuple[str, str, str, bool]]:
    if not fw.get("setups"):
        return []
    g = GOALS["forwarded_vs_before"]
    vs = fw["default_vs_grpcio_forwarded"]
    rows = [
        (
            "Forwarded Gets/s, engine default vs grpcio (stream) before",
            g.target(),
            "; ".join(f"{r['streams']} stream(s): {ratio(r['rps'])}" for r in vs),
            g.met(*(r["rps"] for r in vs)),
        )
    ]
    for r in fw["setups"][DEFAULT]["rows"]:
        g = GOALS[f"forwarded_engine_{r['streams']}"]
        vs = next(x for x in fw["engine_client_vs_grpc_aio"] if x["streams"] == r["streams"])
        rows.append(
            (
                f"Forwarded vs local hit on the engine's client, {r['streams']} stream(s)",
                g.target(),
                f"throughput {ratio(r['throughput_cost'])}, p50 {ratio(r['p50_cost'])} "
                f"(its call {num(r['client_call_cpu_us'])} µs, {pct(r['client_call_share'])} of the CPU; "
                f"grpc.aio's call costs {ratio(vs['client_call_cpu'])} that)",
                g.met(max(r["throughput_cost"], r["p50_cost"])),
            )
        )
    g = GOALS["forwarded"]
    if BEFORE in fw["setups"]:
        rws = fw["setups"][BEFORE]["rows"]
        worst = max(max(r["throughput_cost"], r["p50_cost"]) for r in rws)
        rows.append(
            (
                f"Forwarded vs local hit, {BEFORE}",
                g.target(),
                "; ".join(
                    f"{r['streams']} stream(s): throughput {ratio(r['throughput_cost'])}, "
                    f"p50 {ratio(r['p50_cost'])}"
                    f" (client call {pct(r['client_call_share'])} of the CPU)"
                    for r in rws
                ),
                g.met(worst),
            )
        )
    return rows
