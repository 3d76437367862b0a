"""[ops] and [tls]: defaults, documentation, port clashes, clear errors."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from appliance import host
from appliance.config import ConfigError, Layout, OpsSettings, TlsSettings, load_settings, report

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "appliance" / "defaults" / "appliance.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg-run"))
    monkeypatch.setattr(host, "is_root", lambda: False)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "appliance.toml"
    p.write_text(textwrap.dedent(text))
    return p


def error(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


def test_defaults_and_env_override(tmp_path, monkeypatch):
    s = load_settings(write(tmp_path, ""))
    assert s.ops.metrics_addr == "127.0.0.1:9101" and s.ops.metrics_endpoint() == ("127.0.0.1", 9101)
    assert s.ops.http_base_port == 0 and Layout(s).http_ports() is None
    assert s.ops.slow_load == 1.0 and s.ops.rate_limit == 0 and not s.tls.enabled
    monkeypatch.setenv("APPLIANCE_OPS__METRICS_ADDR", "")
    monkeypatch.setenv("APPLIANCE_OPS__HTTP_BASE_PORT", "8080")
    monkeypatch.setenv("APPLIANCE_OPS__RATE_LIMIT", "2.5")
    s = load_settings(write(tmp_path, ""))
    assert s.ops.metrics_endpoint() is None and list(Layout(s).http_ports()) == [8080, 8081, 8082]
    assert s.ops.burst() == 3
    assert "HTTP API on 127.0.0.1:8080-8082" in report.summary(s) and "rate limit 2.5/s (burst 3)" in report.summary(s)


def test_example_documents_every_ops_and_tls_key():
    text = EXAMPLE.read_text()
    assert re.search(r"(?m)^\[ops\]$", text) and re.search(r"(?m)^# \[tls\]$", text)
    for model in (OpsSettings, TlsSettings):
        for name in model.model_fields:
            assert re.search(rf"(?m)^#? ?{name} = ", text), f"{model.__name__}.{name} not in {EXAMPLE}"


@pytest.mark.parametrize(
    "toml,key,words",
    [
        (
            "[ops]\nmetrics_addr = '127.0.0.1:10000'\n",
            "ops.metrics_addr",
            "the metrics port 10000 clashes with worker ports 9999-10001",
        ),
        (
            "[ops]\nmetrics_addr = '0.0.0.0:2379'\n",
            "ops.metrics_addr",
            "clashes with the embedded etcd's client port 2379",
        ),
        (
            "[ops]\nhttp_base_port = 10001\n",
            "ops.http_base_port",
            "HTTP ports 10001-10003 clash with worker ports 9999-10001",
        ),
        (
            "[ops]\nhttp_base_port = 2378\n",
            "ops.http_base_port",
            "HTTP ports 2378-2380 clash with the embedded etcd's client port 2379",
        ),
        (
            "[ops]\nhttp_base_port = 9100\nmetrics_addr = '127.0.0.1:9102'\n",
            "ops.metrics_addr",
            "the metrics port 9102 clashes with HTTP ports 9100-9102",
        ),
        (
            "[cluster]\netcd_peer_port = 8001\n[ops]\nhttp_base_port = 8000\n",
            "ops.http_base_port",
            "clash with etcd_peer_port 8001",
        ),
        ("[ops]\nhttp_base_port = 65534\n", "ops.http_base_port", "need ports up to 65536"),
        ("[ops]\nmetrics_addr = '9101'\n", "ops.metrics_addr", 'or "" to disable the metrics endpoint'),
        ("[ops]\nslow_load = 'soon'\n", "ops.slow_load", "expected a duration"),
        ("[ops]\nrate_limit = -1\n", "ops.rate_limit", "expected a number of at least 0"),
        ("[ops]\nrate_burst = true\n", "ops.rate_burst", "expected an integer"),
        ("[ops]\nmetrics = '127.0.0.1:9101'\n", "ops.metrics", "unknown key (did you mean"),
    ],
)
def test_bad_ops_values_name_the_file_and_key(tmp_path, toml, key, words):
    p = write(tmp_path, toml)
    msg = error(p)
    assert msg.startswith(f"{p}: {key}: "), msg
    assert words in msg, msg
    assert "Traceback" not in msg


def test_no_clash_on_other_hosts(tmp_path):
    # Metrics on another address than the workers share no port.
    load_settings(
        write(
            tmp_path,
            "[cluster]\nplaintext_peers = true\n[node]\nhost = '10.0.0.1'\n[ops]\nmetrics_addr = '127.0.0.1:9999'\n",
        )
    )
    load_settings(write(tmp_path, "[ops]\nmetrics_addr = ''\nhttp_base_port = 9101\n"))


def test_a_host_other_machines_reach_needs_tls_or_the_named_escape(tmp_path, pki):
    """Peers send the cluster token with every call: in clear only where the
    operator says the network is trusted."""
    p = write(tmp_path, "[cluster]\nembedded_etcd = false\n[node]\nhost = '10.0.0.7'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(p)
    error = str(info.value)
    assert "node.host: node.host '10.0.0.7' is reachable from other machines and [tls] is off" in error
    assert "[cluster] plaintext_peers = true" in error  # the escape hatch, by name
    load_settings(
        write(tmp_path, "[cluster]\nembedded_etcd = false\nplaintext_peers = true\n[node]\nhost = '10.0.0.7'\n")
    )
    tls = f"[tls]\ncert = '{pki.cert}'\nkey = '{pki.key}'\nca = '{pki.ca}'\n"
    load_settings(write(tmp_path, "[cluster]\nembedded_etcd = false\n[node]\nhost = '10.0.0.7'\n" + tls))
    for loopback in ("127.0.0.1", "::1", "localhost"):  # nothing crosses a network
        load_settings(write(tmp_path, f"[cluster]\nembedded_etcd = false\n[node]\nhost = '{loopback}'\n"))


def test_tls_settings_are_checked(tmp_path, pki):
    ok = load_settings(
        write(tmp_path, f"[tls]\ncert = '{pki.cert}'\nkey = '{pki.key}'\nca = '{pki.ca}'\nclient_auth = true\n")
    )
    assert ok.tls.enabled and ok.tls.client_auth and "mTLS" in report.summary(ok)
    cases = [
        (f"[tls]\ncert = '{pki.cert}'\n", "tls.key: expected tls.cert and tls.key together"),
        (
            f"[tls]\ncert = '{pki.cert}'\nkey = '{pki.key}'\nclient_auth = true\n",
            "tls.ca: client_auth = true needs tls.ca",
        ),
        (f"[tls]\nca = '{pki.ca}'\n", "tls.ca: tls.ca applies only with tls.cert and tls.key"),
        (f"[tls]\ncert = '{pki.cert}'\nkey = '{tmp_path}/nope.pem'\n", "tls.key: cannot read"),
        (f"[tls]\ncert = '{pki.cert}'\nkey = '{tmp_path}/appliance.toml'\n", "tls.key: expected a PEM file"),
        ("[tls]\ncert = 'node.pem'\nkey = 'key.pem'\n", "tls.cert: expected an absolute path"),
    ]
    for toml, words in cases:
        p = write(tmp_path, toml)
        msg = error(p)
        assert msg.startswith(f"{p}: "), msg
        assert words in msg, msg
