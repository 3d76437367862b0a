"""Profile: where a worker's time goes while h2load drives hot Gets.

py-spy samples the worker process (all threads, native frames included)
while h2load runs; the raw stacks are classified:

- waiting: the thread is parked (epoll_wait, futex): not CPU;
- system calls: the leaf is a socket or wakeup system call (sendmsg, the
  write to the eventfd grpc uses to wake the loop, recv, getpid, ...);
- grpc core: the leaf is inside grpc's Cython/C core (cygrpc);
- protobuf: the leaf is in the upb message module;
- the engine: the leaf is in the Rust engine's module (appliance_engine);
- else by the innermost Python frame: product code (appliance/), grpc's
  Python layer (grpc/aio), the asyncio event loop, or other.
"Product inclusive" counts every sample with an appliance/ frame anywhere
on the stack, including the grpc and protobuf work the product calls.

The workers serve on the default backend (workers.default_server(): the engine
where it is built, else grpcio), recorded as `server`.

Two targets: the hot-Get worker (100 B main-cache hits, 32 streams), and
the forwarding node of the forwarded-Get bench (a non-owner with the hot
cache off, 1 stream, so every Get costs it one call to the owner). A
flame graph of the worker goes to bench/out/profile-worker.svg.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from fmt import num, opening, pct, size_label, table
from h2load import GET_PATH, get_body, get_response_bytes, h2load
from processes import OUT, PY, cpu_seconds_of, log, wait_file
from rounds import per_request_cpu
from workers import default_server, get_once, owned_key, start_echo, start_ring, start_worker, value_key

SECONDS = 4
RATE = 200
WAIT = (
    "epoll_wait",
    "epoll_pwait",
    "poll (",
    "select (",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "futex",
    "sem_wait",
    "sem_timedwait",
    "nanosleep",
    "clock_nanosleep",
    "__GI___poll",
    "pthread_cond_clockwait",
    "syscall (",  # futex(2) through syscall(3): a parked Rust or grpc thread
)
SYSCALLS = (
    "sendmsg",
    "recvmsg",
    "write (",
    "read (",
    "eventfd_write",
    "eventfd_read",
    "recv (",
    "send (",
    "writev",
    "readv",
    "getpid",
    "__libc_sendmsg",
    "__libc_recvmsg",
    "__libc_write",
    "madvise",
    "munmap",
    "mmap",
)
PRODUCT = re.compile(r"\((?:[^()]*/)?appliance/[^()]*\)")


def py_spy() -> str:
    return str(Path(PY).parent / "py-spy")


def record(pid: int, out: Path, fmt: str, native: bool, seconds: float) -> subprocess.Popen:
    cmd = [py_spy(), "record", "--pid", str(pid), "-d", str(seconds), "-r", str(RATE), "-o", str(out), "--format", fmt]
    # --native needs the process paused for each sample (py-spy's default);
    # the Python-only flame graph can sample without pausing.
    cmd.append("--native" if native else "--nonblocking")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


PY_FRAME = re.compile(r"\(([^()]*\.py):\d+\)$")


def _python_file(frame: str) -> str | None:
    m = PY_FRAME.search(frame)
    return m.group(1) if m else None


def classify(raw: Path) -> dict:
    """Shares of the busy samples: by leaf for native code and system calls,
    else by the innermost Python frame's file."""
    cats, leaves, product_frames, threads = Counter(), Counter(), Counter(), Counter()
    total = product_incl = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        if any(w in leaf for w in WAIT):
            cats["waiting (parked)"] += n
            continue
        threads[_thread_of(frames)] += n
        prod = [f for f in frames if PRODUCT.search(f)]
        if prod:
            product_incl += n
        py = [f for f in frames if _python_file(f)]
        inner = _python_file(py[-1]) if py else ""
        if "sched_yield" in leaf:
            cat = "spin-wait (sched_yield)"
        elif "appliance_engine" in leaf:
            cat = "the engine (Rust, on a Python thread)"
        elif any(x in leaf for x in SYSCALLS):
            cat = "system calls (socket I/O, wakeups)"
        elif "cygrpc" in leaf:
            cat = "grpc core (Cython/C, native)"
        elif "_message" in leaf or "upb" in leaf.lower():
            cat = "protobuf (upb)"
        elif "gc_collect" in leaf:
            cat = "garbage collector"
        elif PRODUCT.search(py[-1] if py else ""):
            cat = "product code (appliance/, own frames)"
            product_frames[_short(py[-1])] += n
        elif "grpc/" in inner:
            cat = "grpc Python layer (grpc/aio)"
        elif "asyncio/" in inner:
            cat = "asyncio event loop"
        else:
            cat = "interpreter / other"
        cats[cat] += n
        leaves[_short(leaf)] += n
    busy = total - cats["waiting (parked)"]
    share = (lambda v: v / busy) if busy else (lambda v: None)  # noqa: E731
    return {
        "samples": total,
        "busy_samples": busy,
        "categories": {
            k: {"samples": v, "share_of_busy": None if k.startswith("waiting") else share(v)}
            for k, v in cats.most_common()
        },
        "product_inclusive_share": share(product_incl),
        "threads": {k: share(v) for k, v in threads.most_common()},
        "top_leaves": [(k, share(v)) for k, v in leaves.most_common(12)],
        "top_product_frames": [(k, share(v)) for k, v in product_frames.most_common(10)],
    }


def _thread_of(frames: list[str]) -> str:
    if any("_receive" in f and "fronts/grpc_engine/" in f for f in frames):
        return "engine receiving thread"
    if any("Thread._bootstrap" in f for f in frames):
        return "other Python thread (grpc poller, executor)"
    return "event loop thread"


def thread_cpu(pid: int, run) -> dict:
    """CPU seconds of each thread of `pid` while run() runs, by thread name
    (py-spy sees only Python threads; the Rust I/O threads show here)."""
    import os

    def snap() -> dict:
        out = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                out[(tid, name)] = cpu_seconds_of(f"/proc/{pid}/task/{tid}/stat")
            except OSError:
                pass
        return out

    a = snap()
    t0 = time.monotonic()
    run()
    wall = time.monotonic() - t0
    b = snap()
    by_name: dict = {}
    for (tid, name), v in b.items():
        by_name[name] = by_name.get(name, 0.0) + v - a.get((tid, name), 0.0)
    return {
        "wall_s": wall,
        "cores_by_thread": {k: v / wall for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]) if v > 0},
    }


def _short(frame: str) -> str:
    frame = re.sub(r"0x[0-9a-f]+ \(([^)]*/)?([^/)]+)\)", r"<native> (\2)", frame)
    return re.sub(r"\(/[^)]*/(site-packages|lib/python3\.\d+)/", "(", frame)


class _Load:
    """h2load driving hot Gets at `pid` from a thread, for a sampler to
    watch: started on entry (half a second to get going), joined on exit."""

    def __init__(self, name: str, pid: int, port: int, body: Path, streams: int, rate_guess: float) -> None:
        self.result: dict = {}
        n = int(rate_guess * (SECONDS + 3))
        kwargs = dict(n=n, streams=streams, name=name, watch=[pid], timeout=SECONDS * 6 + 30)
        self._thread = threading.Thread(
            target=lambda: self.result.update(
                h2load(port, GET_PATH, body, expect_data=get_response_bytes(100), **kwargs)
            )
        )

    def __enter__(self) -> _Load:
        self._thread.start()
        time.sleep(0.5)
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def __exit__(self, *exc) -> None:
        self._thread.join()


def profile_target(
    name: str, pid: int, port: int, body: Path, streams: int, rate_guess: float, svg: Path | None = None
) -> dict:
    raw = OUT / f"profile-{name}.txt"
    with _Load(f"profile-{name}", pid, port, body, streams, rate_guess) as load:
        spy = record(pid, raw, "raw", True, SECONDS)
        out, _ = spy.communicate(timeout=SECONDS * 5 + 30)
        if svg is not None and load.running():
            spy2 = record(pid, svg, "flamegraph", False, 2)
            spy2.communicate(timeout=60)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {out.decode(errors='replace')[-1000:]}")
    res = classify(raw)
    res["load"] = {k: load.result.get(k) for k in ("rps", "p50_ms", "succeeded")}
    return res


def syscalls_per_get(pid: int, port: int, body: Path, name: str, requests: int = 3000) -> dict | None:
    """strace -c -f on the server while h2load sends `requests` Gets: system
    calls per Get, by name (the counts, not the times, which strace skews)."""
    import os
    import shutil
    import signal

    if not shutil.which("strace"):
        return None
    out = OUT / f"strace-{name}.txt"
    # -p names one thread: every existing one is named (the engine's I/O
    # thread does a worker's socket work); -f follows those started later.
    threads = [arg for tid in sorted(os.listdir(f"/proc/{pid}/task")) for arg in ("-p", tid)]
    st = subprocess.Popen(
        ["strace", "-c", "-f", *threads, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(1.0)  # attached to every thread
        r = h2load(
            port,
            GET_PATH,
            body,
            n=requests,
            streams=32,
            name=f"strace-{name}",
            timeout=120,
            expect_data=get_response_bytes(100),
        )
        time.sleep(0.2)
    finally:
        os.kill(st.pid, signal.SIGINT)
        try:
            st.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(st.pid, signal.SIGKILL)
            st.wait()
    calls: dict[str, float] = {}
    for line in out.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            calls[f[-1]] = int(f[3]) / max(1, r["succeeded"])
    return {"per_get": dict(sorted(calls.items(), key=lambda kv: -kv[1])), "total_per_get": sum(calls.values())}


# perf's DSOs, by what they are (the first that matches).
PERF_DSOS = (
    ("the kernel (system calls, TCP)", ("[kernel", "[vdso]")),
    ("the engine (Rust: h2, hyper, tokio, hits)", ("appliance_engine",)),
    ("libc", ("libc.so", "libc-")),
    ("Python", ("python3", "libpython")),
)


def perf_profile(pid: int, port: int, body: Path, streams: int, rate_guess: float) -> dict:
    """Where the hit path's time goes: `perf record` on every thread of the
    worker while h2load drives hot Gets (py-spy cannot see the engine's
    I/O thread, which answers them), shares by DSO and top symbols."""
    import shutil

    if not shutil.which("perf"):
        return {"skipped": "no perf (linux-perf)"}
    data = OUT / "perf-worker.data"
    with _Load("perf-worker", pid, port, body, streams, rate_guess) as load:
        rec = subprocess.run(
            ["perf", "record", "-F", "1999", "-p", str(pid), "-o", str(data), "--", "sleep", str(SECONDS)],
            capture_output=True,
            text=True,
            timeout=SECONDS + 60,
        )
    if rec.returncode != 0:
        return {"skipped": f"perf record failed: {rec.stderr.strip().splitlines()[-1:]}"}

    def report(sort: str) -> list[tuple[str, float]]:
        out = subprocess.run(
            [
                "perf",
                "report",
                "-i",
                str(data),
                "--stdio",
                "--no-children",
                "--sort",
                sort,
                "-q",
                "--percent-limit",
                "0.3",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        rows = []
        for line in out.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
            if m:
                rows.append((m.group(2), float(m.group(1)) / 100))
        return rows

    by_dso: Counter = Counter()
    for dso, share in report("dso"):
        name = next((label for label, marks in PERF_DSOS if any(mk in dso for mk in marks)), "other")
        by_dso[name] += share
    return {
        "by_dso": dict(by_dso.most_common()),
        "by_thread": report("comm")[:6],
        "top_symbols": [(re.sub(r"^\[[.k]\]\s+", "", sym), share) for sym, share in report("sym")[:12]],
        "load": {k: load.result.get(k) for k in ("rps", "succeeded")},
    }


def handler_time(sizes=(100, 1 << 20)) -> dict:
    """Wall time inside the product's Get handler per Get (servers.py
    --timing; a hit never suspends, so this is CPU), next to the worker's
    whole CPU per Get."""
    import json
    import os
    import signal

    timing = OUT / "profile-timing.json"
    worker, port, _ = start_worker("profile-timed", extra=["--timing", str(timing)])

    def snapshot() -> dict:
        timing.unlink(missing_ok=True)
        os.kill(worker.pid, signal.SIGUSR1)
        wait_file(timing, 10, worker)
        time.sleep(0.05)
        return json.loads(timing.read_text())

    out = {}
    try:
        for size in sizes:
            key = value_key(size)
            get_once(port, key)
            body = get_body(key)
            h2load(port, GET_PATH, body, n=200, streams=8, name="profile-timed-warm")
            a = snapshot()
            r = per_request_cpu(
                h2load(
                    port,
                    GET_PATH,
                    body,
                    n=4000 if size < 65536 else 400,
                    streams=8,
                    name=f"profile-timed-{size}",
                    watch=[worker.pid],
                    timeout=120,
                    expect_data=get_response_bytes(size),
                )
            )
            b = snapshot()
            calls = max(1, b["handler_calls"] - a["handler_calls"])
            out[str(size)] = {
                "handler_us": (b["handler_ns"] - a["handler_ns"]) / calls / 1000,
                "cpu_us_per_get": r["cpu_us_per_req"],
                "gets": calls,
            }
    finally:
        worker.kill()
    return out


def run(cfg) -> dict:
    results = {"server": default_server()}  # what start_worker serves on
    results["handler_time"] = handler_time()
    echo, eport = start_echo("profile-echo")
    try:
        get_once(eport, value_key(100))
        results["syscalls_echo"] = syscalls_per_get(echo.pid, eport, get_body(value_key(100)), "echo")
    finally:
        echo.kill()
    worker, wport, sock = start_worker("profile-worker")
    try:
        key = value_key(100)
        get_once(wport, key)
        body = get_body(key)
        results["syscalls_worker"] = syscalls_per_get(worker.pid, wport, body, "worker")
        probe = h2load(wport, GET_PATH, body, n=3000, streams=32, name="profile-probe")
        log("profile: hot Get worker (100 B hits, 32 streams)")
        results["hot_get_worker"] = profile_target(
            "worker", worker.pid, wport, body, 32, probe["rps"], svg=OUT / "profile-worker.svg"
        )
        log("profile: hot Get worker under perf (the engine's I/O thread answers hits)")
        results["hit_path_perf"] = perf_profile(worker.pid, wport, body, 32, probe["rps"])
        n = int(probe["rps"] * 3)
        results["hot_get_threads"] = thread_cpu(
            worker.pid,
            lambda: h2load(
                wport,
                GET_PATH,
                body,
                n=n,
                streams=32,
                name="profile-threads",
                timeout=60,
                expect_data=get_response_bytes(100),
            ),
        )
    finally:
        worker.kill()
    (a, aport, asock, aaddr), (b, bport, bsock, baddr) = start_ring(["profile-fwd-a", "profile-fwd-b"], mirror=0.0)
    try:
        key = owned_key(baddr, [aaddr, baddr], 100, "prof")
        get_once(aport, key)
        body = get_body(key)
        probe = h2load(aport, GET_PATH, body, n=1000, streams=1, name="profile-probe")
        log("profile: forwarding node (non-owner, hot cache off, 1 stream)")
        results["forwarding_node"] = profile_target("forwarder", a.pid, aport, body, 1, probe["rps"])
    finally:
        a.kill()
        b.kill()
    for size, h in results["handler_time"].items():
        log(
            f"  {size} B hit: product handler {h['handler_us']:.1f} µs of {h['cpu_us_per_get']:.0f} µs "
            "worker CPU per Get"
        )
    for name in ("syscalls_echo", "syscalls_worker"):
        if results.get(name):
            log(f"  {name}: {results[name]['total_per_get']:.1f} system calls per Get")
    for name, r in results.items():
        if not isinstance(r, dict) or "categories" not in r:
            continue
        cats = ", ".join(f"{k} {v['share_of_busy']:.0%}" for k, v in r["categories"].items() if v["share_of_busy"])
        log(f"  {name}: {cats}")
    return results


def section(res: dict | None) -> list[str]:
    out, ran = opening("## Profile of the hot path", res, "profile")
    if not ran:
        return out
    if not res.get("server"):
        # Profiles from before the bench recorded the backend were taken on the
        # native backend (the default then), which the product no longer has.
        return out + [
            "_This profile was taken before the bench recorded the workers' backend, on a backend the product no "
            "longer has; re-run it (`python bench/run.py profile`)._",
            "",
        ]
    backend = f"the {res['server']} backend"
    out += [
        f"The workers served on {backend}. py-spy samples by what the innermost frame is, parked threads left out:",
        "",
    ]
    targets = [(k, res.get(k)) for k in ("hot_get_worker", "forwarding_node") if res.get(k)]
    idle = [k for k, t in targets if not t.get("busy_samples")]
    if idle:  # the engine answers hits on its own I/O thread: no Python thread is busy
        out += [
            f"py-spy saw no busy Python thread in the {', '.join(_target_label(k) for k in idle)}: its calls "
            "never reach Python (the perf profile below shows where their time goes).",
            "",
        ]
        targets = [(k, t) for k, t in targets if k not in idle]
    cats = []
    for _, t in targets:
        for c in t["categories"]:
            if c not in cats and not c.startswith("waiting"):
                cats.append(c)
    if targets:
        rows = []
        for c in cats:
            rows.append([c] + [pct((t["categories"].get(c) or {}).get("share_of_busy") or 0) for _, t in targets])
        rows.append(
            ["*under a product frame (inclusive)*"] + [pct(t.get("product_inclusive_share")) for _, t in targets]
        )
        rows.append(["*busy samples*"] + [num(t["busy_samples"]) for _, t in targets])
        out += [table(["share of busy samples", *(_target_label(k) for k, _ in targets)], rows), ""]
    ht = res.get("handler_time")
    if ht:
        out += [
            "Time inside the product's cache rules per hit (`NodeRules.hit`, `servers.py --timing`), against "
            f"the worker's whole CPU per Get ({backend}, 8 streams):",
            "",
            table(
                ["value", "handler µs", "worker CPU µs per Get (abs.)", "handler share"],
                [
                    [
                        size_label(int(z)),
                        num(h["handler_us"], 1),
                        num(h["cpu_us_per_get"]),
                        pct(h["handler_us"] / h["cpu_us_per_get"]),
                    ]
                    for z, h in ht.items()
                ],
            ),
            "",
        ]
    hp = res.get("hit_path_perf")
    if hp and "skipped" in hp:
        out += [f"_The hit path's perf profile was skipped: {hp['skipped']}._", ""]
    elif hp:
        out += [
            "Where a hit's time goes (`perf record` on every thread of the hot-Get worker, 100 B hits, 32 "
            "streams; the engine's I/O thread answers them, which py-spy cannot see): share of all samples by "
            "where the code lives",
            "",
            table(["code", "share"], [[name, pct(share)] for name, share in hp["by_dso"].items()]),
            "",
            "By thread: " + "; ".join(f"`{name}` {share:.1%}" for name, share in hp["by_thread"]),
            "",
            "Top symbols: " + "; ".join(f"`{sym}` {share:.1%}" for sym, share in hp["top_symbols"]),
            "",
        ]
    th = res.get("hot_get_threads")
    if th:
        out += [
            "CPU by thread of the hot-Get worker (cores, /proc/PID/task; 100 B hits, 32 streams): "
            + "; ".join(f"`{name}` {num(c, 2)}" for name, c in th["cores_by_thread"].items()),
            "",
        ]
    se, sw = res.get("syscalls_echo"), res.get("syscalls_worker")
    if se and sw:
        names = [n for n in sw["per_get"] if sw["per_get"][n] >= 0.05 or se["per_get"].get(n, 0) >= 0.05]
        out += [
            "System calls per Get (strace -c over 3,000 Gets at 32 streams; counts only):",
            "",
            table(
                ["", *names, "total"],
                [
                    ["echo", *(num(se["per_get"].get(n, 0), 1) for n in names), f"**{num(se['total_per_get'], 1)}**"],
                    ["worker", *(num(sw["per_get"].get(n, 0), 1) for n in names), f"**{num(sw['total_per_get'], 1)}**"],
                ],
            ),
            "",
        ]
    for k, t in targets:
        out += [
            f"Top leaves, {_target_label(k)}: "
            + "; ".join(f"`{name}` {share:.1%}" for name, share in t["top_leaves"][:8]),
            "",
        ]
        if t["top_product_frames"]:
            out += [
                f"Top product frames, {_target_label(k)}: "
                + "; ".join(f"`{name}` {share:.1%}" for name, share in t["top_product_frames"][:6]),
                "",
            ]
    return out


def _target_label(key: str) -> str:
    return {"hot_get_worker": "hot-Get worker (100 B hits)", "forwarding_node": "forwarding node (1 stream)"}.get(
        key, key
    )
