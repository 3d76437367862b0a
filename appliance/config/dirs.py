"""Where the appliance keeps its state and runtime files when the config does
not say, and the names of the files it keeps there."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from .. import host

# As root (and under systemd's StateDirectory=/RuntimeDirectory=appliance).
SYSTEM_STATE_DIR = Path("/var/lib/appliance")
SYSTEM_RUNTIME_DIR = Path("/run/appliance")

# The private embedded etcd's sockets, in this subdirectory of the runtime dir
# (its working directory: etcd names a unix socket after the URL's host:port,
# relative to its cwd).
ETCD_DIR = "etcd"
ETCD_CLIENT_SOCKET = "client.sock:0"
ETCD_PEER_SOCKET = "peer.sock:0"
# The box's own token (peers and the CLI), in the state dir.
TOKEN_FILE = "auth/cluster.token"

# Worker i's admin socket in the runtime dir; the controller and the box's
# metrics endpoint find the workers by this name.
_ADMIN_SOCKET = "worker-{index}.sock"
_ADMIN_SOCKET_RE = re.compile(r"worker-(\d+)\.sock")


def admin_socket_name(index: int) -> str:
    return _ADMIN_SOCKET.format(index=index)


def admin_socket_glob() -> str:
    """A glob matching every worker's admin socket name."""
    return _ADMIN_SOCKET.format(index="*")


def admin_socket_index(path: str | os.PathLike[str]) -> int | None:
    """The worker index an admin socket path names, or None for another file."""
    m = _ADMIN_SOCKET_RE.fullmatch(os.path.basename(path))
    return int(m.group(1)) if m else None


def _first_dir(value: str | None) -> Path | None:
    """systemd sets $STATE_DIRECTORY to a colon-separated list; take the first."""
    if not value:
        return None
    first = value.split(":", 1)[0]
    return Path(first) if first and os.path.isabs(first) else None


def default_state_dir(environ: Mapping[str, str] | None = None, root: bool | None = None) -> Path:
    """$STATE_DIRECTORY, else /var/lib/appliance as root, else
    $XDG_STATE_HOME/appliance, else ~/.local/state/appliance."""
    env = os.environ if environ is None else environ
    root = host.is_root() if root is None else root
    p = _first_dir(env.get("STATE_DIRECTORY"))
    if p:
        return p
    if root:
        return SYSTEM_STATE_DIR
    xdg = _first_dir(env.get("XDG_STATE_HOME"))
    if xdg:
        return xdg / "appliance"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "state" / "appliance"


def default_runtime_dir(environ: Mapping[str, str] | None = None, root: bool | None = None) -> Path:
    """$RUNTIME_DIRECTORY, else /run/appliance as root, else
    $XDG_RUNTIME_DIR/appliance, else /tmp/appliance-<uid>."""
    env = os.environ if environ is None else environ
    root = host.is_root() if root is None else root
    p = _first_dir(env.get("RUNTIME_DIRECTORY"))
    if p:
        return p
    if root:
        return SYSTEM_RUNTIME_DIR
    xdg = _first_dir(env.get("XDG_RUNTIME_DIR"))
    if xdg:
        return xdg / "appliance"
    return Path(f"/tmp/appliance-{os.getuid()}")
