"""h2load, the HTTP/2 load generator every Get benchmark drives: gRPC
request bodies, one bounded run with its latency percentiles and CPU, and
the parsing of its output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from processes import HOST, OUT, box_busy_s, cpu_seconds

GET_PATH = "/groupcachepb.GroupCache/Get"
GET_MANY_PATH = "/appliance.cache.Cache/GetMany"


def grpc_body(message, name: str) -> Path:
    """The 5-byte gRPC frame (uncompressed flag + length) around a message, in a file."""
    data = message.SerializeToString()
    path = OUT / f"body-{name}.bin"
    path.write_bytes(b"\x00" + len(data).to_bytes(4, "big") + data)
    return path


def get_body(key: str, group: str = "bench") -> Path:
    from appliance.pb import groupcache_pb2

    return grpc_body(groupcache_pb2.GetRequest(group=group, key=key), f"get-{group}-{key}")


def split_streams(streams: int) -> tuple[int, int]:
    """(connections, streams per connection) for a total concurrency."""
    conns = 1 if streams <= 4 else 4
    return conns, max(1, streams // conns)


def _pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def get_response_bytes(size: int) -> int:
    """DATA bytes of one gRPC reply carrying a GetResponse with `size` bytes."""
    if not size:
        return 5
    n, varint = size, 1
    while n >= 0x80:
        n >>= 7
        varint += 1
    return 5 + 1 + varint + size


def h2load_command(n: int, conns: int, streams: int, body: Path, logfile: Path, url: str) -> list[str]:
    """h2load sending n gRPC calls of `body` on conns connections x streams,
    one thread, each request logged to `logfile`."""
    return [
        "h2load",
        "-n",
        str(n),
        "-c",
        str(conns),
        "-m",
        str(streams),
        "-t",
        "1",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--log-file",
        str(logfile),
        url,
    ]


def h2load(
    port: int,
    path: str,
    body: Path,
    *,
    n: int,
    streams: int = 8,
    name: str = "h2load",
    timeout: float = 60,
    watch: list[int] = (),
    conns: int | None = None,
    prefix: list[str] = (),
    expect_data: int | None = None,
    scheme: str = "http",
) -> dict:
    """One bounded h2load run (n requests, killed after `timeout` s).

    Returns rate, latency percentiles (from h2load's per-request log), the
    client's CPU seconds (its rusage) and the CPU seconds of `watch` pids.
    h2load counts HTTP 200 as success, and a gRPC error is an HTTP 200 with
    the status in trailers and no message: `expect_data` (DATA bytes of one
    good reply) turns short replies into an error."""
    c, m = split_streams(streams) if conns is None else (conns, max(1, streams // conns))
    logfile = OUT / f"{name}.reqlog"
    logfile.unlink(missing_ok=True)  # h2load appends
    cmd = [*prefix, *h2load_command(n, c, m, body, logfile, f"{scheme}://{HOST}:{port}{path}")]
    before = {pid: cpu_seconds(pid) for pid in watch}
    busy0 = box_busy_s()
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = t0 + timeout
    status, usage = 0, None
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.kill(p.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(p.pid, 0)
            break
        time.sleep(0.01)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    after = {pid: cpu_seconds(pid) for pid in watch}
    busy = box_busy_s() - busy0
    out = p.stdout.read().decode(errors="replace")
    p.stdout.close()
    (OUT / f"{name}.out").write_text(out)
    res = parse_h2load(out)
    lat = []
    try:
        with open(logfile) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1] == "200":
                    lat.append(int(parts[2]) / 1000.0)
    except OSError:
        pass
    lat.sort()
    res.update(
        streams=c * m,
        conns=c,
        n=n,
        wall_s=wall,
        exit=p.returncode,
        p50_ms=_pct(lat, 50),
        p90_ms=_pct(lat, 90),
        p99_ms=_pct(lat, 99),
        max_ms=lat[-1] if lat else float("nan"),
        client_cpu_s=usage.ru_utime + usage.ru_stime if usage else float("nan"),
        server_cpu_s=sum(after[pid] - before[pid] for pid in watch),
    )
    # CPU the rest of the box used meanwhile (other people's work on a shared
    # box); only meaningful when `watch` holds every server of this run.
    res["other_cpu_cores"] = max(0.0, busy - res["client_cpu_s"] - res["server_cpu_s"]) / max(wall, 1e-9)
    if res.get("elapsed_s"):
        res["client_cpu_share"] = res["client_cpu_s"] / max(1e-9, res["client_cpu_s"] + res["server_cpu_s"])
    if p.returncode != 0 or res.get("succeeded", 0) == 0:
        raise RuntimeError(f"h2load failed (exit {p.returncode}):\n{out[-2000:]}")
    if expect_data is not None and "data_bytes" in res:
        per = res["data_bytes"] / res["succeeded"]
        res["data_bytes_per_reply"] = per
        if per < expect_data * 0.999:
            raise RuntimeError(
                f"{name}: replies carry {per:.1f} DATA bytes, expected {expect_data}: the server "
                f"answered with gRPC errors (see {OUT / (name + '.out')} and the server's log)"
            )
    return res


def parse_h2load(out: str) -> dict:
    res: dict = {}
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    if m:
        secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        res["elapsed_s"] = secs
        res["rps"] = float(m.group(3))
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
        r"(\d+) timeout",
        out,
    )
    if m:
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        res.update({k: int(v) for k, v in zip(keys, m.groups(), strict=False)})
    m = re.search(r"traffic: .*?\((\d+)\) total", out)
    if m:
        res["traffic_bytes"] = int(m.group(1))
    m = re.search(r"traffic: .*\((\d+)\) data", out)
    if m:
        res["data_bytes"] = int(m.group(1))
    return res
