"""`appliance run`: the foreground process systemd starts.

It writes the supervisord config, starts supervisord, and acts on signals:
SIGTERM/SIGINT stop every worker gracefully (together), then the controller,
then etcd, and exit 0; SIGHUP re-reads the TOML and applies a new worker
count without touching the workers that stay.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from . import addr as addrs
from . import host
from .cluster import membership
from .config import Layout, NodeSettings, Settings, dirs, report
from .supervision import conf, rpc
from .supervision.private_files import private_dir, write_private
from .tokens import ensure_token_file

log = logging.getLogger(__name__)

# After supervisord is told to shut down (every program already stopped),
# how long `run` waits for it to exit before killing it.
SUPERVISORD_EXIT = 30.0


def shutdown_time(node: NodeSettings) -> float:
    """The longest `appliance run` takes from SIGTERM to exit: the workers,
    then the controller, then etcd, each stopped and waited for in turn,
    then supervisord's own exit. systemd's TimeoutStopSec must exceed it."""
    programs = (node.stop_grace, conf.CONTROLLER_STOP_GRACE, conf.ETCD_STOP_GRACE)
    return sum(rpc.stop_wait(grace) for grace in programs) + SUPERVISORD_EXIT


def _die_with_parent() -> None:
    # supervisord runs in its own session (so a terminal's Ctrl-C reaches only
    # us), yet must not outlive us: ask Linux to SIGTERM it if we die.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _relay(fd: int) -> None:
    while chunk := os.read(fd, 65536):
        try:
            os.write(1, chunk)
        except OSError:
            pass  # our stdout is gone; keep draining so children never block


def check_ports(settings: Settings) -> list[str]:
    """Ports this box must bind; a list of clashes with running processes."""
    import socket

    layout = Layout(settings)
    wanted = [(settings.node.host, p) for p in settings.node.ports]
    wanted += [(settings.node.host, p) for p in layout.http_ports() or ()]
    metrics = settings.ops.metrics_endpoint()
    if metrics is not None:
        wanted.append(metrics)
    if settings.cluster.embedded_etcd and not layout.private_etcd():
        wanted.append(addrs.split(layout.etcd_member_endpoint()))
        if layout.etcd_peer_port():
            wanted.append((addrs.split(layout.etcd_member_endpoint())[0], layout.etcd_peer_port()))
    clashes = []
    for where, port in wanted:
        family = socket.AF_INET6 if ":" in where else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((where, port))
            except OSError as exc:
                clashes.append(f"{addrs.join(where, port)}: {exc.strerror}")
    return clashes


def _section_changes(old: Settings, new: Settings) -> set[str]:
    """Dotted names of the top-level settings (`node.workers`, `groups.x`, ...)
    whose values differ."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    changed = set()
    for section in a.keys() | b.keys():
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for key in sa.keys() | sb.keys():
            if sa.get(key) != sb.get(key):
                changed.add(f"{section}.{key}")
    return changed


def _wait_in_ring(settings: Settings, index: int, timeout: float, others: Sequence[int] = ()) -> bool:
    """Until worker `index` answers on its admin socket and is in its ring,
    and in the rings of workers `others` (so that the next to stop hands
    its keys to it too, and the others forward to it)."""
    import grpc

    from .admin_client import AdminClient

    addr = settings.node.address(index)
    deadline = time.monotonic() + timeout
    waiting = [index, *others]
    while time.monotonic() < deadline:
        try:
            # A new channel each try: the worker is restarting, and a channel
            # that failed to connect would wait out grpc's reconnect backoff.
            with AdminClient(Layout(settings).admin_socket(waiting[0]), timeout=1) as admin:
                stats = admin.stats()
            if addr in stats["peers"]:
                waiting.pop(0)
                if not waiting:
                    return True
                continue
        except (grpc.RpcError, KeyError, ValueError):
            pass
        time.sleep(0.1)
    return False


class Appliance:
    def __init__(self, settings: Settings, config: Path | None, load: Callable[[], Settings]) -> None:
        self.settings = settings
        self.config = config
        self._load = load  # re-reads the config on SIGHUP
        self._signals: list[int] = []
        self._wake = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.supervisor: Any = None
        self.conf_path = Layout(settings).runtime_path() / "supervisord.conf"
        self._etcd_peer_port: int | None = None
        self._auth: tuple[str, str] | None = None
        self._cluster_state = "new"

    def _record(self, signum: int, frame: FrameType | None) -> None:  # signal handler: record only
        self._signals.append(signum)
        self._wake.set()

    def write_conf(self) -> None:
        s, layout = self.settings, Layout(self.settings)
        if s.cluster.embedded_etcd and not layout.private_etcd() and self._etcd_peer_port is None:
            etcd_host = addrs.split(layout.etcd_member_endpoint())[0]
            self._etcd_peer_port = layout.etcd_peer_port() or conf.free_port(etcd_host)
        if self._auth is None:
            self._auth = conf.new_supervisor_auth(self.settings)
        text = conf.render(
            self.settings,
            self.config,
            etcd_peer_port=self._etcd_peer_port,
            auth=self._auth,
            cluster_state=self._cluster_state,
        )
        write_private(self.conf_path, text)

    def run(self) -> int:
        s, layout = self.settings, Layout(self.settings)
        # Whatever the appliance makes is its own: sockets, etcd's data, the token.
        os.umask(0o077)
        for path in (layout.runtime_path(), layout.state_path(), layout.runtime_path() / dirs.ETCD_DIR):
            private_dir(path)
        if s.auth.token_file is None and ensure_token_file(layout.token_path()):
            log.info(
                "made the box's token %s (peers and the CLI present it; copy it to every box of a cluster)",
                layout.token_path(),
            )
        for warning in report.warnings(s):
            log.warning("%s", warning)
        if host.is_root():
            log.warning("running as root: `appliance systemd install` runs it as a service user instead")
        if layout.etcd_clustered():
            self._cluster_state = membership.join_state(s)
        self.write_conf()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._record)
        # supervisord and its programs log to /dev/fd/1. Under systemd that is
        # the journal's socket, which Linux will not reopen by path, so they
        # get a pipe that a thread copies to our stdout.
        # -P and a fixed directory: no module from the caller's working
        # directory is imported (`-m` would put it first on sys.path).
        self.proc = proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "supervisor.supervisord", "-n", "-c", str(self.conf_path)],
            cwd=layout.runtime_path(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        assert proc.stdout is not None  # stdout=PIPE
        threading.Thread(target=_relay, args=(proc.stdout.fileno(),), name="log-relay", daemon=True).start()
        log.info("supervisord %d started: %d workers on %s", proc.pid, s.node.workers, s.node.host)
        self.supervisor = rpc.connect(conf.supervisor_socket(s), self._auth)
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    return self.shutdown()
            if proc.poll() is not None:
                log.error("supervisord exited with %s", proc.returncode)
                return 1

    def reload(self) -> None:
        try:
            new = self._load()
        except Exception as exc:  # keep running on the old config
            log.error("reload refused, keeping the running config: %s", exc)
            return
        old, old_workers = self.settings, self.settings.node.workers
        self.settings = new
        self.write_conf()
        try:
            added, changed, removed = self.supervisor.reloadConfig()[0]
            if removed:
                left = rpc.stop_all(self.supervisor, removed, new.node.stop_grace)
                if left:
                    log.warning("still stopping: %s", ", ".join(left))
                for name in removed:
                    self.supervisor.removeProcessGroup(name)
            for name in added:
                self.supervisor.addProcessGroup(name)
            if changed:
                log.warning("changed programs need `systemctl restart` to apply: %s", ", ".join(changed))
            if _section_changes(old, new) - {"node.workers"}:
                self._rolling_restart(old, new, kept=min(old_workers, new.node.workers))
        except Exception as exc:
            log.error("reload failed: %s", exc)
            return
        log.info("reloaded: workers %d -> %d", old_workers, new.node.workers)

    def _rolling_restart(self, old: Settings, new: Settings, kept: int) -> None:
        """Apply changed settings to running workers one at a time, each
        stopped gracefully (it hands its cache to the others) and back in
        every ring before the next goes (it peeks at what it handed off)."""
        changes = sorted(_section_changes(old, new) - {"node.workers"})
        if any(c.startswith("cluster.") for c in changes):
            log.warning("cluster settings changed (%s): they need `systemctl restart`", ", ".join(changes))
            return
        log.info("settings changed (%s): restarting workers one at a time", ", ".join(changes))
        rpc.stop_all(self.supervisor, ["controller"], conf.CONTROLLER_STOP_GRACE)
        self.supervisor.startProcess("controller", True)
        # A running worker keeps the stop grace it was started with (supervisord
        # applies a changed program only on restart): wait for the longer one.
        grace = max(old.node.stop_grace, new.node.stop_grace)
        for index in range(kept):
            name = conf.worker_name(index)
            if rpc.stop_all(self.supervisor, [name], grace):
                log.warning("%s did not stop in time; not restarting it", name)
                continue
            self.supervisor.startProcess(name, True)
            running = rpc.states(self.supervisor)
            others = [i for i in range(kept) if i != index and running.get(conf.worker_name(i)) == "RUNNING"]
            if not _wait_in_ring(new, index, timeout=new.cluster.lease_ttl + 10, others=others):
                log.warning("%s did not rejoin every ring in time; continuing", name)

    def shutdown(self) -> int:
        s, proc = self.settings, self.proc
        assert proc is not None, "shutdown() before run()"
        try:
            current = rpc.states(self.supervisor)
            workers = sorted(n for n in current if n.startswith("worker-"))
            left = rpc.stop_all(self.supervisor, workers, s.node.stop_grace)
            if left:
                log.warning("workers still stopping at timeout: %s", ", ".join(left))
            for name, grace in (("controller", conf.CONTROLLER_STOP_GRACE), ("etcd", conf.ETCD_STOP_GRACE)):
                if name in current:
                    rpc.stop_all(self.supervisor, [name], grace)
            self.supervisor.shutdown()
        except Exception as exc:
            log.error("orderly shutdown failed (%s); terminating supervisord", exc)
            proc.terminate()
        try:
            proc.wait(SUPERVISORD_EXIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("stopped")
        return 0
