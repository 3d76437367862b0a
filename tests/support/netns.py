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

from .appliance import Appliance


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

    def setup(self) -> Network:
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
        self.net, self.index = net, index
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(
            root,
            host=net.address(index),
            base_port=base_port,
            etcd_endpoint=etcd,
            embedded_etcd=index == 0,
            etcd_private=False,
            **kwargs,
        )
        self.launcher = list(net.prefix(index))

    def start(self) -> HostAppliance:
        """Start without waiting: the ring spans every host."""
        return super().start(wait=False)


class Box(Appliance):
    """`appliance run` on host i (1..) of a Network, as one box of a cluster
    whose every box runs a member of one embedded etcd cluster."""

    ETCD_PORT, PEER_PORT, BASE_PORT = 2379, 2380, 7100

    def __init__(self, root: Path, net: Network, index: int, boxes: list[int], **kwargs) -> None:
        self.net, self.index = net, index
        root.mkdir(parents=True, exist_ok=True)
        self.endpoints = [f"{net.address(b)}:{self.ETCD_PORT}" for b in boxes]
        super().__init__(
            root,
            host=net.address(index),
            base_port=self.BASE_PORT,
            etcd_endpoint=self.endpoints[0],
            embedded_etcd=True,
            **kwargs,
        )
        self.launcher = list(net.prefix(index))

    def write_config(self, workers: int | None = None) -> None:
        super().write_config(workers)
        text = self.config.read_text()
        etcd = ", ".join(f'"{e}"' for e in self.endpoints)
        text = text.replace(f'etcd = ["{self.etcd_endpoint}"]', f"etcd = [{etcd}]\netcd_peer_port = {self.PEER_PORT}")
        self.config.write_text(text)

    def start(self) -> Box:
        """Start without waiting: the ring spans every box."""
        return super().start(wait=False)

    def cli(self, *args: str, timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess:
        """The CLI run on this box (in its namespace)."""
        from .appliance import BIN

        return subprocess.run(
            [*self.launcher, str(BIN / "appliance"), *args, "--config", str(self.config)],
            capture_output=True,
            timeout=timeout,
            input=input,
        )

    def kill(self) -> list[int]:
        """SIGKILL every process of the box: `appliance run`, supervisord (in a
        session of its own), the etcd member, the controller and the workers."""
        import signal as signals

        from .appliance import pids_mentioning

        pids = pids_mentioning(str(self.root))
        for pid in pids:
            try:
                os.kill(pid, signals.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(10)
        return pids


class LoopbackNamespace:
    """A private network namespace with only `lo` up: programs that bind
    every interface (the seed's Go nodes listen on ":port") are reachable
    from nowhere else. Run a program in it with `launcher + argv`."""

    def __init__(self, prefix: str = "gcns") -> None:
        self.name = f"{prefix}{os.getpid() % 100000}x{random.randrange(16**4):04x}"
        self.created = False

    @property
    def launcher(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def create(self) -> LoopbackNamespace:
        ip("netns", "add", self.name)
        self.created = True
        ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def close(self) -> None:
        if self.created:
            ip("netns", "del", self.name, check=False)
            self.created = False


def loopback_namespace_unavailable() -> str | None:
    """Why this machine cannot run programs in a private loopback-only
    network namespace, or None."""
    ns = LoopbackNamespace("gcprobe")
    try:
        r = ip("netns", "add", ns.name, check=False)
        if r.returncode != 0:
            return f"`ip netns add` failed: {r.stderr.strip() or r.returncode} (needs root / CAP_SYS_ADMIN)"
        ns.created = True
        r = subprocess.run([*ns.launcher, "ip", "link", "set", "lo", "up"], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return f"`ip netns exec` failed: {r.stderr.strip()}"
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    except subprocess.SubprocessError as exc:
        return f"`ip` did not work: {exc}"
    finally:
        ns.close()
    return None
