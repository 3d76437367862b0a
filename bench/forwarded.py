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

import lib
from lib import GET_PATH, get_body, get_once, h2load

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
        lib.log(f"forwarded Get: {label}")
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
    ports = [lib.free_port(), lib.free_port()]
    peers = [f"{lib.HOST}:{p}" for p in ports]
    a, aport, asock = lib.start_worker(f"{tag}-a", port=ports[0], peers=peers, mirror=0.0, server=server, **knobs)
    b, bport, bsock = lib.start_worker(f"{tag}-b", port=ports[1], peers=peers, mirror=0.0, server=server, **knobs)
    try:
        key = lib.owned_key(peers[1], peers, 100, "fwd")
        mine = lib.owned_key(peers[0], peers, 100, "own")
        assert len(get_once(aport, key)) == 100  # B loads it, A forwards
        assert len(get_once(aport, mine)) == 100  # A's own key, for A's cost of a local hit
        body, own_body = get_body(key), get_body(mine)
        sa0, sb0 = lib.group_stats(asock), lib.group_stats(bsock)
        assert sb0["main_items"] == 1 and sa0["hot_items"] == 0 and sa0["peer_loads"] == 1, (sa0, sb0)
        rows = []
        guess: dict = {}
        expect = lib.get_response_bytes(100)

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
                return lib.per_request_cpu(r)

            def local():
                return hit("local", bport, body, b)

            def local_a():
                return hit("local_a", aport, own_body, a)

            def forwarded(streams=streams):
                before = lib.group_stats(bsock)["server_requests"]
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
                r["forwards_per_get"] = (lib.group_stats(bsock)["server_requests"] - before) / ok
                guess[("fwd", streams)] = r["rps"]
                return lib.per_request_cpu(r)

            local(), local_a(), forwarded()  # warm-up, sizes the runs
            runs = lib.interleave({"local": local, "local_a": local_a, "forwarded": forwarded}, cfg.rounds)
            lo, la, fw = runs["local"], runs["local_a"], runs["forwarded"]
            a_fwd = lib.median([y["a_cpu_us_per_req"] for y in fw])
            a_hit = lib.median([x["cpu_us_per_req"] for x in la])
            total = lib.median([y["cpu_us_per_req"] for y in fw])
            row = {
                "streams": streams,
                "local": lib.summarize(lo),
                "forwarded": lib.summarize(fw),
                "throughput_cost": lib.median([x["rps"] / y["rps"] for x, y in zip(lo, fw, strict=False)]),
                "p50_cost": lib.median([y["p50_ms"] / x["p50_ms"] for x, y in zip(lo, fw, strict=False)]),
                "p99_cost": lib.median([y["p99_ms"] / x["p99_ms"] for x, y in zip(lo, fw, strict=False)]),
                "cpu_cost": lib.median(
                    [y["cpu_us_per_req"] / x["cpu_us_per_req"] for x, y in zip(lo, fw, strict=False)]
                ),
                "forwards_per_get": lib.median([y["forwards_per_get"] for y in fw]),
                "forwarder_cpu_us_per_req": a_fwd,
                "owner_cpu_us_per_req": lib.median([y["b_cpu_us_per_req"] for y in fw]),
                "forwarder_local_hit_cpu_us": a_hit,
                "client_call_cpu_us": max(0.0, a_fwd - a_hit),
                "client_call_share": max(0.0, a_fwd - a_hit) / max(total, 1e-9),
            }
            lib.log(
                f"  {streams} streams: local {row['local']['rps']:.0f}/s p50 {row['local']['p50_ms']:.3f} ms; "
                f"forwarded {row['forwarded']['rps']:.0f}/s p50 {row['forwarded']['p50_ms']:.3f} ms; "
                f"cost x{row['throughput_cost']:.2f} (p50 x{row['p50_cost']:.2f}, cpu x{row['cpu_cost']:.2f}); "
                f"client call {row['client_call_cpu_us']:.0f} us = {row['client_call_share']:.0%} of the CPU; "
                f"{row['forwards_per_get']:.2f} forwards/get"
            )
            rows.append(row)
        sa1, sb1 = lib.group_stats(asock), lib.group_stats(bsock)
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
