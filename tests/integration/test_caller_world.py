"""No code or files from the caller's world: `appliance run` started in a
directory another user planted modules in imports none of them, and a
runtime or state directory that is not the appliance's own is refused
before anything is written into it (exit 2, naming the directory)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.appliance import BIN, Appliance, wait_for

pytestmark = pytest.mark.integration

NOBODY = 65534
PLANT = "import os, sys\nopen(os.path.join({dir!r}, 'ran-' + {name!r}), 'w').write(str(os.getuid()))\n"


def needs_root() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: the planted files belong to another user (nobody)")


@pytest.fixture
def planted():
    """A directory of nobody's, world-readable as /tmp directories are, with
    the modules `python -m` would import from a working directory."""
    needs_root()
    where = Path(tempfile.mkdtemp(prefix="hijack-", dir="/tmp"))
    where.chmod(0o777)
    for name in ("supervisor", "appliance", "etcd3", "grpc"):
        package = where / name
        package.mkdir()
        (package / "__init__.py").write_text(PLANT.format(dir=str(where), name=name))
    for path in [where, *where.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_run_in_a_planted_directory_imports_nothing_from_it(planted, tmp_path):
    app = Appliance(tmp_path, workers=2)
    app.cwd = planted
    try:
        app.start()  # waits for every worker in the ring
        got = app.cli("get", "scores", "张三")
        assert got.returncode == 0 and got.stdout == b"100", got.stderr

        # Every program comes up and stays up (one still STARTING under load
        # is not a failure; one that exited, or is in BACKOFF, would be).
        def all_running():
            states = {n: p["statename"] for n, p in app.process_info().items()}
            return set(states.values()) == {"RUNNING"}

        wait_for(all_running, 15, what="every program RUNNING")
    finally:
        app.cleanup()
    assert sorted(p.name for p in planted.iterdir() if p.name.startswith("ran-")) == []


def _run(app: Appliance) -> subprocess.CompletedProcess:
    """`appliance run`, expected to refuse at once; whatever it started if it
    did not (the old code ran on) is cleaned up by the appliance's root."""
    try:
        return subprocess.run(
            [str(BIN / "appliance"), "run", "--config", str(app.config)], capture_output=True, text=True, timeout=60
        )
    finally:
        app.cleanup()


@pytest.mark.parametrize("which", ["runtime", "state"])
def test_a_directory_of_another_user_is_refused(which, tmp_path):
    needs_root()
    app = Appliance(tmp_path, workers=1)
    target = tmp_path / ("run" if which == "runtime" else "state")
    target.mkdir(mode=0o700)
    os.chown(target, NOBODY, NOBODY)
    out = _run(app)
    assert out.returncode == 2, out.stderr
    assert f"{target} belongs to uid {NOBODY}" in out.stderr and "Traceback" not in out.stderr
    assert list(target.iterdir()) == []  # nothing written into it


def test_a_directory_others_may_write_in_is_refused(tmp_path):
    app = Appliance(tmp_path, workers=1)
    runtime = tmp_path / "run"
    runtime.mkdir()
    runtime.chmod(0o777)  # another user could have planted anything inside
    out = _run(app)
    assert out.returncode == 2, out.stderr
    assert f"{runtime} is writable by group or others" in out.stderr
    assert list(runtime.iterdir()) == []
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o777  # left as found, for its owner to inspect


def test_a_link_another_user_made_is_refused(tmp_path):
    needs_root()
    app = Appliance(tmp_path, workers=1)
    elsewhere = Path(tempfile.mkdtemp(prefix="link-target-", dir="/tmp"))
    try:
        runtime = tmp_path / "run"
        runtime.symlink_to(elsewhere)
        os.lchown(runtime, NOBODY, NOBODY)
        out = _run(app)
        assert out.returncode == 2, out.stderr
        assert f"{runtime} is a link made by uid {NOBODY}" in out.stderr
        assert list(elsewhere.iterdir()) == []  # the config was not written through the link
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
