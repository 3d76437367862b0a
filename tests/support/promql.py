"""The monitoring files (ops/prometheus, ops/grafana) against the metrics the
code really exports: the series names a box endpoint serves, the recording
rules' names, and the metric names a PromQL expression uses."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus" / "groupcache.rules.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "groupcache.rules.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "groupcache.json"

# Series names of each metric family type in the text format.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}
# Added by Prometheus to every scrape.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def exported_series() -> set[str]:
    """Every series name a box endpoint serves, read from the code: a real
    worker's registry (one group) and the box collector's own families."""
    from appliance.config import Settings
    from appliance.node.serving import Node
    from appliance.ops.box_metrics import BoxCollector

    settings = Settings(
        node={"host": "127.0.0.1"},
        groups={"g": {"origin": "python:tests.none:f", "cache_bytes": "1MiB"}},
        cluster={"embedded_etcd": False},
        ops={"metrics_addr": ""},
    )

    async def loader(key: str) -> bytes:
        return b""

    node = Node(settings, {"g": loader}, port=0)  # not started: its registry is all we read
    controller = SimpleNamespace(revision=1, peers=["a:1"], etcd_ok=True, unproven=lambda: [])
    box = BoxCollector(lambda: [], controller=controller)
    families = list(node.metrics.registry.collect()) + list(box.collect())
    return {f.name + suffix for f in families for suffix in _SUFFIXES[f.type]}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def recorded_series() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed).

    Not a full parser: strings, label matchers, ranges and grouping clauses
    are cut out, then every identifier not followed by "(" (a function or an
    aggregation) and not a keyword is a metric name. Enough for the
    expressions of these files, and checked in tests/ops/test_grafana_dashboard.py."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+\S+", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if m.group() in _KEYWORDS or e[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names
