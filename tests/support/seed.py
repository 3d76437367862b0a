"""The seed's own Go nodes beside ours, for interop tests.

`seedgo/build.sh` (the shared seedgo directory; $SEEDGO_DIR overrides where it
is) builds the seed's Go system from its source, offline: `seednode` (a real
seed Server), `seedclient` (the seed's peer client and round-robin client),
`seedring` (the seed's consistenthash). It prints its bin dir and caches the
build under a stamp; run as root it installs its own Debian packages.

A seed node listens on ":port", every interface, and accepts only
`localhost:P` (or a 4-character first label) as its address. Our rule is to
bind loopback only, so a `MixedCluster` runs everything (the appliance with
its embedded etcd, the Go nodes) inside a private network namespace with
only `lo` up. The test process stays outside: it reads the workers' admin
unix sockets directly (a socket path is not tied to a network namespace),
runs the seed's binaries and our CLI under `ip netns exec`, and talks gRPC
and etcd through a helper process in the namespace (ns_agent.py).

Where this cannot run (not root, no Go toolchain and no apt) the tests skip
with the reason; with SEEDGO_REQUIRED=1 (.ci/run sets it as root) they fail
instead, so CI never skips them silently.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from .appliance import BIN, Appliance, wait_for
from .netns import LoopbackNamespace, loopback_namespace_unavailable

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
AGENT = Path(__file__).resolve().parent / "ns_agent.py"


class SeedUnavailable(Exception):
    """Why the seed's Go system cannot run here (the reason to skip)."""


def required() -> bool:
    from . import required as every_test

    return os.environ.get("SEEDGO_REQUIRED", "") not in ("", "0") or every_test.required()


def seedgo_dir() -> Path | None:
    candidates = [os.environ.get("SEEDGO_DIR"), ROOT.parent / "shared" / "seedgo", "/work/shared/seedgo"]
    for c in candidates:
        if c and (Path(c) / "build.sh").is_file():
            return Path(c)
    return None


_built: Path | None = None


def build(timeout: float = 1800) -> Path:
    """The bin dir of seednode, seedclient and seedring (build.sh's output)."""
    global _built
    if _built is not None:
        return _built
    where = seedgo_dir()
    if where is None:
        raise SeedUnavailable("seedgo/build.sh not found (set SEEDGO_DIR to the shared seedgo directory)")
    try:
        r = subprocess.run(["bash", str(where / "build.sh")], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SeedUnavailable(f"{where}/build.sh did not finish within {timeout:.0f}s") from None
    if r.returncode != 0:
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        why = "" if os.geteuid() == 0 else " (not root: it cannot apt-get install golang-go and the Go -dev packages)"
        raise SeedUnavailable(f"{where}/build.sh failed{why}: {tail}")
    out = Path(r.stdout.strip().splitlines()[-1])
    for name in ("seednode", "seedclient", "seedring"):
        if not os.access(out / name, os.X_OK):
            raise SeedUnavailable(f"build.sh printed {out}, which has no {name}")
    _built = out
    return out


def unavailable() -> str | None:
    """Why a MixedCluster cannot run here, or None (builds the binaries)."""
    if os.geteuid() != 0:
        return "needs root for a private network namespace (the seed's Go nodes listen on every interface)"
    reason = loopback_namespace_unavailable()
    if reason:
        return f"network namespaces unavailable: {reason}"
    try:
        build()
    except SeedUnavailable as exc:
        return str(exc)
    return None


def go_unquote(text: str) -> str:
    """A key as Go's %q printed it (valid UTF-8 keys: Python's literal
    syntax reads Go's escapes for them the same way)."""
    return ast.literal_eval(text)


def seedring(peers: list[str], keys: list[str]) -> dict[str, str]:
    """The seed's own ring (consistenthash, 50 replicas, crc32): key -> owner."""
    r = subprocess.run(
        [str(build() / "seedring"), "-peers", ",".join(peers)],
        input="".join(k + "\n" for k in keys).encode(),
        capture_output=True,
        timeout=60,
        check=True,
    )
    out = {}
    for line in r.stdout.decode().splitlines():
        key, _, owner = line.rpartition("\t")
        out[key] = owner
    return out


class SeedNode:
    """One `seednode` process in a namespace. Its stdout (appended across
    restarts) carries one `SEEDGO-LOAD group=G key="K"` line per origin load
    and one `SEEDGO-PEERS a,b,c` line per start: the peer list it read from
    etcd prefix `clusters/`, once."""

    def __init__(self, addr: str, etcd: str, log: Path, launcher: list[str], group: str = "scores") -> None:
        self.addr, self.etcd, self.log, self.launcher, self.group = addr, etcd, log, launcher, group
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> SeedNode:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *self.launcher,
                    str(build() / "seednode"),
                    "-addr",
                    self.addr,
                    "-etcd",
                    self.etcd,
                    "-group",
                    self.group,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        wait_for(
            lambda: len(self.peer_lists()) >= self.starts or self.proc.poll() is not None, 20, what=f"{self.addr} up"
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"seednode {self.addr} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL its process group: no lease revoke (the seed never revokes on stop anyway)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def _lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def peer_lists(self) -> list[list[str]]:
        return [line.split(" ", 1)[1].split(",") for line in self._lines() if line.startswith("SEEDGO-PEERS ")]

    def loads(self) -> list[str]:
        """Keys loaded by this node's origin, in order, over all its starts."""
        out = []
        for line in self._lines():
            if line.startswith("SEEDGO-LOAD "):
                out.append(go_unquote(line.split(" key=", 1)[1]))
        return out


class NsAgent:
    """ns_agent.py in the namespace: gRPC Gets and etcd calls from inside."""

    def __init__(self, launcher: list[str], etcd: str, log: Path) -> None:
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [*launcher, sys.executable, str(AGENT), etcd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )
        self._lock = threading.Lock()
        assert self.call("ping") == "pong"

    def call(self, op: str, **kwargs):
        with self._lock:
            self.proc.stdin.write((json.dumps({"op": op, **kwargs}) + "\n").encode())
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ns agent exited ({self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"ns agent {op}: {reply['error']}")
        return reply["ok"]

    def get(self, calls: list[tuple[str, str, str]], timeout: float = 10.0) -> list[tuple[bytes | None, str | None]]:
        """(value, None) or (None, status code name) per (addr, group, key), sent together."""
        out = []
        for r in self.call("get", calls=[list(c) for c in calls], timeout=timeout):
            out.append((base64.b64decode(r["value"]), None) if "value" in r else (None, r["code"]))
        return out

    def etcd_prefix(self, prefix: str) -> dict[str, tuple[str, int]]:
        return {k: (v, lease) for k, (v, lease) in self.call("etcd_prefix", prefix=prefix).items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


GROUPS = """
[groups.scores]
origin = "python:support.origin_values:logged"
cache_bytes = "4MiB"
"""


class MixedCluster:
    """Our `appliance run` (embedded etcd on a TCP endpoint, `workers`
    workers as localhost:PORT) and `go` seed nodes, in one private network
    namespace, on one etcd. Group "scores" loads `"v-" + key` on both sides:
    the Go nodes log each load on stdout, our workers append to a file.

    Go nodes read their peer list from `clusters/` once, at start. Our
    workers keep their own entries there (`seed_interop`); the Go
    nodes' entries are written here once, as an operator of the seed would."""

    ETCD = "127.0.0.1:12379"

    def __init__(
        self, root: Path, *, workers: int = 2, go: int = 2, base_port: int = 17000, go_port: int = 17100
    ) -> None:
        self.root = root
        (root / "app").mkdir(parents=True, exist_ok=True)
        self.ns = LoopbackNamespace("gcseed")
        self.loads_file = root / "python-loads.jsonl"
        self.app = Appliance(
            root / "app",
            workers=workers,
            host="localhost",
            base_port=base_port,
            etcd_endpoint=self.ETCD,
            lease_ttl=2,
            groups=GROUPS,
            env={"PYTHONPATH": str(TESTS), "SEED_INTEROP_LOADS": str(self.loads_file)},
            seed_interop=True,
        )
        self.app.launcher = self.ns.launcher
        # Ports of one width: the seed's resolver watches "groupcache/<addr>"
        # as a prefix, so localhost:1710 would also match localhost:17100.
        self.go = [
            SeedNode(f"localhost:{go_port + i}", self.ETCD, root / f"go-{i}.log", self.ns.launcher) for i in range(go)
        ]
        self.agent: NsAgent | None = None

    # Setup and teardown --------------------------------------------------------

    def start(self) -> MixedCluster:
        self.ns.create()
        self.app.start()  # waits for the ring of our workers
        self.agent = NsAgent(self.ns.launcher, self.ETCD, self.root / "agent.log")
        for node in self.go:
            self.agent.call("put", key=f"clusters/{node.addr}", value=node.addr)
        wait_for(lambda: set(self.clusters()) == set(self.everyone()), 10, what="clusters/ complete")
        for node in self.go:
            node.start()
        self.wait_ring(self.everyone())
        return self

    def close(self) -> list[int]:
        for node in self.go:
            node.kill()
        if self.agent is not None:
            self.agent.close()
        leftovers = self.app.cleanup()
        self.ns.close()
        return leftovers

    # Views ---------------------------------------------------------------------

    @property
    def workers(self) -> list[str]:
        return self.app.addresses()

    def everyone(self, without: tuple[str, ...] = ()) -> list[str]:
        return sorted(a for a in [*self.workers, *(n.addr for n in self.go)] if a not in without)

    def clusters(self) -> dict[str, str]:
        """The seed's peer list in etcd: addr -> lease (0: the operator's)."""
        return {v: lease for _, (v, lease) in self.agent.etcd_prefix("clusters/").items()}

    def wait_ring(self, members: list[str], timeout: float = 20.0) -> None:
        self.app.wait_ring(len(self.workers), members=members, timeout=timeout)

    def stats(self) -> list[dict]:
        """The "scores" group counters of each of our workers."""
        return [self.app.admin_stats(i)["groups"]["scores"] for i in range(len(self.workers))]

    def pids(self) -> dict[int, str]:
        """Worker pid -> its address, from the registrations' metadata."""
        out = {}
        from appliance.cluster.etcd import parse_member

        for key, (value, _lease) in self.agent.etcd_prefix("groupcache/").items():
            addr, meta = parse_member(key, value)
            if meta and "pid" in meta:
                out[meta["pid"]] = addr
        return out

    def python_loads(self) -> list[tuple[str, str]]:
        """(worker address, key) per load by our origin, in order."""
        pids = self.pids()
        try:
            lines = self.loads_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(pids.get(pid, f"pid {pid}"), key) for pid, key in map(json.loads, lines)]

    def loads(self) -> Counter:
        """(loader, key) -> number of origin loads, on both sides."""
        c = Counter(self.python_loads())
        for node in self.go:
            c.update((node.addr, k) for k in node.loads())
        return c

    def run(self, argv: list[str], timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess:
        """A program inside the namespace."""
        return subprocess.run([*self.ns.launcher, *argv], capture_output=True, timeout=timeout, input=input)

    def seedclient(self, *args: str, timeout: str = "10s") -> str:
        r = self.run([str(build() / "seedclient"), *args, "-etcd", self.ETCD, "-timeout", timeout], timeout=60)
        if not r.stdout.strip():
            return f"(exit {r.returncode}) {r.stderr[-300:]!r}"
        return r.stdout.decode().strip().splitlines()[-1]

    def appliance(self, command: str, *args: str, inside: bool = True, timeout: float = 60):
        """`appliance COMMAND --config OURS ARGS…`, in the namespace unless inside=False."""
        argv = [str(BIN / "appliance"), command, "--config", str(self.app.config), *args]
        if inside:
            return self.run(argv, timeout=timeout)
        return subprocess.run(argv, capture_output=True, timeout=timeout)
