"""A pytest plugin: with APPLIANCE_TESTS_REQUIRED=1, a skip is a failure.

.ci/run sets it as root, where the machine is set up to run every test: a
test that cannot run there has found a missing install step or a broken
fixture, not a reason to pass quietly. Without it, skips keep their reason
(`make test` prints them with -rs).
"""

from __future__ import annotations

import os

import pytest

VARIABLE = "APPLIANCE_TESTS_REQUIRED"


def required() -> bool:
    return os.environ.get(VARIABLE, "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and required():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped, but {VARIABLE}=1 says every test must run here: {reason}"
