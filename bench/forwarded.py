"""Benchmark 2: a Get sent to a non-owner (forwarded) against a local hit.

Two workers A and B share a ring, with hot_cache_mirror = 0 so A never
keeps a copy: every Get sent to A for a key B owns costs A one RPC to B.
The local case is the same key sent straight to B (a main-cache hit).

Cost ratios (forwarded / local): throughput (local rps / forwarded rps),
p50 latency, and CPU per request (A+B for forwarded, B for local). With
many streams A's singleflight joins concurrent Gets of the one hot key into
fewer calls to B; `forwards_per_get` reports how many.
"""

from __future__ import annotations

import lib
from lib import GET_PATH, get_body, get_once, h2load

STREAMS = (1, 16)


def run(cfg) -> dict:
    (a, aport, asock, aaddr), (b, bport, bsock, baddr) = lib.start_ring(["fwd-a", "fwd-b"], mirror=0.0)
    try:
        key = lib.owned_key(baddr, [aaddr, baddr], 100, "fwd")
        assert len(get_once(aport, key)) == 100  # B loads it, A forwards
        body = get_body(key)
        sa0, sb0 = lib.group_stats(asock), lib.group_stats(bsock)
        assert sb0["main_items"] == 1 and sa0["hot_items"] == 0 and sa0["peer_loads"] == 1, (sa0, sb0)
        rows = []
        guess: dict = {}
        totals = {"fwd_requests": 0}

        for streams in STREAMS:
            def local():
                n = int(min(200_000, max(200, guess.get(("local", streams), 3000) * cfg.seconds)))
                r = h2load(bport, GET_PATH, body, n=n, streams=streams, name=f"fwd-local-{streams}", watch=[b.pid],
                           expect_data=lib.get_response_bytes(100))
                guess[("local", streams)] = r["rps"]
                return lib.per_request_cpu(r)

            def forwarded():
                n = int(min(200_000, max(200, guess.get(("fwd", streams), 1500) * cfg.seconds)))
                before = lib.group_stats(bsock)["server_requests"]
                ca, cb = a.cpu(), b.cpu()
                r = h2load(aport, GET_PATH, body, n=n, streams=streams, name=f"fwd-fwd-{streams}",
                           watch=[a.pid, b.pid], expect_data=lib.get_response_bytes(100))
                ok = max(1, r["succeeded"])
                r["a_cpu_us_per_req"] = (a.cpu() - ca) / ok * 1e6  # the forwarder: server + client call
                r["b_cpu_us_per_req"] = (b.cpu() - cb) / ok * 1e6  # the owner: one server call per forward
                r["forwards_per_get"] = (lib.group_stats(bsock)["server_requests"] - before) / max(1, r["succeeded"])
                totals["fwd_requests"] += r["succeeded"]
                guess[("fwd", streams)] = r["rps"]
                return lib.per_request_cpu(r)

            lib.log(f"forwarded Get: {streams} streams")
            local(), forwarded()  # warm-up, sizes the runs
            runs = lib.interleave({"local": local, "forwarded": forwarded}, cfg.rounds)
            lo, fw = runs["local"], runs["forwarded"]
            row = {
                "streams": streams,
                "local": lib.summarize(lo),
                "forwarded": lib.summarize(fw),
                "throughput_cost": lib.median([x["rps"] / y["rps"] for x, y in zip(lo, fw)]),
                "p50_cost": lib.median([y["p50_ms"] / x["p50_ms"] for x, y in zip(lo, fw)]),
                "p99_cost": lib.median([y["p99_ms"] / x["p99_ms"] for x, y in zip(lo, fw)]),
                "cpu_cost": lib.median([y["cpu_us_per_req"] / x["cpu_us_per_req"] for x, y in zip(lo, fw)]),
                "forwards_per_get": lib.median([y["forwards_per_get"] for y in fw]),
                "forwarder_cpu_us_per_req": lib.median([y["a_cpu_us_per_req"] for y in fw]),
                "owner_cpu_us_per_req": lib.median([y["b_cpu_us_per_req"] for y in fw]),
            }
            lib.log(f"  local {row['local']['rps']:.0f}/s p50 {row['local']['p50_ms']:.3f} ms; forwarded "
                    f"{row['forwarded']['rps']:.0f}/s p50 {row['forwarded']['p50_ms']:.3f} ms; cost x{row['throughput_cost']:.2f} "
                    f"(p50 x{row['p50_cost']:.2f}, cpu x{row['cpu_cost']:.2f}, {row['forwards_per_get']:.2f} forwards/get)")
            rows.append(row)
        # What one peer call costs from Python: a grpc.aio client calling the
        # owner as the forwarder does, next to h2load calling it (1 stream).
        lib.log("forwarded Get: a grpc.aio client (as an application, or the forwarder, calls) to owner and non-owner")
        import json

        def pyclient(port: int, as_peer: bool) -> dict:
            # as_peer: marked forwarded, as the forwarder's own call to the
            # owner; else a plain application Get.
            proc = lib.Proc([lib.PY, str(lib.BENCH / "servers.py"), "pyclient", "--port", str(port), "--key", key,
                             "--n", "1500"] + (["--forwarded"] if as_peer else []), "fwd-pyclient")
            try:
                proc.popen.wait(120)
            finally:
                proc.kill()
            return json.loads(proc.log_path.read_text().strip().splitlines()[-1])

        runs = lib.interleave({
            "py_peer_call": lambda: pyclient(bport, True),
            "py_local": lambda: pyclient(bport, False),
            "py_forwarded": lambda: pyclient(aport, False),
            "h2load_local": lambda: h2load(bport, GET_PATH, body, n=1500, streams=1, name="fwd-h2load-owner",
                                           expect_data=lib.get_response_bytes(100)),
        }, cfg.rounds)
        client = {
            "pyclient_p50_ms": lib.median([x["p50_ms"] for x in runs["py_peer_call"]]),
            "pyclient_p99_ms": lib.median([x["p99_ms"] for x in runs["py_peer_call"]]),
            "pyclient_local_p50_ms": lib.median([x["p50_ms"] for x in runs["py_local"]]),
            "pyclient_forwarded_p50_ms": lib.median([x["p50_ms"] for x in runs["py_forwarded"]]),
            "h2load_p50_ms": lib.median([x["p50_ms"] for x in runs["h2load_local"]]),
            "pyclient_vs_h2load": lib.median([p["p50_ms"] / h["p50_ms"]
                                              for p, h in zip(runs["py_peer_call"], runs["h2load_local"])]),
            "python_client_p50_cost": lib.median([f["p50_ms"] / p["p50_ms"]
                                                  for p, f in zip(runs["py_local"], runs["py_forwarded"])]),
        }
        lib.log(f"  grpc.aio client p50 {client['pyclient_p50_ms']:.3f} ms for the peer call, "
                f"{client['pyclient_local_p50_ms']:.3f} ms as an application Get to the owner, "
                f"{client['pyclient_forwarded_p50_ms']:.3f} ms through the non-owner "
                f"(x{client['python_client_p50_cost']:.2f}); h2load p50 {client['h2load_p50_ms']:.3f} ms to the owner")
        sa1, sb1 = lib.group_stats(asock), lib.group_stats(bsock)
        return {
            "rows": rows,
            "peer_call": client,
            "check": {
                "a_hot_items": sa1["hot_items"],
                "a_main_items": sa1["main_items"],
                "b_local_loads": sb1["local_loads"],
                "a_peer_errors": sa1["peer_errors"],
            },
        }
    finally:
        a.kill()
        b.kill()
