"""APPLIANCE_TESTS_REQUIRED=1 (set by .ci/run as root) turns a skip into a
failure; without it a skip stays a skip and its reason is printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent

SAMPLE = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("no widget here")

@pytest.mark.skipif(True, reason="never on this box")
def test_skipif():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
"""


def _run(tmp_path: Path, required: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "APPLIANCE_TESTS_REQUIRED": required}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "support.required", "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_skip_fails_where_every_test_must_run(tmp_path):
    run = _run(tmp_path, "1")
    assert run.returncode == 1, run.stdout
    # A skip in the call fails it; one in setup (skipif) errors it: both fail the run.
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in run.stdout, run.stdout
    assert "APPLIANCE_TESTS_REQUIRED=1 says every test must run here: no widget here" in run.stdout
    assert "never on this box" in run.stdout


def test_a_skip_stays_a_skip_with_its_reason_otherwise(tmp_path):
    run = _run(tmp_path, "0")
    assert run.returncode == 0, run.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in run.stdout, run.stdout
    assert "no widget here" in run.stdout and "never on this box" in run.stdout
