"""Benchmark 4: miss storm. 1,000 concurrent Gets of 10 cold keys over 3
workers must cause exactly 10 origin loads; p99 latency against the
origin's own delay.

Three worker processes share a ring (default settings, hot cache on). The
origin sleeps d ms per load (the key names d). Ten h2load processes, one
per key, each open 100 concurrent streams to one of the workers (round
robin), so 1,000 Gets are in flight at once, spread over 3 workers and 10
keys. The h2load processes wait on a FIFO and are released together; the
spread of their first request start times is reported. Each storm uses
fresh keys. The same 1,000 Gets are then fired again at the now-warm keys:
that hit storm is the floor of these workers at this concurrency, so the
miss p99 minus d can be read against it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

from fmt import num, opening, ratio, table
from goals import Goal
from h2load import GET_PATH, get_body, get_response_bytes, h2load_command, parse_h2load
from processes import HOST, OUT, log, need
from rounds import median
from workers import get_once, group_stats, start_ring

GETS = 1000
KEYS = 10
DELAYS_MS = (10, 50, 200)


def storm(ports: list[int], keys: list[str], name: str) -> dict:
    per_key = GETS // len(keys)
    fifo = OUT / f"{name}.go"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    # Held open read-write, so the readers' opens never block and a reader
    # that opens late still finds its line waiting in the pipe.
    gate = os.open(fifo, os.O_RDWR)
    procs, logs, outs = [], [], []
    try:
        for i, key in enumerate(keys):
            body = get_body(key)
            reqlog = OUT / f"{name}-{i}.reqlog"
            reqlog.unlink(missing_ok=True)
            logs.append(reqlog)
            url = f"http://{HOST}:{ports[i % len(ports)]}{GET_PATH}"
            cmd = h2load_command(per_key, 2, per_key // 2, body, reqlog, url)
            outs.append(OUT / f"{name}-{i}.out")
            # Each waits for its line on the FIFO (sh reads a pipe one byte at a time).
            shell = f"read go < {shlex.quote(str(fifo))}; exec {shlex.join(cmd)} > {shlex.quote(str(outs[-1]))}"
            procs.append(
                subprocess.Popen(
                    ["sh", "-c", shell], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            )
        time.sleep(0.3)  # let the shells start and block in read
        os.write(gate, b"go\n" * len(keys))
        deadline = time.monotonic() + 60
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        os.close(gate)
        fifo.unlink(missing_ok=True)
    starts, lat, failed = [], [], 0
    for reqlog in logs:
        try:
            lines = reqlog.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            f = line.split("\t")
            if len(f) < 3:
                continue
            if f[1] != "200":
                failed += 1
                continue
            starts.append(int(f[0]))
            lat.append(int(f[2]) / 1000)
    # h2load counts a gRPC error (HTTP 200, status in trailers) as a success:
    # count the replies that carried no value from the DATA bytes.
    short = 0
    for out, _log in zip(outs, logs, strict=True):
        try:
            res = parse_h2load(out.read_text())
        except OSError:
            continue
        if res.get("succeeded"):
            short += max(0, round(res["succeeded"] - res.get("data_bytes", 0) / get_response_bytes(100)))
    failed += short
    lat.sort()
    n = len(lat)
    pick = lambda p: lat[min(n - 1, int(p / 100 * n))] if n else float("nan")  # noqa: E731
    return {
        "ok": n,
        "failed": failed + (GETS - n - failed if n + failed < GETS else 0),
        "p50_ms": pick(50),
        "p90_ms": pick(90),
        "p99_ms": pick(99),
        "max_ms": lat[-1] if lat else float("nan"),
        "start_spread_ms": (max(starts) - min(starts)) / 1000 if starts else float("nan"),
    }


def run(cfg) -> dict:
    need("h2load", "nghttp2-client")
    nodes = start_ring(["storm-0", "storm-1", "storm-2"])
    ports = [port for _, port, _, _ in nodes]
    socks = [sock for _, _, sock, _ in nodes]
    try:
        # Connections and code paths warm: one Get through every worker.
        for port in ports:
            get_once(port, "v100-warm")
        rows = []
        for delay in DELAYS_MS:
            log(
                f"miss storm: {GETS} Gets of {KEYS} cold keys over 3 workers, origin delay {delay} ms "
                f"({cfg.rounds} storms)"
            )
            rounds = []
            for r in range(cfg.rounds):
                keys = [f"v100-d{delay}-storm{r}k{i}" for i in range(KEYS)]
                before = [group_stats(s) for s in socks]
                miss = storm(ports, keys, f"storm-miss-{delay}")
                after = [group_stats(s) for s in socks]
                hit = storm(ports, keys, f"storm-hit-{delay}")
                rounds.append(
                    {
                        "origin_loads": sum(
                            a["local_loads"] - b["local_loads"] for a, b in zip(after, before, strict=True)
                        ),
                        "gets_counted": sum(a["gets"] - b["gets"] for a, b in zip(after, before, strict=True)),
                        "peer_loads": sum(
                            a["peer_loads"] - b["peer_loads"] for a, b in zip(after, before, strict=True)
                        ),
                        "peer_errors": sum(
                            a["peer_errors"] - b["peer_errors"] for a, b in zip(after, before, strict=True)
                        ),
                        "miss": miss,
                        "hit": hit,
                    }
                )
            med = lambda f, rounds=rounds: median([f(x) for x in rounds])  # noqa: E731
            row = {
                "delay_ms": delay,
                "origin_loads": [x["origin_loads"] for x in rounds],
                "failed": sum(x["miss"]["failed"] + x["hit"]["failed"] for x in rounds),
                "miss_p50_ms": med(lambda x: x["miss"]["p50_ms"]),
                "miss_p99_ms": med(lambda x: x["miss"]["p99_ms"]),
                "hit_p50_ms": med(lambda x: x["hit"]["p50_ms"]),
                "hit_p99_ms": med(lambda x: x["hit"]["p99_ms"]),
                "start_spread_ms": med(lambda x: x["miss"]["start_spread_ms"]),
                "rounds": rounds,
            }
            row["p99_over_delay"] = row["miss_p99_ms"] / delay
            row["p99_minus_delay_ms"] = row["miss_p99_ms"] - delay
            log(
                f"  origin loads {row['origin_loads']}; miss p50 {row['miss_p50_ms']:.1f} p99 "
                f"{row['miss_p99_ms']:.1f} ms (x{row['p99_over_delay']:.2f} the delay, start spread "
                f"{row['start_spread_ms']:.1f} ms); hit storm p99 {row['hit_p99_ms']:.1f} ms; failed {row['failed']}"
            )
            rows.append(row)
        return {"rows": rows, "gets": GETS, "keys": KEYS, "workers": 3}
    finally:
        for proc, *_ in nodes:
            proc.kill()


def section(res: dict | None) -> list[str]:
    out, ran = opening("## 4. Miss storm", res, "storm")
    if not ran:
        return out
    out += [
        f"{res['gets']} concurrent Gets of {res['keys']} cold keys over {res['workers']} workers, then the "
        "same Gets on the warm keys. Medians of the storms.",
        "",
    ]
    rows = []
    for r in res["rows"]:
        rows.append(
            [
                r["delay_ms"],
                r["origin_loads"],
                r["failed"],
                num(r["miss_p50_ms"], 1),
                f"**{num(r['miss_p99_ms'], 1)}**",
                ratio(r["p99_over_delay"]),
                num(r["p99_minus_delay_ms"], 1),
                num(r["hit_p99_ms"], 1),
                num(r["start_spread_ms"], 1),
            ]
        )
    out += [
        table(
            [
                "origin delay ms",
                "origin loads per storm",
                "failed Gets",
                "miss p50 ms (abs.)",
                "miss p99 ms (abs.)",
                "p99 / delay",
                "p99 − delay ms",
                "warm-storm p99 ms (abs.)",
                "start spread ms",
            ],
            rows,
        ),
        "",
        "![miss storm](storm.png)",
        "",
    ]
    return out


def plot(st: dict, plt):
    if not st.get("rows"):
        return None
    fig, a = plt.subplots(figsize=(6, 4))
    d = [r["delay_ms"] for r in st["rows"]]
    a.plot(d, [r["miss_p99_ms"] for r in st["rows"]], "s-", label="miss storm p99")
    a.plot(d, [r["miss_p50_ms"] for r in st["rows"]], "o-", alpha=0.6, label="miss storm p50")
    a.plot(d, [r["hit_p99_ms"] for r in st["rows"]], "^:", label="hit storm p99 (same 1,000 Gets, warm)")
    a.plot(d, d, "k--", alpha=0.5, label="origin delay")
    a.set(
        xscale="log",
        xlabel="origin delay, ms",
        ylabel="latency, ms",
        title=f"Miss storm: {st['gets']} Gets of {st['keys']} cold keys, {st['workers']} workers",
    )
    a.set_xticks(d, [str(x) for x in d])
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    return fig


FIGURES = {"storm.png": plot}


def goal_rows(st: dict) -> list[tuple[str, str, str, bool | None]]:
    if not st.get("rows"):
        return []
    g = Goal("=", st["keys"], "")  # one origin load per key
    loads = [x for r in st["rows"] for x in r["origin_loads"]]
    return [
        (
            f"Miss storm: origin loads for {st['gets']} Gets of {st['keys']} cold keys",
            g.target(),
            ", ".join(f"{r['origin_loads']}" for r in st["rows"]) + " (per storm)",
            g.met(*loads),
        ),
        (
            "Miss storm p99 vs origin delay",
            "report",
            "; ".join(
                f"{r['delay_ms']} ms: p99 {num(r['miss_p99_ms'], 0)} ms ({ratio(r['p99_over_delay'])}; "
                f"warm floor {num(r['hit_p99_ms'], 0)} ms)"
                for r in st["rows"]
            ),
            None,
        ),
    ]
