"""The processes a benchmark starts and the box they share: where the bench
lives and writes, child processes killed by their pid, ports, CPU seconds
from /proc, the bench's log line.

Every process a benchmark starts is a `Proc`, killed by its pid
(`Proc.kill`, and `kill_all` at exit). Everything binds 127.0.0.1.
Importing this module puts the repository on sys.path (for `appliance`).
"""

from __future__ import annotations

import atexit
import os
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


def need(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if not found:
        raise SystemExit(f"{binary} not found: install the Debian package {package} (make -C bench deps)")
    return found


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


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
