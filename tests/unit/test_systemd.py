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

from appliance.box_run import shutdown_time
from appliance.config import NodeSettings
from appliance.systemd import (
    DEFAULT_USER,
    REPO_EXEC_PATH,
    SYSTEM_CONFIG_PATH,
    InstallError,
    install,
    render_unit,
    timeout_stop,
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


class FakeHost:
    """A machine whose "/" is ``root``: it records what install asks of it.

    No test may create users, run commands or talk to systemd on the real
    host: every install here gets one of these (by default one whose root
    is not the prefix, i.e. a staging install that must ask nothing).
    """

    def __init__(
        self,
        root: Path = Path("/nonexistent-host-root"),
        *,
        user_exists: bool = True,
        root_user: bool = True,
        systemd_running: bool = True,
        run_status: int = 0,
        run_stderr: str = "",
    ):
        self.root = root
        self.commands: list[list[str]] = []
        self.chowns: list[tuple[str, int, int]] = []
        self.user = pwd.struct_passwd(("appliance", "x", 990, 991, "", "/var/lib/appliance", "/usr/sbin/nologin"))
        self.exists = user_exists
        self.root_user = root_user
        self.running = systemd_running
        self.run_status, self.run_stderr = run_status, run_stderr

    def is_root(self) -> bool:
        return self.root_user

    def lookup_user(self, name):
        return self.user if self.exists else None

    def group_exists(self, name) -> bool:
        return False

    def find_program(self, name):
        return f"/usr/sbin/{name}"

    def run(self, cmd):
        self.commands.append(cmd)
        if os.path.basename(cmd[0]) == "useradd" and self.run_status == 0:
            self.exists = True
        return subprocess.CompletedProcess(cmd, self.run_status, "", self.run_stderr)

    def systemd_running(self) -> bool:
        return self.running

    def chown(self, target, uid, gid) -> None:
        self.chowns.append(("<fd>" if isinstance(target, int) else str(target), uid, gid))


def staged(prefix: Path, **kw) -> list[str]:
    """install() into a staging root on a host that must not be touched."""
    host = FakeHost()
    lines = install(prefix, host=host, **kw)
    assert host.commands == [] and host.chowns == []
    return lines


@pytest.fixture(autouse=True)
def no_config_from_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


# render_unit ---------------------------------------------------------------


def test_repo_unit_is_the_rendering_for_the_documented_paths():
    # systemd/appliance.service is the reviewed artefact: regenerate it with
    #   .venv/bin/python -c "from appliance.systemd import *; open('systemd/appliance.service','w').write(render_unit(REPO_EXEC_PATH))"  # noqa: E501
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


# The default stop, worked out by hand: a worker gets drain 10 s + peer 5 s +
# margin 5 s = 20 s, the controller 5 s and etcd 10 s, each plus supervisord's
# 2 s kill lag (22 + 7 + 12 s), then supervisord's own exit (30 s): 71 s, and
# the unit 10 s more. With drain_timeout = 2m: 132 + 7 + 12 + 30 + 10 = 191 s.
DEFAULT_TIMEOUT_STOP = 81
DRAIN_2M_TIMEOUT_STOP = 191


@pytest.mark.parametrize("source", ["rendered", "repository copy"])
def test_unit_has_the_required_settings(source):
    if source == "rendered":
        text, exe, user = (
            render_unit("/opt/x/bin/appliance", "/etc/appliance/appliance.toml", "cache"),
            "/opt/x",
            "cache",
        )
    else:  # the reviewed file in systemd/, held to the same hand-written settings
        text, exe, user = REPO_UNIT.read_text(), "/opt/appliance/.venv", "appliance"
    s = unit_settings(text)
    expected = {
        "Type": "exec",
        "ExecStart": f"{exe}/bin/appliance run --config /etc/appliance/appliance.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "User": user,
        "Group": user,
        "KillMode": "mixed",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": f"{DEFAULT_TIMEOUT_STOP}s",
        "StateDirectory": "appliance",
        "StateDirectoryMode": "0700",
        "RuntimeDirectory": "appliance",
        "RuntimeDirectoryMode": "0700",
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
        "UMask": "0077",
        "LimitNOFILE": "65536",
        "WantedBy": "multi-user.target",
        "After": "network-online.target",
        "Wants": "network-online.target",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    assert "MemoryDenyWriteExecute" not in s


def test_timeout_stop_exceeds_the_whole_ordered_stop():
    # run stops the workers (stop_grace each, together), then the controller,
    # then etcd, then waits for supervisord: systemd must not kill it first.
    for node in (NodeSettings(), NodeSettings(drain_timeout="2m", peer_timeout="30s")):
        assert timeout_stop(node) > shutdown_time(node) > node.stop_grace
    assert timeout_stop(NodeSettings()) == DEFAULT_TIMEOUT_STOP
    text = render_unit("/opt/x/bin/appliance", node=NodeSettings(drain_timeout="2m"))
    assert unit_settings(text)["TimeoutStopSec"] == [f"{DRAIN_2M_TIMEOUT_STOP}s"]


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
    lines = staged(tmp_path)
    etc = tmp_path / "etc/appliance"
    config = etc / "appliance.toml"
    state = tmp_path / "var/lib/appliance"
    unit = tmp_path / "etc/systemd/system/appliance.service"
    assert mode(etc) == 0o755
    assert mode(config) == 0o640
    assert mode(state) == 0o700
    assert mode(unit) == 0o644
    assert config.read_bytes() == (ROOT / "appliance/defaults/appliance.example.toml").read_bytes()
    assert unit.read_text() == render_unit(str(APPLIANCE_BIN), SYSTEM_CONFIG_PATH, DEFAULT_USER)
    assert any(ln.startswith("skipped user creation (prefix is not /)") for ln in lines)
    assert "4 change(s) made" in lines
    assert not any("nothing changed" in ln for ln in lines)
    assert not any(".tmp" in p.name for p in tmp_path.rglob("*"))


def test_second_install_changes_nothing(tmp_path):
    staged(tmp_path)
    before = snapshot(tmp_path)
    lines = staged(tmp_path)
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
    lines = staged(tmp_path, config_source=str(src))
    assert config.read_text() == "# mine\n"
    assert f"kept existing {config} (--config-source {src} not used)" in lines


def test_config_source_is_used_and_validated(tmp_path):
    src = tmp_path / "src.toml"
    src.write_text("[node]\nworkers = 2\n")
    root = tmp_path / "root"
    root.mkdir()
    staged(root, config_source=src)
    assert (root / "etc/appliance/appliance.toml").read_text() == src.read_text()

    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nworkerz = 2\n")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(InstallError, match="workerz"):
        staged(other, config_source=bad)
    assert not (other / "etc/appliance/appliance.toml").exists()
    with pytest.raises(InstallError, match="cannot read --config-source"):
        staged(other, config_source=tmp_path / "missing.toml")


def test_changed_unit_is_rewritten(tmp_path):
    staged(tmp_path)
    unit = tmp_path / "etc/systemd/system/appliance.service"
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    lines = staged(tmp_path)
    assert unit.read_text() == render_unit(str(APPLIANCE_BIN))
    assert any(ln.startswith(f"updated {unit}") for ln in lines)
    assert "1 change(s) made" in lines


def test_unit_follows_the_installed_configs_drain(tmp_path):
    src = tmp_path / "slow.toml"
    src.write_text('[node]\ndrain_timeout = "2m"\n')
    root = tmp_path / "root"
    root.mkdir()
    staged(root, config_source=src)
    unit = (root / "etc/systemd/system/appliance.service").read_text()
    assert unit_settings(unit)["TimeoutStopSec"] == [f"{DRAIN_2M_TIMEOUT_STOP}s"]


def test_a_config_that_does_not_load_gets_the_default_timeout_and_a_warning(tmp_path):
    config = tmp_path / "etc/appliance/appliance.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[node]\nworkerz = 3\n")
    lines = staged(tmp_path)
    unit = (tmp_path / "etc/systemd/system/appliance.service").read_text()
    assert unit_settings(unit)["TimeoutStopSec"] == [f"{DEFAULT_TIMEOUT_STOP}s"]
    assert any(ln.startswith(f"warning: {config} does not load (") and "workerz" in ln for ln in lines), lines


def test_bad_arguments(tmp_path):
    with pytest.raises(InstallError, match="user name"):
        staged(tmp_path, user="Bad User")
    with pytest.raises(InstallError, match="not a directory"):
        staged(tmp_path / "missing")


def test_host_install_needs_root():
    host = FakeHost(Path("/"), root_user=False)
    with pytest.raises(InstallError, match="run it as root"):
        install(Path("/"), host=host)
    assert host.commands == [] and host.chowns == []


# install on "the host" (a tmp dir standing in for /) ------------------------


def test_host_install_creates_user_and_reloads_once(tmp_path):
    host = FakeHost(tmp_path, user_exists=False)
    lines = install(tmp_path, host=host)
    useradd = host.commands[0]
    assert useradd == [
        "/usr/sbin/useradd",
        *("--system", "--user-group", "--no-create-home", "--home-dir", "/var/lib/appliance"),
        *("--shell", "/usr/sbin/nologin", "appliance"),
    ]
    assert host.commands[1:] == [["systemctl", "daemon-reload"]]
    assert ("<fd>", 0, 991) in host.chowns  # the config: root:appliance, 0640
    assert (str(tmp_path / "var/lib/appliance"), 990, 991) in host.chowns
    assert "created system user and group appliance (uid 990)" in lines
    assert "ran systemctl daemon-reload" in lines
    assert lines[-1] == "start it with: systemctl enable --now appliance"

    host.commands.clear()
    lines = install(tmp_path, host=host)
    assert host.commands == []  # no useradd, no daemon-reload: nothing changed
    assert "nothing changed: already installed" in lines
    assert "unchanged: user appliance exists (uid 990)" in lines


def test_host_install_without_systemd(tmp_path):
    host = FakeHost(tmp_path, user_exists=True, systemd_running=False)
    lines = install(tmp_path, host=host)
    assert host.commands == []
    assert "systemd is not running here: skipped systemctl daemon-reload" in lines


def test_useradd_failure_is_an_install_error(tmp_path):
    host = FakeHost(tmp_path, user_exists=False, run_status=9, run_stderr="useradd: boom")
    with pytest.raises(InstallError, match="cannot create user appliance: .*useradd: boom"):
        install(tmp_path, host=host)


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
