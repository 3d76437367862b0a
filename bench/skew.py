"""Skewed load (issue 24): Zipf keys from zipfload (grpc-go, the seed's
proto) against 3 workers, round robin vs owner-routed, at s = 0.9, 1.1 and
uniform; then a cold start with a 1 s origin and 2 s deadlines: origin
loads vs distinct keys requested (duplicates: the same key loaded twice in
the cluster), and the Gets that failed.

Each cell gets fresh workers (so hot caches and promotion start cold) with
a cache of 16 MiB: the hot budget (2 MiB) is a fifth of the 100,000-key
data set. Worker CPU comes from /proc; Gets, forwards and hot hits from
each worker's stats. The ratio reported is round-robin CPU per Get over
owner-routed CPU per Get at the same s, measured in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import lib

KEYS = 100_000
CONC = 64
CELLS = (("1.1", False), ("0.9", False), ("1.1", True))  # (s, uniform)
ZIPFLOAD = Path(os.environ.get("SEEDGO_BIN", "/tmp/seedgo-bin")) / "zipfload"


def zipfload(addrs: list[str], mode: str, s: str, uniform: bool, seconds: float, **kw) -> dict:
    cmd = [str(ZIPFLOAD), "-addrs", ",".join(addrs), "-group", "bench", "-mode", mode, "-s", s, "-json"]
    cmd += ["-keys", str(kw.get("keys", KEYS)), "-conc", str(kw.get("conc", CONC)), "-duration", f"{seconds}s"]
    cmd += ["-prefix", kw.get("prefix", "v100-k"), "-timeout", kw.get("timeout", "2s")]
    if uniform:
        cmd.append("-uniform")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("JSON {")), None)
    if line is None:
        raise RuntimeError(f"zipfload printed no JSON: {out.stderr[-500:]}")
    return json.loads(line[len("JSON ") :])


def cell(mode: str, s: str, uniform: bool, seconds: float) -> dict:
    nodes = lib.start_ring([f"skew-{i}" for i in range(3)], cache_bytes="16MiB")
    procs = [n[0] for n in nodes]
    socks = [n[2] for n in nodes]
    addrs = [n[3] for n in nodes]
    try:
        cpu0 = [p.cpu() for p in procs]
        load = zipfload(addrs, mode, s, uniform, seconds)
        cpu = [p.cpu() - c for p, c in zip(procs, cpu0, strict=True)]
        stats = [lib.group_stats(x) for x in socks]
    finally:
        for p in procs:
            p.kill()
    gets = [x["gets"] - x["server_requests"] for x in stats]  # Gets from the load generator
    total = max(1, sum(gets))
    return {
        "mode": mode,
        "s": "uniform" if uniform else s,
        "gets": sum(gets),
        "gets_per_worker": gets,
        "cpu_per_worker_s": cpu,
        "cpu_us_per_get": sum(cpu) / total * 1e6,
        "forwarded_share": sum(x["peer_loads"] + x["peer_errors"] for x in stats) / total,
        "hot_hit_share": sum(x["hot_hits"] for x in stats) / total,
        "busiest_over_mean": max(gets) / (total / len(gets)),
        "zipfload": load,
    }


def cold_start(seconds: float) -> dict:
    """A 1 s origin, 2 s client deadlines: origin loads vs distinct keys requested."""
    nodes = lib.start_ring([f"skew-cold-{i}" for i in range(3)], cache_bytes="16MiB")
    try:
        load = zipfload(
            [n[3] for n in nodes], "rr", "1.1", False, seconds, keys=1000, prefix="v100-d1000-k", timeout="2s"
        )
        stats = [lib.group_stats(n[2]) for n in nodes]
    finally:
        for n in nodes:
            n[0].kill()
    loads = sum(x["local_loads"] for x in stats)
    distinct = load["distinct_keys"]
    return {
        "origin_loads": loads,
        "distinct_keys": distinct,
        "duplicates": loads - distinct,
        "client_errors": load["errors"],  # Gets that missed their 2 s deadline (or failed)
        "zipfload": load,
    }


def run(cfg) -> dict:
    if not ZIPFLOAD.exists():
        raise RuntimeError(f"{ZIPFLOAD} missing: run `bash /work/shared/seedgo/build.sh` (or set SEEDGO_BIN)")
    seconds = max(2.0, cfg.seconds * 2)
    rows = []
    for s, uniform in CELLS:
        pair = {}
        for mode in ("owner", "rr"):
            lib.log(f"skew: {mode} s={'uniform' if uniform else s}, {seconds:.0f} s")
            pair[mode] = cell(mode, s, uniform, seconds)
            c = pair[mode]
            lib.log(
                f"  {c['gets']} Gets, {c['cpu_us_per_get']:.0f} us CPU/Get, forwarded {c['forwarded_share']:.1%}, "
                f"hot hits {c['hot_hit_share']:.1%}, busiest/mean {c['busiest_over_mean']:.2f}"
            )
        ratio = pair["rr"]["cpu_us_per_get"] / pair["owner"]["cpu_us_per_get"]
        lib.log(f"  round robin / owner-routed CPU per Get: {ratio:.2f}x")
        rows.append({"s": pair["rr"]["s"], "rr_over_owner_cpu": ratio, **pair})
    lib.log("skew: cold start, 1 s origin, 2 s deadlines")
    cold = cold_start(max(3.0, seconds))
    lib.log(
        f"  origin loads {cold['origin_loads']}, distinct keys {cold['distinct_keys']}, "
        f"duplicate loads {cold['duplicates']}, client errors {cold['client_errors']}"
    )
    return {"rows": rows, "cold_start": cold, "workers": 3, "keys": KEYS, "conc": CONC}
