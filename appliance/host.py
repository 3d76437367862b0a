"""The machine the appliance is installed on: its users, programs and systemd.

``appliance systemd install`` does everything that touches the host through
a ``Host``; tests hand it a fake one. ``SystemHost`` is the real machine.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Protocol

__all__ = ["Host", "SystemHost", "is_root"]

# Where system tools live when they are not on $PATH (sudo without sbin).
_SBIN = ("/usr/sbin", "/sbin")


def is_root() -> bool:
    return os.geteuid() == 0


class Host(Protocol):
    """What installing the service asks of the machine."""

    root: Path  # the machine's "/": an install under it is a host install

    def is_root(self) -> bool: ...

    def lookup_user(self, name: str) -> pwd.struct_passwd | None: ...

    def group_exists(self, name: str) -> bool: ...

    def find_program(self, name: str) -> str | None:
        """Full path of a system program (useradd, nologin), or None."""
        ...

    def run(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        """Run a command to completion, capturing its output as text."""
        ...

    def systemd_running(self) -> bool: ...

    def chown(self, target: Path | int, uid: int, gid: int) -> None:
        """Change the owner of a path or of an open file descriptor."""
        ...


class SystemHost:
    """The real machine."""

    root = Path("/")

    def is_root(self) -> bool:
        return is_root()

    def lookup_user(self, name: str) -> pwd.struct_passwd | None:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            return None

    def group_exists(self, name: str) -> bool:
        try:
            grp.getgrnam(name)
        except KeyError:
            return False
        return True

    def find_program(self, name: str) -> str | None:
        found = shutil.which(name)
        if found:
            return found
        return next((p for d in _SBIN if os.access(p := os.path.join(d, name), os.X_OK)), None)

    def run(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    def systemd_running(self) -> bool:
        return shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()

    def chown(self, target: Path | int, uid: int, gid: int) -> None:
        os.chown(target, uid, gid)
