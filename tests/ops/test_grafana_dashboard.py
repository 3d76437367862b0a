"""ops/grafana/groupcache.json: a well-formed Grafana dashboard whose every
PromQL expression selects only series the code exports or the rules record
(a renamed metric fails here), and parses (promtool, when on PATH)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from support.promql import DASHBOARD, PROMETHEUS_SERIES, exported_series, metric_names, recorded_series

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold theirs
    return out


def expressions(dashboard) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable
    (label_values(METRIC_SELECTOR, label) keeps only its selector)."""
    out = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        assert m, f"variable {var['name']}: unexpected query {query!r}"
        out.append((f"variable {var['name']}", m.group(1)))
    return out


def test_metric_name_extraction():
    expr = (
        "histogram_quantile(0.99, sum by (group, le) (rate(groupcache_origin_load_seconds_bucket"
        '{job="$job", instance=~"$instance", result="ok"}[$__rate_interval]))) / ignoring (x) group_left ()'
        " (max without (worker) (groupcache_ring_peers offset 5m) > bool 1e3) and on (job) up"
        ' or count_values("peers", group:groupcache_hit_ratio:rate5m)'
    )
    assert metric_names(expr) == {
        "groupcache_origin_load_seconds_bucket",
        "groupcache_ring_peers",
        "up",
        "group:groupcache_hit_ratio:rate5m",
    }


def test_dashboard_is_well_formed(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance", "group"} <= set(variables)
    for name in ("job", "instance", "group"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat", "state-timeline"), p["type"]
        assert p["datasource"] == DATASOURCE, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["datasource"] == DATASOURCE and t["expr"].strip() for t in p["targets"]), p["title"]
    # Every $variable an expression uses is defined (or Grafana's own).
    for where, expr in expressions(dashboard):
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= set(variables) | BUILTIN_VARIABLES, f"{where}: {used - set(variables)}"


def test_dashboard_uses_only_exported_or_recorded_series(dashboard):
    known = exported_series() | recorded_series() | PROMETHEUS_SERIES
    used = set()
    for where, expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known, f"{where}: unknown {sorted(names - known)}"
        used |= names
    # What the dashboard is for: each of these families has a panel.
    assert {
        "instance_group:groupcache_hit_ratio:rate5m",
        "group:groupcache_hit_ratio:rate5m",
        "groupcache_gets_total",
        "instance_group_result:groupcache_origin_loads:rate5m",
        "groupcache_origin_load_seconds_bucket",
        "groupcache_cache_bytes",
        "groupcache_cache_limit_bytes",
        "groupcache_cache_evictions_total",
        "groupcache_peer_loads_total",
        "groupcache_peer_errors_total",
        "groupcache_ring_revision",
        "groupcache_ring_peers",
        "groupcache_worker_up",
        "groupcache_draining",
        "groupcache_rate_limited_total",
        "groupcache_controller_etcd_up",
    } <= used


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not on PATH (Debian: apt-get install --no-install-recommends prometheus)",
)
def test_dashboard_expressions_parse(dashboard, tmp_path):
    """Each expression, with the variables filled in, as a recording rule
    that `promtool check rules` must accept."""
    values = {
        "__rate_interval": "5m",
        "__interval": "1m",
        "__range": "1h",
        "job": "groupcache",
        "instance": ".*",
        "group": ".*",
    }
    rules = []
    for i, (_where, expr) in enumerate(expressions(dashboard)):
        filled = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)
        rules.append({"record": f"dashboard:check:{i}", "expr": filled})
    path = tmp_path / "dashboard.rules.json"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
