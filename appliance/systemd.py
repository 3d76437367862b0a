"""systemd integration: the unit file and `appliance systemd install`.

Public API:

- ``render_unit(exec_path, config_path, user, node)``: the text of
  ``appliance.service``, from the template ``appliance/defaults/
  appliance.service.in``. ``systemd/appliance.service`` in the repository
  is this rendering for ``REPO_EXEC_PATH``, ``SYSTEM_CONFIG_PATH``,
  ``DEFAULT_USER`` and the default node settings (a unit test keeps the two
  identical), so the reviewed file and the installed one cannot drift apart.
- ``install(prefix, user, config_source, host=...)``: create the system user,
  the config, state directory and unit under ``prefix`` and return one line
  per step for the CLI to print. Idempotent: a second run changes nothing
  and says so. Never overwrites an existing config. Everything it asks of
  the machine goes through ``host`` (``appliance.host.SystemHost`` by default).
- ``InstallError``: a problem the user can fix (not root, bad user name,
  missing config source, ``useradd`` failed). ``str()`` is the whole message.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import SYSTEM_CONFIG, ConfigError, NodeSettings, load_settings
from .config.dirs import SYSTEM_STATE_DIR
from .host import Host, SystemHost

__all__ = [
    "DEFAULT_USER",
    "REPO_EXEC_PATH",
    "SYSTEM_CONFIG_PATH",
    "UNIT_NAME",
    "InstallError",
    "find_exec_path",
    "install",
    "render_unit",
    "timeout_stop",
]

UNIT_NAME = "appliance.service"
UNIT_TEMPLATE = "defaults/appliance.service.in"  # package resource
DEFAULT_USER = "appliance"
SYSTEM_CONFIG_PATH = str(SYSTEM_CONFIG)
# The documented layout the repository's systemd/appliance.service is rendered
# for: the repository checked out in /opt/appliance and `make` run there,
# which creates /opt/appliance/.venv (see the Makefile).
REPO_EXEC_PATH = "/opt/appliance/.venv/bin/appliance"

# Relative to the install prefix.
STATE_DIR = SYSTEM_STATE_DIR.relative_to("/")  # the unit's StateDirectory=appliance
CONFIG_DIR = SYSTEM_CONFIG.parent.relative_to("/")  # the unit's ConfigurationDirectory=appliance
UNIT_DIR = Path("etc/systemd/system")
# Config installed when none exists and no --config-source is given: the
# annotated example if the package ships it, else the built-in default.
DEFAULT_CONFIG_RESOURCES = ("defaults/appliance.example.toml", "defaults/appliance.toml")

DIR_MODE_CONFIG = 0o755
DIR_MODE_STATE = 0o700
# The config may hold secrets (etcd_password, HTTP headers): readable by root
# and the service's group only.
FILE_MODE_CONFIG = 0o640
FILE_MODE_UNIT = 0o644
# TimeoutStopSec beyond the longest ordered stop of `appliance run`.
STOP_TIMEOUT_MARGIN = 10


class InstallError(Exception):
    """``appliance systemd install`` cannot proceed; ``str()`` is the message."""


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


def timeout_stop(node: NodeSettings) -> int:
    """The unit's TimeoutStopSec for these node settings: more than the
    longest ordered stop of `appliance run` (see ``shutdown_time``)."""
    from .box_run import shutdown_time  # here: the CLI need not load supervisor's modules

    return math.ceil(shutdown_time(node)) + STOP_TIMEOUT_MARGIN


def render_unit(
    exec_path: str,
    config_path: str = SYSTEM_CONFIG_PATH,
    user: str = DEFAULT_USER,
    node: NodeSettings | None = None,
) -> str:
    """The text of ``appliance.service``; ``node`` (default: the defaults)
    sets TimeoutStopSec. Raises ``ValueError`` for a relative path, control
    characters or an invalid user name."""
    _check_user(user)
    template = importlib.resources.files("appliance").joinpath(UNIT_TEMPLATE).read_text()
    return template.format(
        exec_path=_unit_path_arg(str(exec_path), "the appliance executable"),
        config_path=_unit_path_arg(str(config_path), "the config path"),
        user=user,
        timeout_stop=timeout_stop(node if node is not None else NodeSettings()),
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


def _config_source(config_source: str | os.PathLike[str] | None) -> tuple[str, bytes]:
    if config_source is not None:
        src = Path(config_source).expanduser()
        try:
            data = src.read_bytes()
        except OSError as exc:
            raise InstallError(f"cannot read --config-source {src}: {exc.strerror or exc}") from None
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


def _node_settings(config: Path, notes: list[str]) -> NodeSettings:
    """The installed config's node settings (they set TimeoutStopSec)."""
    try:
        return load_settings(config).node
    except ConfigError as exc:
        first = str(exc).splitlines()[0]
        notes.append(
            f"warning: {config} does not load ({first}); TimeoutStopSec is worked out for the default "
            "drain_timeout and peer_timeout: fix the config and run this again"
        )
        return NodeSettings()


def _ensure_user(host: Host, user: str, report: _Report) -> tuple[int, int]:
    """The (uid, gid) of the service user, created if missing."""
    entry = host.lookup_user(user)
    if entry is not None:
        report.same(f"unchanged: user {user} exists (uid {entry.pw_uid})")
        return entry.pw_uid, entry.pw_gid
    useradd = host.find_program("useradd")
    if useradd is None:
        raise InstallError(f"user {user} does not exist and useradd is not installed: create it, then run this again")
    shell = host.find_program("nologin") or "/usr/sbin/nologin"
    # --user-group fails when the group already exists: join that group then.
    group_opt = ["--gid", user] if host.group_exists(user) else ["--user-group"]
    home = str(SYSTEM_STATE_DIR)
    cmd = [useradd, "--system", *group_opt, "--no-create-home", "--home-dir", home, "--shell", shell, user]
    proc = host.run(cmd)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip() or f"exit status {proc.returncode}"
        raise InstallError(f"cannot create user {user}: {' '.join(cmd)}: {detail}")
    entry = host.lookup_user(user)
    if entry is None:
        raise InstallError(f"useradd reported success but user {user} does not exist")
    report.changed(f"created system user and group {user} (uid {entry.pw_uid})")
    return entry.pw_uid, entry.pw_gid


def _ensure_dir(host: Host, path: Path, mode: int, report: _Report, owner: tuple[int, int] | None = None) -> None:
    if path.is_dir():
        report.same(f"unchanged: {path}/ exists (mode {stat.S_IMODE(path.stat().st_mode):04o})")
        return
    if path.exists() or path.is_symlink():
        raise InstallError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode)
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    if owner is not None:
        host.chown(path, *owner)
    report.changed(f"created {path}/ (mode {mode:04o})")


def _write_new_file(host: Host, path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> bool:
    """Create ``path`` with ``data``; False (and nothing written) if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                host.chown(f.fileno(), *owner)  # before the data: it may hold secrets
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
    *,
    host: Host | None = None,
) -> list[str]:
    """Install the appliance as a systemd service under ``prefix``.

    With prefix ``/`` (the host's root; needs root): create the system user,
    the config, ``/var/lib/appliance`` and the unit, then ``systemctl
    daemon-reload`` if the unit changed and systemd runs. With any other
    prefix (packaging, tests): the same files under it, no user, no
    ownership changes, no systemctl. Returns the lines to print.
    """
    host = host if host is not None else SystemHost()
    prefix = Path(prefix)
    try:
        _check_user(user)
    except ValueError as exc:
        raise InstallError(str(exc)) from None
    on_host = prefix.resolve() == host.root.resolve()
    if on_host and not host.is_root():
        raise InstallError(
            "systemd install creates a system user and writes /etc: run it as root "
            "(sudo), or pass --root DIR to stage the files under DIR"
        )
    if not prefix.is_dir():
        raise InstallError(f"--root {prefix} is not a directory")
    exec_path = find_exec_path()
    try:
        render_unit(exec_path, SYSTEM_CONFIG_PATH, user)  # refuse bad paths before writing anything
    except ValueError as exc:
        raise InstallError(str(exc)) from None

    report = _Report()
    notes: list[str] = []
    try:
        config_owner = state_owner = None
        if on_host:
            uid, gid = _ensure_user(host, user, report)
            config_owner, state_owner = (0, gid), (uid, gid)
        else:
            report.same(f"skipped user creation (prefix is not /): the target system needs user {user}")

        config_dir = prefix / CONFIG_DIR
        _ensure_dir(host, config_dir, DIR_MODE_CONFIG, report)
        config = config_dir / SYSTEM_CONFIG.name
        if config.exists() or config.is_symlink():
            extra = f" (--config-source {config_source} not used)" if config_source is not None else ""
            report.same(f"kept existing {config}{extra}")
        else:
            source, data = _config_source(config_source)
            if _write_new_file(host, config, data, FILE_MODE_CONFIG, config_owner):
                report.changed(f"installed {config} (mode {FILE_MODE_CONFIG:04o}) from {source}")
            else:
                report.same(f"kept existing {config}")

        _ensure_dir(host, prefix / STATE_DIR, DIR_MODE_STATE, report, state_owner)

        unit = render_unit(exec_path, SYSTEM_CONFIG_PATH, user, _node_settings(config, notes))
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
    if on_host:
        if not host.systemd_running():
            notes.append("systemd is not running here: skipped systemctl daemon-reload")
        elif verb is not None:
            proc = host.run(["systemctl", "daemon-reload"])
            if proc.returncode != 0:
                detail = (proc.stderr or proc.stdout or "").strip() or f"exit status {proc.returncode}"
                raise InstallError(f"systemctl daemon-reload failed: {detail}")
            report.changed("ran systemctl daemon-reload")
        notes.append("start it with: systemctl enable --now appliance")
    else:
        notes.append(
            f"staged under {prefix}; on the target run: systemctl daemon-reload && systemctl enable --now appliance"
        )

    summary = "nothing changed: already installed" if report.changes == 0 else f"{report.changes} change(s) made"
    return report.lines + [summary] + notes
