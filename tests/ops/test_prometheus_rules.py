"""ops/prometheus/groupcache.rules.yml: promtool's check and its unit tests
(groupcache.rules.test.yml: input series, expected alerts and recorded
values), and the rules' metric names against what the code exports, which
the promtool tests cannot see: their input series are made up."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from support.promql import PROMETHEUS_SERIES, RULE_TESTS, RULES, exported_series, metric_names, recorded_series, rules

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH (Debian: apt-get install --no-install-recommends prometheus; .ci/run installs it)",
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_rules():
    out = promtool("check", "rules", RULES.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_rule_unit_tests():
    out = promtool("test", "rules", RULE_TESTS.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rules_use_only_series_the_code_exports():
    known = exported_series() | recorded_series() | PROMETHEUS_SERIES
    assert "groupcache_gets_total" in known and "groupcache_controller_etcd_up" in known
    for rule in rules():
        used = metric_names(rule["expr"])
        assert used, rule
        assert used <= known, f"{rule.get('record') or rule.get('alert')}: unknown {sorted(used - known)}"


def test_alerts_have_severity_summary_and_description():
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 10
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]
        assert "for" in rule, rule["alert"]  # a single bad scrape never pages


def test_every_alert_is_shown_firing_and_every_record_is_used():
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {t["alertname"] for c in cases for t in c.get("alert_rule_test", []) if t["exp_alerts"]}
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - fired == set(), "alerts no promtool test shows firing"
    used = set()
    for c in cases:
        for t in c.get("promql_expr_test", []):
            used |= metric_names(t["expr"])
    for rule in rules():
        used |= metric_names(rule["expr"])
    assert recorded_series() - used == set(), "recording rules neither tested nor used"
