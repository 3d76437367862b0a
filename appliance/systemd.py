"""systemd integration: the unit file and `appliance systemd install`.

Public API:

- ``render_unit(exec_path, config_path, user)``: the text of
  ``appliance.service``. ``systemd/appliance.service`` in the repository is
  this rendering for ``REPO_EXEC_PATH``, ``SYSTEM_CONFIG_PATH`` and
  ``DEFAULT_USER`` (a unit test keeps the two identical), so the reviewed
  file and the installed one cannot drift apart.
- ``install(prefix, user, config_source)``: create the system user, the
  config, state directory and unit under ``prefix`` and return one line per
  step for the CLI to print. Idempotent: a second run changes nothing and
  says so. Never overwrites an existing config.
- ``InstallError``: a problem the user can fix (not root, bad user name,
  missing config source, ``useradd`` failed). ``str()`` is the whole message.
"""

from __future__ import annotations

import grp
import importlib.resources
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_USER",
    "REPO_EXEC_PATH",
    "SYSTEM_CONFIG_PATH",
    "UNIT_NAME",
    "InstallError",
    "find_exec_path",
    "install",
    "render_unit",
]

UNIT_NAME = "appliance.service"
DEFAULT_USER = "appliance"
SYSTEM_CONFIG_PATH = "/etc/appliance/appliance.toml"
# The documented layout the repository's systemd/appliance.service is rendered
# for: the repository checked out in /opt/appliance and `make` run there,
# which creates /opt/appliance/.venv (see the Makefile).
REPO_EXEC_PATH = "/opt/appliance/.venv/bin/appliance"

STATE_DIR = "var/lib/appliance"  # the unit's StateDirectory=appliance
CONFIG_DIR = "etc/appliance"  # the unit's ConfigurationDirectory=appliance
UNIT_DIR = "etc/systemd/system"
# Config installed when none exists and no --config-source is given: the
# annotated example if the package ships it, else the built-in default.
DEFAULT_CONFIG_RESOURCES = ("defaults/appliance.example.toml", "defaults/appliance.toml")

DIR_MODE_CONFIG = 0o755
DIR_MODE_STATE = 0o750
# The config may hold secrets (etcd_password, HTTP headers): readable by root
# and the service's group only.
FILE_MODE_CONFIG = 0o640
FILE_MODE_UNIT = 0o644


class InstallError(Exception):
    """``appliance systemd install`` cannot proceed; ``str()`` is the message."""


UNIT_TEMPLATE = """\
# groupcache-appliance: a distributed read-through cache.
#
# Written by `appliance systemd install`, which rewrites this file: put local
# changes in a drop-in (`systemctl edit appliance`). The copy in the
# repository (systemd/appliance.service) is rendered for a checkout in
# /opt/appliance with its virtualenv in /opt/appliance/.venv.

[Unit]
Description=groupcache appliance (distributed read-through cache)
# Workers bind node.host and may reach an external etcd: wait for the network.
After=network-online.target
Wants=network-online.target

[Service]
# `appliance run` stays in the foreground and does not speak sd_notify:
# "exec" reports a failure to start the binary, nothing more.
Type=exec
User={user}
Group={user}
ExecStart={exec_path} run --config {config_path}
# SIGHUP re-reads the config and applies a new worker count; workers that
# stay keep running.
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2s
# SIGTERM goes to `appliance run` only, which stops the workers gracefully
# (lease revoked, ring updated, in-flight requests served), then the
# controller and etcd, and exits once supervisord has. SIGKILL then goes to
# whatever is left in the cgroup (or to all of it at TimeoutStopSec).
KillMode=mixed
KillSignal=SIGTERM
# Worst case of `run`'s ordered stop: workers (drain 10s + grace 5s + 5s),
# controller and etcd (10s each), supervisord exit; with a margin. Raise it in a drop-in if you raise those settings.
TimeoutStopSec=90s

# /var/lib/appliance ($STATE_DIRECTORY: etcd data, SQLite origins) and
# /run/appliance ($RUNTIME_DIRECTORY: supervisor and admin sockets) are
# created for and owned by User=; `appliance run` uses them when set.
StateDirectory=appliance
StateDirectoryMode=0750
# The admin sockets must not be reachable by other users.
RuntimeDirectory=appliance
RuntimeDirectoryMode=0750
RuntimeDirectoryPreserve=no
# /etc/appliance stays owned by root and read-only for the service.
ConfigurationDirectory=appliance
Environment=PYTHONUNBUFFERED=1
UMask=0027
# Every worker, etcd and supervisord hold a socket per client and peer.
LimitNOFILE=65536

# Hardening: the service writes only its state and runtime directories,
# needs no privileges and no capabilities.
NoNewPrivileges=yes
# Read-only /usr, /etc and the rest, except the directories above.
ProtectSystem=strict
# The virtualenv must not live under /home or /root (they are hidden).
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# MemoryDenyWriteExecute= is left out on purpose: libffi closures (ctypes and
# cffi callbacks, used by database drivers and user-supplied origins) need
# writable+executable memory and would fail at run time.
# gRPC, etcd and the origins need TCP; supervisord and the admin API use unix
# sockets. Without AF_NETLINK glibc's getaddrinfo() falls back safely.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
# No capabilities: ports below 1024 would need CAP_NET_BIND_SERVICE here and
# in AmbientCapabilities= (in a drop-in).
CapabilityBoundingSet=
AmbientCapabilities=

[Install]
WantedBy=multi-user.target
"""

_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}")


def _unit_path_arg(path: str, what: str) -> str:
    """``path`` as one word of a unit's command line (quoted, ``%``/``$`` escaped)."""
    if not os.path.isabs(path):
        raise ValueError(f"{what} must be an absolute path, got {path!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"{what} must not contain control characters, got {path!r}")
    word = path.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_user(user: str) -> None:
    if not _USER_RE.fullmatch(user):
        raise ValueError(
            f"user must be a system user name (lower case letters, digits, '_' and '-', "
            f"at most 31 characters, not starting with a digit or '-'), got {user!r}"
        )


def render_unit(exec_path: str, config_path: str = SYSTEM_CONFIG_PATH, user: str = DEFAULT_USER) -> str:
    """The text of ``appliance.service``. Raises ``ValueError`` for a relative
    path, control characters or an invalid user name."""
    _check_user(user)
    return UNIT_TEMPLATE.format(
        exec_path=_unit_path_arg(str(exec_path), "the appliance executable"),
        config_path=_unit_path_arg(str(config_path), "the config path"),
        user=user,
    )


def find_exec_path() -> str:
    """The ``appliance`` script of this installation: next to ``sys.executable``
    (the virtualenv's bin), else the one on ``$PATH``.

    ``sys.executable`` is not resolved: a virtualenv's python is a symlink
    to the system interpreter, whose directory has no ``appliance``.
    """
    beside = Path(os.path.abspath(sys.executable)).parent / "appliance"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("appliance")
    if found:
        return os.path.abspath(found)
    raise InstallError(
        f"cannot find the `appliance` executable (not in {beside.parent} nor on $PATH); "
        "install the package (pip install .) into the environment you run this from"
    )


# Seams for the tests (the host's users, commands and systemd) -------------


def _is_root() -> bool:
    return os.geteuid() == 0


def _lookup_user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _systemd_running() -> bool:
    return shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()


def _chown(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)


# install -------------------------------------------------------------------


@dataclass
class _Report:
    lines: list[str] = field(default_factory=list)
    changes: int = 0

    def changed(self, line: str) -> None:
        self.changes += 1
        self.lines.append(line)

    def same(self, line: str) -> None:
        self.lines.append(line)


def _is_host_root(prefix: Path) -> bool:
    return prefix.resolve() == Path("/")


def _config_source(config_source: str | os.PathLike[str] | None) -> tuple[str, bytes]:
    if config_source is not None:
        src = Path(config_source).expanduser()
        try:
            data = src.read_bytes()
        except OSError as exc:
            raise InstallError(f"cannot read --config-source {src}: {exc.strerror or exc}") from None
        from .config import ConfigError, load_settings

        try:
            load_settings(src)
        except ConfigError as exc:
            raise InstallError(f"--config-source {src} is not a valid config:\n{exc}") from None
        return str(src), data
    pkg = importlib.resources.files("appliance")
    for name in DEFAULT_CONFIG_RESOURCES:
        ref = pkg.joinpath(name)
        if ref.is_file():
            return f"the built-in appliance/{name}", ref.read_bytes()
    raise InstallError("the package ships no default config (appliance/defaults/appliance.toml is missing)")


def _ensure_user(user: str, report: _Report) -> pwd.struct_passwd:
    entry = _lookup_user(user)
    if entry is not None:
        report.same(f"unchanged: user {user} exists (uid {entry.pw_uid})")
        return entry
    useradd = shutil.which("useradd") or next(
        (p for p in ("/usr/sbin/useradd", "/sbin/useradd") if os.access(p, os.X_OK)), None
    )
    if useradd is None:
        raise InstallError(f"user {user} does not exist and useradd is not installed: create it, then run this again")
    shell = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/usr/sbin/nologin")
    # --user-group fails when the group already exists: join that group then.
    group_opt = ["--gid", user] if _group_exists(user) else ["--user-group"]
    cmd = [useradd, "--system", *group_opt, "--no-create-home", "--home-dir", "/" + STATE_DIR, "--shell", shell, user]
    proc = _run(cmd)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip() or f"exit status {proc.returncode}"
        raise InstallError(f"cannot create user {user}: {' '.join(cmd)}: {detail}")
    entry = _lookup_user(user)
    if entry is None:
        raise InstallError(f"useradd reported success but user {user} does not exist")
    report.changed(f"created system user and group {user} (uid {entry.pw_uid})")
    return entry


def _ensure_dir(path: Path, mode: int, report: _Report, owner: tuple[int, int] | None = None) -> None:
    if path.is_dir():
        report.same(f"unchanged: {path}/ exists (mode {stat.S_IMODE(path.stat().st_mode):04o})")
        return
    if path.exists() or path.is_symlink():
        raise InstallError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode)
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    if owner is not None:
        _chown(path, *owner)
    report.changed(f"created {path}/ (mode {mode:04o})")


def _write_new_file(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> bool:
    """Create ``path`` with ``data``; False (and nothing written) if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _write_if_changed(path: Path, text: str, mode: int) -> str | None:
    """Atomically (re)write ``path``; None when it already holds ``text``."""
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return None
        verb = "updated"
    except FileNotFoundError:
        verb = "wrote"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return verb


def install(
    prefix: Path = Path("/"),
    user: str = DEFAULT_USER,
    config_source: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Install the appliance as a systemd service under ``prefix``.

    With prefix ``/`` (the host; needs root): create the system user, the
    config, ``/var/lib/appliance`` and the unit, then ``systemctl
    daemon-reload`` if the unit changed and systemd runs. With any other
    prefix (packaging, tests): the same files under it, no user, no
    ownership changes, no systemctl. Returns the lines to print.
    """
    prefix = Path(prefix)
    try:
        _check_user(user)
    except ValueError as exc:
        raise InstallError(str(exc)) from None
    host = _is_host_root(prefix)
    if host and not _is_root():
        raise InstallError(
            "systemd install creates a system user and writes /etc: run it as root "
            "(sudo), or pass --root DIR to stage the files under DIR"
        )
    if not prefix.is_dir():
        raise InstallError(f"--root {prefix} is not a directory")
    exec_path = find_exec_path()
    try:
        unit = render_unit(exec_path, SYSTEM_CONFIG_PATH, user)
    except ValueError as exc:
        raise InstallError(str(exc)) from None

    report = _Report()
    notes: list[str] = []
    try:
        config_owner = state_owner = None
        if host:
            entry = _ensure_user(user, report)
            config_owner = (0, entry.pw_gid)
            state_owner = (entry.pw_uid, entry.pw_gid)
        else:
            report.same(f"skipped user creation (prefix is not /): the target system needs user {user}")

        config_dir = prefix / CONFIG_DIR
        _ensure_dir(config_dir, DIR_MODE_CONFIG, report)
        config = config_dir / "appliance.toml"
        if config.exists() or config.is_symlink():
            extra = f" (--config-source {config_source} not used)" if config_source is not None else ""
            report.same(f"kept existing {config}{extra}")
        else:
            source, data = _config_source(config_source)
            if _write_new_file(config, data, FILE_MODE_CONFIG, config_owner):
                report.changed(f"installed {config} (mode {FILE_MODE_CONFIG:04o}) from {source}")
            else:
                report.same(f"kept existing {config}")

        _ensure_dir(prefix / STATE_DIR, DIR_MODE_STATE, report, state_owner)

        unit_dir = prefix / UNIT_DIR
        unit_dir.mkdir(parents=True, exist_ok=True)
        unit_path = unit_dir / UNIT_NAME
        verb = _write_if_changed(unit_path, unit, FILE_MODE_UNIT)
        if verb is None:
            report.same(f"unchanged: {unit_path}")
        else:
            report.changed(f"{verb} {unit_path} (ExecStart={exec_path})")
    except OSError as exc:
        raise InstallError(f"{exc.filename or prefix}: {exc.strerror or exc}") from None

    if exec_path.startswith(("/home/", "/root/")):
        notes.append(
            f"warning: {exec_path} is under /home or /root, which ProtectHome=yes hides from the "
            "service; install the appliance elsewhere (e.g. /opt/appliance) or relax ProtectHome= in a drop-in"
        )
    if host:
        if not _systemd_running():
            notes.append("systemd is not running here: skipped systemctl daemon-reload")
        elif verb is not None:
            proc = _run(["systemctl", "daemon-reload"])
            if proc.returncode != 0:
                detail = (proc.stderr or proc.stdout or "").strip() or f"exit status {proc.returncode}"
                raise InstallError(f"systemctl daemon-reload failed: {detail}")
            report.changed("ran systemctl daemon-reload")
        notes.append("start it with: systemctl enable --now appliance")
    else:
        notes.append(f"staged under {prefix}; on the target run: systemctl daemon-reload && systemctl enable --now appliance")

    summary = "nothing changed: already installed" if report.changes == 0 else f"{report.changes} change(s) made"
    return report.lines + [summary] + notes
