"""`appliance systemd install` and the unit file."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import systemd
from appliance.systemd import (
    DEFAULT_USER,
    REPO_EXEC_PATH,
    SYSTEM_CONFIG_PATH,
    InstallError,
    install,
    render_unit,
)

ROOT = Path(__file__).resolve().parents[2]
REPO_UNIT = ROOT / "systemd" / "appliance.service"
APPLIANCE_BIN = Path(sys.executable).parent / "appliance"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its mode, mtime and inode."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, st.st_ino)
    return out


@pytest.fixture(autouse=True)
def no_host_effects(monkeypatch):
    """No test may create users, run commands or talk to systemd on the host."""

    def refuse(cmd):
        raise AssertionError(f"unexpected command {cmd}")

    monkeypatch.setattr(systemd, "_run", refuse)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)


# render_unit ---------------------------------------------------------------


def test_repo_unit_is_the_rendering_for_the_documented_paths():
    # systemd/appliance.service is the reviewed artefact: regenerate it with
    #   .venv/bin/python -c "from appliance.systemd import *; open('systemd/appliance.service','w').write(render_unit(REPO_EXEC_PATH))"
    # REPO_EXEC_PATH is /opt/appliance/.venv/bin/appliance: a checkout in
    # /opt/appliance after `make`.
    assert REPO_EXEC_PATH == "/opt/appliance/.venv/bin/appliance"
    assert REPO_UNIT.read_text() == render_unit(REPO_EXEC_PATH, SYSTEM_CONFIG_PATH, DEFAULT_USER)


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_has_the_required_settings():
    s = unit_settings(render_unit("/opt/x/bin/appliance", "/etc/appliance/appliance.toml", "cache"))
    expected = {
        "Type": "exec",
        "ExecStart": "/opt/x/bin/appliance run --config /etc/appliance/appliance.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "User": "cache",
        "Group": "cache",
        "KillMode": "mixed",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "90s",
        "StateDirectory": "appliance",
        "RuntimeDirectory": "appliance",
        "RuntimeDirectoryPreserve": "no",
        "ConfigurationDirectory": "appliance",
        "Environment": "PYTHONUNBUFFERED=1",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "UMask": "0027",
        "LimitNOFILE": "65536",
        "WantedBy": "multi-user.target",
        "After": "network-online.target",
        "Wants": "network-online.target",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    assert "MemoryDenyWriteExecute" not in s


def test_render_quotes_and_escapes_paths():
    text = render_unit("/opt/my app/bin/appliance", "/etc/a%b/$x.toml", "appliance")
    assert 'ExecStart="/opt/my app/bin/appliance" run --config /etc/a%%b/$$x.toml\n' in text


@pytest.mark.parametrize(
    "args",
    [
        ("bin/appliance", SYSTEM_CONFIG_PATH, "appliance"),
        ("/opt/appliance", "etc/appliance.toml", "appliance"),
        ("/opt/app\nliance", SYSTEM_CONFIG_PATH, "appliance"),
        ("/opt/appliance", SYSTEM_CONFIG_PATH, "Root"),
        ("/opt/appliance", SYSTEM_CONFIG_PATH, "x\nExecStartPre=/bin/sh"),
    ],
)
def test_render_rejects_bad_input(args):
    with pytest.raises(ValueError):
        render_unit(*args)


def analyze_problems(unit: Path) -> tuple[int, list[str]]:
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    bad = ("unknown", "invalid", "failed", "ignoring", "not executable", "error")
    lines = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [ln for ln in lines if any(b in ln.lower() for b in bad)]


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)",
)


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    exe = tmp_path / "bin" / "appliance"
    exe.parent.mkdir()
    shutil.copy("/bin/true", exe)
    unit = tmp_path / "appliance.service"
    unit.write_text(render_unit(str(exe), SYSTEM_CONFIG_PATH, DEFAULT_USER))
    rc, problems = analyze_problems(unit)
    assert rc == 0 and problems == []


@needs_analyze
def test_systemd_analyze_verify_catches_mistakes(tmp_path):
    # The check above is only worth something if verify reports bad units.
    exe = tmp_path / "appliance"
    shutil.copy("/bin/true", exe)
    unit = tmp_path / "appliance.service"
    unit.write_text(render_unit(str(exe)).replace("ProtectSystem=strict", "ProtectSytem=strict"))
    rc, problems = analyze_problems(unit)
    assert any("ProtectSytem" in p for p in problems)


# install into a staging root -------------------------------------------------


def test_install_creates_files_with_modes(tmp_path):
    lines = install(tmp_path)
    etc = tmp_path / "etc/appliance"
    config = etc / "appliance.toml"
    state = tmp_path / "var/lib/appliance"
    unit = tmp_path / "etc/systemd/system/appliance.service"
    assert mode(etc) == 0o755
    assert mode(config) == 0o640
    assert mode(state) == 0o750
    assert mode(unit) == 0o644
    assert config.read_bytes() == (ROOT / "appliance/defaults/appliance.toml").read_bytes() or (
        config.read_bytes() == (ROOT / "appliance/defaults/appliance.example.toml").read_bytes()
    )
    assert unit.read_text() == render_unit(str(APPLIANCE_BIN), SYSTEM_CONFIG_PATH, DEFAULT_USER)
    assert any(ln.startswith("skipped user creation (prefix is not /)") for ln in lines)
    assert "4 change(s) made" in lines
    assert not any("nothing changed" in ln for ln in lines)
    assert not any(".tmp" in p.name for p in tmp_path.rglob("*"))


def test_second_install_changes_nothing(tmp_path):
    install(tmp_path)
    before = snapshot(tmp_path)
    lines = install(tmp_path)
    assert snapshot(tmp_path) == before
    assert "nothing changed: already installed" in lines
    actions = lines[: lines.index("nothing changed: already installed")]
    assert actions and all(ln.startswith(("unchanged", "kept existing", "skipped")) for ln in actions), actions


def test_existing_config_is_kept(tmp_path):
    config = tmp_path / "etc/appliance/appliance.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# mine\n")
    src = tmp_path / "other.toml"
    src.write_text("[node]\nworkers = 2\n")
    lines = install(tmp_path, config_source=str(src))
    assert config.read_text() == "# mine\n"
    assert f"kept existing {config} (--config-source {src} not used)" in lines


def test_config_source_is_used_and_validated(tmp_path):
    src = tmp_path / "src.toml"
    src.write_text("[node]\nworkers = 2\n")
    root = tmp_path / "root"
    root.mkdir()
    install(root, config_source=src)
    assert (root / "etc/appliance/appliance.toml").read_text() == src.read_text()

    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nworkerz = 2\n")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(InstallError, match="workerz"):
        install(other, config_source=bad)
    assert not (other / "etc/appliance/appliance.toml").exists()
    with pytest.raises(InstallError, match="cannot read --config-source"):
        install(other, config_source=tmp_path / "missing.toml")


def test_changed_unit_is_rewritten(tmp_path):
    install(tmp_path)
    unit = tmp_path / "etc/systemd/system/appliance.service"
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    lines = install(tmp_path)
    assert unit.read_text() == render_unit(str(APPLIANCE_BIN))
    assert any(ln.startswith(f"updated {unit}") for ln in lines)
    assert "1 change(s) made" in lines


def test_bad_arguments(tmp_path):
    with pytest.raises(InstallError, match="user name"):
        install(tmp_path, user="Bad User")
    with pytest.raises(InstallError, match="not a directory"):
        install(tmp_path / "missing")


def test_host_install_needs_root(monkeypatch):
    monkeypatch.setattr(systemd, "_is_root", lambda: False)
    with pytest.raises(InstallError, match="run it as root"):
        install(Path("/"))


# install on "the host" (a tmp dir standing in for /) ------------------------


class FakeHost:
    def __init__(self, monkeypatch, root: Path, *, user_exists: bool, systemd_running: bool = True):
        self.commands: list[list[str]] = []
        self.chowns: list[tuple[str, int, int]] = []
        self.user = pwd.struct_passwd(("appliance", "x", 990, 991, "", "/var/lib/appliance", "/usr/sbin/nologin"))
        self.exists = user_exists
        monkeypatch.setattr(systemd, "_is_host_root", lambda prefix: Path(prefix) == root)
        monkeypatch.setattr(systemd, "_is_root", lambda: True)
        monkeypatch.setattr(systemd, "_lookup_user", lambda name: self.user if self.exists else None)
        monkeypatch.setattr(systemd, "_group_exists", lambda name: False)
        monkeypatch.setattr(systemd, "_systemd_running", lambda: systemd_running)
        monkeypatch.setattr(systemd, "_run", self.run)
        monkeypatch.setattr(systemd, "_chown", lambda p, u, g: self.chowns.append((str(p), u, g)))
        monkeypatch.setattr(os, "fchown", lambda fd, u, g: self.chowns.append(("<config>", u, g)))

    def run(self, cmd):
        self.commands.append(cmd)
        if os.path.basename(cmd[0]) == "useradd":
            self.exists = True
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_host_install_creates_user_and_reloads_once(monkeypatch, tmp_path):
    host = FakeHost(monkeypatch, tmp_path, user_exists=False)
    lines = install(tmp_path)
    useradd = host.commands[0]
    assert os.path.basename(useradd[0]) == "useradd"
    assert useradd[1:] == [
        "--system", "--user-group", "--no-create-home", "--home-dir", "/var/lib/appliance",
        "--shell", useradd[-2], "appliance",
    ]  # fmt: skip
    assert useradd[-2].endswith("/nologin")
    assert host.commands[1:] == [["systemctl", "daemon-reload"]]
    assert ("<config>", 0, 991) in host.chowns  # root:appliance, 0640
    assert (str(tmp_path / "var/lib/appliance"), 990, 991) in host.chowns
    assert "created system user and group appliance (uid 990)" in lines
    assert "ran systemctl daemon-reload" in lines
    assert lines[-1] == "start it with: systemctl enable --now appliance"

    host.commands.clear()
    lines = install(tmp_path)
    assert host.commands == []  # no useradd, no daemon-reload: nothing changed
    assert "nothing changed: already installed" in lines
    assert "unchanged: user appliance exists (uid 990)" in lines


def test_host_install_without_systemd(monkeypatch, tmp_path):
    host = FakeHost(monkeypatch, tmp_path, user_exists=True, systemd_running=False)
    lines = install(tmp_path)
    assert host.commands == []
    assert "systemd is not running here: skipped systemctl daemon-reload" in lines


def test_useradd_failure_is_an_install_error(monkeypatch, tmp_path):
    FakeHost(monkeypatch, tmp_path, user_exists=False)
    monkeypatch.setattr(systemd, "_run", lambda cmd: subprocess.CompletedProcess(cmd, 9, "", "useradd: boom"))
    with pytest.raises(InstallError, match="cannot create user appliance: .*useradd: boom"):
        install(tmp_path)


# the CLI -------------------------------------------------------------------


@pytest.mark.skipif(not APPLIANCE_BIN.exists(), reason=f"{APPLIANCE_BIN} is not installed (pip install -e .)")
def test_cli_install_twice(tmp_path):
    cmd = [str(APPLIANCE_BIN), "systemd", "install", "--root", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert first.returncode == 0, first.stderr
    assert f"wrote {tmp_path}/etc/systemd/system/appliance.service" in first.stdout
    before = snapshot(tmp_path)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert second.returncode == 0, second.stderr
    assert "nothing changed: already installed" in second.stdout
    assert snapshot(tmp_path) == before
