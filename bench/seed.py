"""The seed's own Go server (seednode), built from its source, in a
private network namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from processes import OUT, PY, ROOT, Proc


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
