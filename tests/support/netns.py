"""Several "hosts" on one machine: network namespaces joined by a bridge.

Host 0 is the root namespace (the bridge's address); hosts 1.. are network
namespaces, each with a veth into the bridge. `cut(i)` takes host i's link
down (it loses etcd and its peers); `mend(i)` brings it back. Everything is
named with a random suffix and removed by `close()`.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from pathlib import Path

from .appliance import BIN, Appliance


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def netns_unavailable() -> str | None:
    """Why this machine cannot create namespaces and veth pairs, or None."""
    name = f"gcprobe{os.getpid() % 100000}"
    try:
        r = ip("netns", "add", name, check=False)
        if r.returncode != 0:
            return f"`ip netns add` failed: {r.stderr.strip() or r.returncode} (needs root / CAP_SYS_ADMIN)"
        try:
            r = ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b", check=False)
            if r.returncode != 0:
                return f"cannot create a veth pair: {r.stderr.strip()}"
            ip("link", "del", f"{name}a", check=False)
            r = subprocess.run(["ip", "netns", "exec", name, "true"], capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                return f"`ip netns exec` failed: {r.stderr.strip()}"
        finally:
            ip("netns", "del", name, check=False)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    except subprocess.SubprocessError as exc:
        return f"`ip` did not work: {exc}"
    return None


class Network:
    def __init__(self, hosts: int) -> None:
        tag = f"{random.randrange(16**4):04x}"
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"gcbr{tag}"
        self.namespaces: dict[int, str] = {}
        self.links: dict[int, str] = {}  # root-side veth of host i
        self.tag = tag
        self.hosts = hosts

    def address(self, i: int) -> str:
        return f"{self.subnet}.{1 if i == 0 else 10 + i}"

    def setup(self) -> "Network":
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.address(0)}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i in range(1, self.hosts):
            ns, outer, inner = f"gc{self.tag}h{i}", f"gc{self.tag}v{i}", f"gc{self.tag}p{i}"
            ip("netns", "add", ns)
            self.namespaces[i] = ns
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self.links[i] = outer
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "master", self.bridge)
            ip("link", "set", outer, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
        return self

    def prefix(self, i: int) -> list[str]:
        """Command prefix that runs a program on host i."""
        return [] if i == 0 else ["ip", "netns", "exec", self.namespaces[i]]

    def cut(self, i: int) -> None:
        ip("link", "set", self.links[i], "down")

    def mend(self, i: int) -> None:
        ip("link", "set", self.links[i], "up")

    def close(self) -> None:
        for link in self.links.values():
            ip("link", "del", link, check=False)
        for ns in self.namespaces.values():
            ip("netns", "del", ns, check=False)
        ip("link", "del", self.bridge, check=False)


def free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HostAppliance(Appliance):
    """`appliance run` on host i of a Network, all hosts on one etcd.

    Host 0 runs the embedded etcd on the bridge address; the others use it."""

    def __init__(self, root: Path, net: Network, index: int, etcd: str, *, base_port: int, **kwargs) -> None:
        self.net, self.index, self.etcd_endpoint, self._base = net, index, etcd, base_port
        self.host = net.address(index)
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root, **kwargs)
        self.base_port = base_port
        self.write_config()

    def write_config(self, workers: int | None = None) -> None:
        if workers is not None:
            self.workers = workers
        self.config.write_text(
            f"""
[cluster]
etcd = ["{self.etcd_endpoint}"]
embedded_etcd = {"true" if self.index == 0 else "false"}
lease_ttl = {self.lease_ttl}

[node]
workers = {self.workers}
host = "{self.host}"
base_port = {self.base_port}
drain_timeout = "{self.drain}"
peer_timeout = "2s"
state_dir = "{self.root / 'state'}"
runtime_dir = "{self.root / 'run'}"

{self.groups}
"""
        )

    def addresses(self, n: int | None = None) -> list[str]:
        return [f"{self.host}:{self.base_port + i}" for i in range(self.workers if n is None else n)]

    def etcd(self):
        from appliance.cluster import etcd as etcd_mod
        from appliance.config import Settings

        return etcd_mod.connect(Settings(cluster={"etcd": [self.etcd_endpoint]}).cluster)

    def start(self) -> "HostAppliance":
        """Start without waiting: the ring spans every host."""
        import subprocess as sp

        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(self.extra_env)
        self._logf = open(self.log, "ab")
        self.proc = sp.Popen(
            [*self.net.prefix(self.index), str(BIN / "appliance"), "run", "--config", str(self.config)],
            stdout=self._logf,
            stderr=sp.STDOUT,
            start_new_session=True,
            env=env,
        )
        return self
