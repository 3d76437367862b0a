"""Shared helpers for the benchmarks: processes, ports, h2load, /proc CPU.

Every process a benchmark starts goes through `spawn` and is killed by its
pid (`Proc.kill`, and `kill_all` at exit). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
PY = sys.executable
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Processes -------------------------------------------------------------------

_LIVE: dict[int, Proc] = {}


class Proc:
    """A child process we started; killed by its pid, never by name."""

    def __init__(self, cmd: list[str], name: str, *, env: dict | None = None, cwd: Path | None = None) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = OUT / f"{name}.log"
        self._logf = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env, cwd=cwd or ROOT, stdin=subprocess.DEVNULL
        )
        self.pid = self.popen.pid
        _LIVE[self.pid] = self

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        _LIVE.pop(self.pid, None)
        self._logf.close()
        for companion in getattr(self, "companions", ()):
            companion.kill(sig, timeout)

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@atexit.register
def kill_all() -> None:
    for proc in list(_LIVE.values()):
        proc.kill()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/<pid>/stat."""
    return cpu_seconds_of(f"/proc/{pid}/stat")


def cpu_seconds_of(stat_path: str) -> float:
    """utime + stime from a /proc .../stat file (a process or one thread)."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def box_busy_s() -> float:
    """CPU seconds the whole box has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


# Ports -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            with socket.create_connection((HOST, port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {timeout}s" + (f":\n{proc.tail()}" if proc else ""))


def wait_file(path: Path, timeout: float = 20, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout}s" + (f":\n{proc.tail()}" if proc else ""))
        time.sleep(0.05)


# Bench servers -----------------------------------------------------------------


def default_server() -> str:
    """What `server = "auto"` serves with: the engine where it is built."""
    from appliance.transport import engine_available

    return "engine" if engine_available() is None else "grpcio"


def start_worker(
    name: str,
    *,
    port: int | None = None,
    peers: list[str] | None = None,
    mirror: float = 0.1,
    delay_ms: float = 0,
    cache_bytes: str = "256MiB",
    extra: list[str] = (),
    prefix: list[str] = (),
    server: str | None = None,
    forward: str = "",
    peer_library: str = "",
) -> tuple[Proc, int, Path]:
    """A real cache node (appliance.serving.Node) in its own process, on
    the given server backend (engine | grpcio; default: `default_server()`)."""
    port = port or free_port()
    server = server or default_server()
    admin = OUT / f"{name}.sock"
    ready = OUT / f"{name}.ready"
    ready.unlink(missing_ok=True)
    cmd = [
        *prefix,
        PY,
        str(BENCH / "servers.py"),
        "worker",
        "--port",
        str(port),
        "--admin",
        str(admin),
        "--ready",
        str(ready),
        "--mirror",
        str(mirror),
        "--delay-ms",
        str(delay_ms),
        "--cache-bytes",
        cache_bytes,
        "--server",
        server,
        *extra,
    ]
    if forward:
        cmd += ["--forward", forward]
    if peer_library:
        cmd += ["--peer-library", peer_library]
    if peers:
        cmd += ["--peers", ",".join(peers)]
    proc = Proc(cmd, name)
    wait_file(ready, 30, proc)
    return proc, port, admin


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


def start_echo(name: str = "echo", *, prefix: list[str] = ()) -> tuple[Proc, int]:
    """The baseline echo server: a bare grpc.aio server (`servers.py echo`)."""
    port = free_port()
    ready = OUT / f"{name}.ready"
    ready.unlink(missing_ok=True)
    proc = Proc([*prefix, PY, str(BENCH / "servers.py"), "echo", "--port", str(port), "--ready", str(ready)], name)
    wait_file(ready, 30, proc)
    return proc, port


# memcaslap (libmemcached-tools): memcached's load generator -------------------

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


# The seed's own Go server, in a network namespace ------------------------------


class Netns:
    """A private network namespace with only loopback up: the seed's Go
    server listens on every interface, so it (and, for a like-for-like
    run, everything it is compared with, h2load included) runs in one."""

    def __init__(self, name: str) -> None:
        self.name = f"{name}-{os.getpid()}"
        self.prefix = ["ip", "netns", "exec", self.name]

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def netns_unavailable() -> str | None:
    """None when this process can make network namespaces, else why not."""
    if os.geteuid() != 0:
        return "not root: no network namespace for the seed's Go server"
    if not shutil.which("ip"):
        return "no `ip` (iproute2)"
    return None


def seed_binaries() -> Path:
    """Build (or find cached) the seed's Go system: ../shared/seedgo/build.sh."""
    build = Path(os.environ.get("SEEDGO_DIR", ROOT.parent / "shared" / "seedgo")) / "build.sh"
    if not build.exists():
        raise RuntimeError(f"{build} not found (set SEEDGO_DIR to the seedgo directory)")
    out = subprocess.run(["bash", str(build)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"seedgo build failed:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def start_seed(name: str, ns: Netns, port: int, group: str = "bench") -> Proc:
    """The seed's own Go server (seednode, GOMAXPROCS=1) on localhost:port
    inside `ns`, with a private etcd there for its registration. It logs a
    line per Get, as the seed does; that goes to a file (bench/out)."""
    from appliance.supervision.conf import etcd_binary

    bins = seed_binaries()
    data = OUT / f"{name}-etcd"
    shutil.rmtree(data, ignore_errors=True)
    etcd = Proc(
        [
            *ns.prefix,
            etcd_binary(),
            "--name",
            "bench",
            "--data-dir",
            str(data),
            "--listen-client-urls",
            "http://127.0.0.1:2379",
            "--advertise-client-urls",
            "http://127.0.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "bench=http://127.0.0.1:2380",
            "--log-level",
            "error",
        ],
        f"{name}-etcd",
    )
    addr = f"localhost:{port}"
    env = {**os.environ, "GOMAXPROCS": "1"}
    seed = Proc(
        [*ns.prefix, str(bins / "seednode"), "-addr", addr, "-etcd", "127.0.0.1:2379", "-group", group, "-peers", addr],
        name,
        env=env,
    )
    seed.companions = [etcd]
    deadline = time.monotonic() + 20
    while not seed_answers(ns, port):
        if not seed.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"seednode did not serve:\n{seed.tail()}")
        time.sleep(0.1)
    return seed


def seed_answers(ns: Netns, port: int) -> bool:
    out = subprocess.run(
        [*ns.prefix, PY, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 0.5)"],
        capture_output=True,
    )
    return out.returncode == 0


def admin_stats(sock: Path) -> dict:
    from appliance.admin_client import AdminClient

    with AdminClient(sock, timeout=5) as admin:
        return admin.stats()


def group_stats(sock: Path, group: str = "bench") -> dict:
    return admin_stats(sock)["groups"][group]


def value_key(size: int, tag: str = "hot") -> str:
    """Bench loaders return `size` bytes for a key named like this."""
    return f"v{size}-{tag}"


def get_once(port: int, key: str, group: str = "bench") -> bytes:
    import grpc

    from appliance.pb import groupcache_pb2, groupcache_pb2_grpc

    opts = [("grpc.max_receive_message_length", 8 << 20)]
    with grpc.insecure_channel(f"{HOST}:{port}", options=opts) as ch:
        return (
            groupcache_pb2_grpc.GroupCacheStub(ch)
            .Get(groupcache_pb2.GetRequest(group=group, key=key), timeout=10)
            .value
        )


# h2load ----------------------------------------------------------------------

GET_PATH = "/groupcachepb.GroupCache/Get"
GET_MANY_PATH = "/appliance.cache.Cache/GetMany"


def self_signed(directory: Path) -> Path:
    """`directory` with cert.pem and key.pem: a self-signed ECDSA P-256
    certificate for 127.0.0.1 (h2load does not verify it)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "key.pem").chmod(0o600)
    return directory


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


def need(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if not found:
        raise SystemExit(f"{binary} not found: install the Debian package {package} (make -C bench deps)")
    return found


def median(vals):
    vals = sorted(vals)
    n = len(vals)
    if not n:
        return float("nan")
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def interleave(arms: dict, rounds: int) -> dict[str, list[dict]]:
    """Run each arm (name -> callable returning a result dict) `rounds` times,
    alternating the order (ABBA…) so drift on a shared box hits both alike."""
    names = list(arms)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(arms[name]())
    return out


def summarize(
    runs: list[dict], keys=("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "client_cpu_share", "other_cpu_cores")
) -> dict:
    s = {k: median([r[k] for r in runs if k in r]) for k in keys}
    s["runs"] = len(runs)
    s["rps_all"] = [round(r["rps"], 1) for r in runs]
    return s


def per_request_cpu(res: dict) -> dict:
    res["cpu_us_per_req"] = res["server_cpu_s"] / max(1, res.get("succeeded", 0)) * 1e6
    return res


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def owned_key(owner: str, peers: list[str], size: int = 100, tag: str = "k", start: int = 0) -> str:
    """The first key "v<size>-<tag><i>" that the seed ring places on `owner`."""
    from appliance.cache.ring import HashRing

    ring = HashRing(peers, 50, "seed")
    for i in range(start, start + 100_000):
        key = value_key(size, f"{tag}{i}")
        if ring.owner(key) == owner:
            return key
    raise RuntimeError(f"no key for {owner}")


def start_ring(names: list[str], **kw) -> list[tuple[Proc, int, Path, str]]:
    """Worker processes that share one ring (revision 1); (proc, port, admin sock, addr) each."""
    ports = [free_port() for _ in names]
    peers = [f"{HOST}:{p}" for p in ports]
    out = []
    for name, port, addr in zip(names, ports, peers, strict=False):
        proc, port, sock = start_worker(name, port=port, peers=peers, **kw)
        out.append((proc, port, sock, addr))
    return out


def wait_for_state(supervisor, name: str, states: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = supervisor.getProcessInfo(name)["statename"]
        if state in states or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def quiet_box(max_wait: float = 45.0, threshold: float = 0.5, window: float = 1.0) -> float:
    """Wait (up to max_wait s) until the rest of the box uses under `threshold`
    cores over `window` s; the last reading. The box is shared with other
    people's test runs, which otherwise land in our figures."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = box_busy_s(), time.monotonic()
        time.sleep(window)
        used = (box_busy_s() - b0) / (time.monotonic() - t0)
        if used < threshold or time.monotonic() > deadline:
            return used
