"""A real `appliance run` (supervisord, etcd, workers, controller) for tests.

Every process it starts is found again by its command line, which names
this test's own config file or state directory, and is killed at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance import addr as addrs
from appliance.admin_client import AdminClient
from appliance.config import Layout, dirs

from .ports import free_port, free_range

BIN = Path(sys.executable).parent


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; its value, or AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not ready yet
            last_exc = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


def pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


class Appliance:
    def __init__(
        self,
        root: Path,
        *,
        workers: int = 3,
        lease_ttl: int = 2,
        drain: str = "3s",
        groups: str | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        base_port: int | None = None,
        etcd_endpoint: str | None = None,
        embedded_etcd: bool = True,
        server: str = "auto",
        seed_interop: bool = False,
        auth: str = "",
        etcd_private: bool = True,
    ):
        """`auth`: the [auth] table's body (TOML); default: the product's defaults."""
        self.root = root
        self.extra_env = dict(env or {})  # added to the environment of `appliance run`
        self.workers = workers
        self.lease_ttl = lease_ttl
        self.drain = drain
        self.host = host
        self.etcd_endpoint = etcd_endpoint or f"127.0.0.1:{free_port()}"
        self.embedded_etcd = embedded_etcd
        self.server = server  # node.server: auto | engine | grpcio
        self.seed_interop = seed_interop
        self.etcd_private = etcd_private
        self.auth = auth
        self.base_port = base_port or free_range(8)
        self.config = root / "appliance.toml"
        self.log = root / "appliance.log"
        self.launcher: list[str] = []  # e.g. `ip netns exec NS`, to run it elsewhere
        self.cwd: Path | None = None  # the working directory `appliance run` starts in
        # Boxes on test networks (10.x in namespaces) talk without TLS.
        self.plaintext_peers = not addrs.is_loopback(host)
        self.groups = groups or (
            "[groups.scores]\n"
            'origin = "sqlite:///{state_dir}/scores.db"\n'
            'query = "SELECT score FROM students WHERE name = :key"\n'
            "demo_seed = true\n"
        )
        self.write_config()
        self.proc: subprocess.Popen | None = None

    @property
    def etcd_port(self) -> int:
        return int(self.etcd_endpoint.rpartition(":")[2])

    # Config and processes ------------------------------------------------------

    def write_config(self, workers: int | None = None) -> None:
        if workers is not None:
            self.workers = workers
        self.config.write_text(
            f"""
[cluster]
etcd = ["{self.etcd_endpoint}"]
embedded_etcd = {"true" if self.embedded_etcd else "false"}
lease_ttl = {self.lease_ttl}
seed_interop = {"true" if self.seed_interop else "false"}
etcd_private = {"true" if self.etcd_private else "false"}
plaintext_peers = {"true" if self.plaintext_peers else "false"}

[node]
workers = {self.workers}
host = "{self.host}"
base_port = {self.base_port}
drain_timeout = "{self.drain}"
peer_timeout = "2s"
state_dir = "{self.root / "state"}"
runtime_dir = "{self.root / "run"}"
server = "{self.server}"

{self.groups}
{"" if "[ops]" in self.groups else "[ops]" + chr(10) + 'metrics_addr = ""  # tests run in parallel: no fixed port'}
{"[auth]" + chr(10) + self.auth if self.auth else ""}
"""
        )

    def start(self, wait: bool = True) -> Appliance:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(self.extra_env)
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*self.launcher, str(BIN / "appliance"), "run", "--config", str(self.config)],
            cwd=self.cwd,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        if wait:
            self.wait_ring(self.workers)
        return self

    def cli(self, *args: str, timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "appliance"), *args, "--config", str(self.config)],
            capture_output=True,
            timeout=timeout,
            input=input,
        )

    def addresses(self, n: int | None = None) -> list[str]:
        return [f"{self.host}:{self.base_port + i}" for i in range(self.workers if n is None else n)]

    def settings(self):
        """The settings `appliance run` reads (directories filled in), without the environment."""
        from appliance.config import load_settings

        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("APPLIANCE_")}
        try:
            return load_settings(self.config)
        finally:
            os.environ.update(saved)

    def etcd(self):
        """A client of this appliance's etcd: through its private unix socket
        when it has one (single box, embedded), else its TCP endpoint."""
        from appliance.cluster import etcd as etcd_mod

        settings = self.settings()
        return etcd_mod.connect(settings.cluster, socket=Layout(settings).etcd_socket())

    def registered(self) -> dict[str, dict]:
        client = self.etcd()
        try:
            return {
                meta.key.decode(): {"value": json.loads(value), "lease": meta.lease_id}
                for value, meta in client.get_prefix("groupcache/")
            }
        finally:
            client.close()

    def registered_addrs(self) -> set[str]:
        return {v["value"]["Addr"] for v in self.registered().values()}

    def admin_stats(self, index: int) -> dict:
        with AdminClient(self.root / "run" / dirs.admin_socket_name(index)) as admin:
            return admin.stats()

    def metrics_text(self, index: int) -> str:
        """Worker `index`'s Prometheus exposition, as the box endpoint reads it."""
        with AdminClient(self.root / "run" / dirs.admin_socket_name(index)) as admin:
            return admin.metrics().text

    def rings(self, n: int | None = None) -> list[tuple[int, tuple[str, ...]]]:
        out = []
        for i in range(self.workers if n is None else n):
            s = self.admin_stats(i)
            out.append((s["revision"], tuple(s["peers"])))
        return out

    def wait_ring(self, n: int, timeout: float = 30.0, members: list[str] | None = None):
        """Until workers 0..n-1 all hold the same ring of exactly `members`."""
        want = tuple(sorted(members if members is not None else self.addresses(n)))

        def converged():
            rings = self.rings(n)
            return len(set(rings)) == 1 and rings[0][1] == want

        return wait_for(converged, timeout, what=f"ring {want}")

    def supervisor(self):
        from appliance.supervision import conf

        return conf.supervisor(self.settings())

    def process_info(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.supervisor().getAllProcessInfo()}

    def sigterm(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> list[int]:
        """Kill whatever is left; the pids that were still alive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        leftovers = pids_mentioning(str(self.root))
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if getattr(self, "_logf", None):
            self._logf.close()
        return leftovers
