"""memcached, the baseline cache (1 thread), and memcaslap
(libmemcached-tools), its load generator."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

from processes import HOST, OUT, Proc, box_busy_s, cpu_seconds, free_port, need, wait_port


def start_memcached(name: str = "memcached", *, memory_mb: int = 64, max_item: str = "") -> tuple[Proc, int]:
    """memcached, 1 thread, on a free port (a baseline: hot_get, getmany,
    clients). `max_item` is its -I (largest item, default 1m)."""
    port = free_port()
    cmd = [
        need("memcached", "memcached"),
        "-l",
        HOST,
        "-p",
        str(port),
        "-U",
        "0",
        "-t",
        "1",
        "-m",
        str(memory_mb),
        "-c",
        "1024",
    ]
    if max_item:
        cmd += ["-I", max_item]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    proc = Proc(cmd, name)
    wait_port(port, 10, proc)
    return proc, port


def memcached_stats(port: int) -> dict[str, int]:
    """memcached's integer counters (`stats`: cmd_get, get_misses, cmd_set, ...)."""
    with socket.create_connection((HOST, port), 5) as s:
        s.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("memcached closed the stats connection")
            data += chunk
    out = {}
    for line in data.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT" and parts[2].isdigit():
            out[parts[1]] = int(parts[2])
    return out


# memcaslap's key window is per concurrency and a multiple of 1,024 keys
# ("-w 1k" at least): it first sets that many keys per connection, then gets.
MEMCASLAP_WINDOW = 1024


def memcaslap_binary() -> str:
    for name in ("memcaslap", "memaslap"):  # bookworm's libmemcached-tools ships memcaslap
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("memcaslap not found: install the Debian package libmemcached-tools (make -C bench deps)")


def memcaslap_command(
    port: int, secs: int, *, value_size: int, concurrency: int, conn_sock: int, division: int, name: str
) -> list[str]:
    """memcaslap, 1 thread, gets only (16-byte keys, `value_size`-byte
    values): it first sets its window (concurrency x 1k keys), then every
    get is a hit. `concurrency` connections (x `conn_sock`), one request in
    flight on each; `division` > 1 makes each request a multi-get."""
    cfg = OUT / f"{name}.cfg"
    cfg.write_text(f"key\n16 16 1\nvalue\n{value_size} {value_size} 1\ncmd\n0 0.0\n1 1.0\n")
    cmd = [
        memcaslap_binary(),
        "-s",
        f"{HOST}:{port}",
        "-T",
        "1",
        "-c",
        str(concurrency),
        "-n",
        str(conn_sock),
        "-w",
        f"{MEMCASLAP_WINDOW // 1024}k",
        "-t",
        f"{secs}s",
        "-F",
        str(cfg),
    ]
    if division > 1:
        cmd += ["-d", str(division)]  # multi-get of `division` keys per request
    return cmd


def memcaslap(
    port: int,
    seconds: float,
    watch: list[int],
    division: int = 1,
    *,
    value_size: int = 100,
    concurrency: int = 16,
    conn_sock: int = 1,
    name: str = "memcaslap",
) -> dict:
    """One memcaslap run of `seconds` (whole seconds, at least 1): its own
    count of gets over its run time (the window's preload included), and the
    CPU seconds of `watch` (the memcached pids) over the whole run."""
    secs = max(1, int(round(seconds)))
    cmd = memcaslap_command(
        port,
        secs,
        value_size=value_size,
        concurrency=concurrency,
        conn_sock=conn_sock,
        division=division,
        name=name,
    )
    before = {pid: cpu_seconds(pid) for pid in watch}
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        out, _ = p.communicate(timeout=secs * 5 + 20)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
    text = out.decode(errors="replace")
    (OUT / f"{name}.out").write_text(text)
    server_cpu = sum(cpu_seconds(pid) - before[pid] for pid in watch)
    gets = int(re.search(r"cmd_get: (\d+)", text).group(1))
    misses = int(re.search(r"get_misses: (\d+)", text).group(1))
    run_time = float(re.search(r"Run time: ([\d.]+)s", text).group(1))
    return {
        "gets": gets,
        "get_misses": misses,
        "run_time_s": run_time,
        "rps": gets / run_time,
        "wall_s": time.monotonic() - t0,
        "server_cpu_s": server_cpu,
        "cpu_us_per_key": server_cpu / max(1, gets) * 1e6,
    }


def memcaslap_steady(
    port: int,
    seconds: float,
    server: Proc,
    *,
    value_size: int,
    concurrency: int,
    conn_sock: int = 1,
    name: str = "memcaslap",
    preload_timeout: float = 60.0,
) -> dict:
    """memcaslap's gets in their steady state, measured at the server: once
    memcached has seen the window's preload (concurrency x 1k sets), its own
    counters (`stats`: cmd_get, get_misses) and its CPU (/proc/PID/stat) over
    `seconds`; then memcaslap is stopped. Gets/s and CPU per get thus leave
    the preload out, as h2load's figures leave out the key's first load."""
    preload = concurrency * MEMCASLAP_WINDOW  # the window is per concurrency, whatever its sockets
    secs = int(seconds + preload_timeout) + 5  # an upper bound: stopped once measured
    cmd = memcaslap_command(
        port, secs, value_size=value_size, concurrency=concurrency, conn_sock=conn_sock, division=1, name=name
    )
    s0 = memcached_stats(port)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + preload_timeout
        while memcached_stats(port)["cmd_set"] - s0["cmd_set"] < preload:
            if p.poll() is not None:
                raise RuntimeError(f"{name}: memcaslap exited during its preload (see {OUT / (name + '.out')})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: memcaslap's preload of {preload} keys took over {preload_timeout} s")
            time.sleep(0.02)
        busy0, t0 = box_busy_s(), time.monotonic()
        a, cpu0, client0 = memcached_stats(port), server.cpu(), cpu_seconds(p.pid)
        time.sleep(seconds)
        cpu1, client1 = server.cpu(), cpu_seconds(p.pid)
        b = memcached_stats(port)
        wall, busy = time.monotonic() - t0, box_busy_s() - busy0
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        (OUT / f"{name}.out").write_text(out.decode(errors="replace"))
    gets = b["cmd_get"] - a["cmd_get"]
    if gets <= 0:
        raise RuntimeError(f"{name}: memcached served no gets while measured")
    server_cpu, client_cpu = cpu1 - cpu0, client1 - client0
    return {
        "succeeded": gets,
        "get_misses": b["get_misses"] - a["get_misses"],
        "sets_during": b["cmd_set"] - a["cmd_set"],
        "preload_keys": preload,
        "wall_s": wall,
        "rps": gets / wall,
        "server_cpu_s": server_cpu,
        "cpu_us_per_req": server_cpu / gets * 1e6,
        "client_cpu_s": client_cpu,
        "client_cpu_share": client_cpu / max(1e-9, client_cpu + server_cpu),
        "other_cpu_cores": max(0.0, busy - client_cpu - server_cpu) / max(wall, 1e-9),
    }
