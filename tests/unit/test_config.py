"""appliance.config: TOML + env settings, and the errors users see."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance import config as cfg
from appliance import host
from appliance.config import (
    ClusterSettings,
    ConfigError,
    GroupSettings,
    Layout,
    NodeSettings,
    Settings,
    check_file,
    default_runtime_dir,
    default_state_dir,
    find_config,
    join_hostport,
    load_settings,
    report,
    resolve_dirs,
    split_hostport,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "appliance" / "defaults" / "appliance.example.toml"
BUILTIN = REPO / "appliance" / "defaults" / "appliance.toml"

SQLITE_GROUP = """
[groups.scores]
origin = "sqlite:///{state_dir}/scores.db"
query = "SELECT score FROM students WHERE name = :key"
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No APPLIANCE_* or systemd directory variables leak in from the outside."""
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_") or name in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg-run"))
    monkeypatch.setattr(host, "is_root", lambda: False)  # same defaults whoever runs the tests


def write(tmp_path: Path, text: str, name: str = "appliance.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def config_error(path, check: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        check_file(path) if check else load_settings(path)
    msg = str(info.value)
    assert "Traceback" not in msg
    assert "pydantic" not in msg.lower()
    assert "validation error" not in msg.lower()
    assert "For further information" not in msg
    assert info.value.exit_code == 2
    return msg


# --------------------------------------------------------------------------
# loading


def test_valid_file_loads(tmp_path):
    p = write(
        tmp_path,
        """
        [cluster]
        service = "prod/cache"
        etcd = ["127.0.0.1:2379", "[::1]:2380", "etcd.example.com:2379"]
        lease_ttl = 10

        [node]
        workers = 4
        host = "127.0.0.1"
        base_port = 12000
        max_value_bytes = "1MiB"
        peer_timeout = "250ms"
        ring_hash = "groupcache"
        log_level = "DEBUG"
        state_dir = "/srv/state"

        [groups.scores]
        cache_bytes = "128MiB"
        policy = "lfu"
        ttl = "1h30m"
        origin = "sqlite:///{state_dir}/scores.db"
        query = "SELECT score FROM students WHERE name = :key"
        timeout = "2s"

        [groups.web]
        origin = "https://api.example.com/items/{key}?v=1"
        headers = { Accept = "application/json" }
        headers_from_env = { Authorization = "API_TOKEN" }

        [groups.files]
        origin = "file:///srv/data"

        [groups.fn]
        origin = "python:mypkg.loaders:load_value"
        """,
    )
    s = load_settings(p)
    assert s.cluster.service == "prod/cache"
    assert s.cluster.etcd == ["127.0.0.1:2379", "[::1]:2380", "etcd.example.com:2379"]
    assert s.cluster.endpoints() == [("127.0.0.1", 2379), ("::1", 2380), ("etcd.example.com", 2379)]
    assert s.cluster.lease_ttl == 10
    assert s.node.workers == 4
    assert s.node.max_value_bytes == 1024 * 1024
    assert s.node.peer_timeout == 0.25
    assert s.node.ring_hash == "groupcache"
    assert s.node.log_level == "debug"
    assert s.node.ports == range(12000, 12004)
    assert s.node.addresses() == ["127.0.0.1:12000", "127.0.0.1:12001", "127.0.0.1:12002", "127.0.0.1:12003"]
    g = s.groups["scores"]
    assert (g.cache_bytes, g.policy, g.ttl, g.timeout) == (128 * 1024**2, "lfu", 5400.0, 2.0)
    assert g.kind == "sql"
    assert s.groups["web"].kind == "http"
    assert s.groups["web"].headers == {"Accept": "application/json"}
    assert s.groups["files"].kind == "file"
    assert s.groups["fn"].kind == "python"
    # defaults kept for everything not in the file
    assert s.cluster.embedded_etcd is True
    assert s.node.replicas == 50
    assert s.node.hot_cache_fraction == 0.125
    assert s.groups["web"].cache_bytes == 64 * 1024**2
    # directories are resolved on load
    assert s.node.state_dir == Path("/srv/state")
    assert s.node.runtime_dir == Path(os.environ["XDG_RUNTIME_DIR"]) / "appliance"
    assert Layout(s).expand_origin("scores") == "sqlite:////srv/state/scores.db"


def test_empty_file_gives_defaults(tmp_path):
    s = load_settings(write(tmp_path, ""))
    assert s.cluster == ClusterSettings()
    assert s.node.model_dump(exclude={"state_dir", "runtime_dir"}) == NodeSettings().model_dump(
        exclude={"state_dir", "runtime_dir"}
    )
    assert s.groups == {}
    assert s.node.max_value_bytes == 4 * 1024**2
    assert s.node.peer_timeout == 5.0 and s.node.drain_timeout == 10.0


@pytest.mark.parametrize("path", [EXAMPLE, BUILTIN], ids=["example", "builtin"])
def test_shipped_files_load(path):
    s = load_settings(path)
    assert s.cluster.etcd == ["127.0.0.1:2379"] and s.cluster.embedded_etcd
    assert s.node.workers == 3 and s.node.base_port == 9999 and s.node.host == "127.0.0.1"
    g = s.groups["scores"]
    assert g.origin == "sqlite:///{state_dir}/scores.db"
    assert g.query == "SELECT score FROM students WHERE name = :key"
    assert g.demo_seed is True and g.cache_bytes == 64 * 1024**2 and g.policy == "lru"
    assert Layout(s).expand_origin("scores") == f"sqlite:///{s.node.state_dir}/scores.db"


def test_builtin_default_used_for_none():
    s = load_settings(None)
    assert list(s.groups) == ["scores"]
    assert cfg.builtin_config_path().read_text() == BUILTIN.read_text()


def test_example_and_builtin_agree():
    a, b = load_settings(EXAMPLE), load_settings(BUILTIN)
    assert a.model_dump() == b.model_dump()


def test_example_documents_every_key():
    text = EXAMPLE.read_text()
    for model in (ClusterSettings, NodeSettings, GroupSettings):
        for name in model.model_fields:
            assert re.search(rf"(?m)^#? ?{name} = ", text), f"{model.__name__}.{name} not in {EXAMPLE}"


def test_example_http_group_loads_when_uncommented(tmp_path):
    text = EXAMPLE.read_text()
    i = text.index("# [groups.profiles]")
    p = write(tmp_path, text[:i] + re.sub(r"(?m)^# ?", "", text[i:]))
    s = load_settings(p)
    assert s.groups["profiles"].kind == "http"
    assert s.groups["profiles"].headers_from_env == {"Authorization": "PROFILES_API_TOKEN"}


def test_check_file(tmp_path):
    out = check_file(EXAMPLE)
    assert out.startswith("OK: 3 workers on 127.0.0.1:9999-10001")
    assert "scores (64.0 MiB lru" in out
    with pytest.raises(ConfigError):
        check_file(write(tmp_path, "[node]\nworkers = 0\n"))


# --------------------------------------------------------------------------
# environment


def test_env_overrides_toml(tmp_path, monkeypatch):
    p = write(tmp_path, "[node]\nworkers = 2\nbase_port = 12000\n" + SQLITE_GROUP)
    monkeypatch.setenv("APPLIANCE_NODE__WORKERS", "5")
    monkeypatch.setenv("APPLIANCE_GROUPS__SCORES__CACHE_BYTES", "1GiB")
    monkeypatch.setenv("APPLIANCE_CLUSTER__ETCD", "10.0.0.1:2379, 10.0.0.2:2379")
    monkeypatch.setenv("APPLIANCE_CLUSTER__EMBEDDED_ETCD", "false")
    s = load_settings(p)
    assert s.node.workers == 5
    assert s.node.base_port == 12000  # untouched keys still come from the file
    assert s.groups["scores"].cache_bytes == 1024**3
    assert s.groups["scores"].query.startswith("SELECT")
    assert s.cluster.etcd == ["10.0.0.1:2379", "10.0.0.2:2379"]
    assert s.cluster.embedded_etcd is False


def test_env_json_list(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_CLUSTER__ETCD", '["10.0.0.1:2379"]')
    assert load_settings(write(tmp_path, "")).cluster.etcd == ["10.0.0.1:2379"]


def test_env_error_names_the_variable(tmp_path, monkeypatch):
    p = write(tmp_path, "[node]\nworkers = 2\n")
    monkeypatch.setenv("APPLIANCE_NODE__WORKERS", "abc")
    msg = config_error(p)
    assert msg == "APPLIANCE_NODE__WORKERS: expected an integer from 1 to 256, got 'abc'"


def test_env_unknown_key(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_NODE__WOKERS", "3")
    msg = config_error(write(tmp_path, ""))
    assert msg.startswith("APPLIANCE_NODE__WOKERS: unknown key")
    assert "workers" in msg


def test_env_bad_json(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_NODE", "{not json")
    msg = config_error(write(tmp_path, ""))
    assert msg.startswith("APPLIANCE_NODE: expected a JSON object")


def test_env_group_without_origin(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_GROUPS__EXTRA__POLICY", "lfu")
    msg = config_error(write(tmp_path, ""))
    assert msg.startswith("APPLIANCE_GROUPS__EXTRA__POLICY: groups.extra.origin: missing required key")


def test_file_errors_still_name_the_file_with_env_set(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_NODE__HOST", "127.0.0.1")
    p = write(tmp_path, "[node]\nworkers = 'x'\n")
    assert config_error(p) == f"{p}: node.workers: expected an integer from 1 to 256, got 'x'"


def test_settings_from_kwargs_without_file(monkeypatch):
    s = Settings(node={"workers": 2}, groups={"g": {"origin": "file:///srv/data"}})
    assert s.node.workers == 2
    assert s.groups["g"].cache_bytes == 64 * 1024**2
    assert s.node.state_dir is None  # only load_settings resolves directories
    monkeypatch.setenv("APPLIANCE_NODE__WORKERS", "7")
    assert Settings().node.workers == 7
    assert Settings(node={"workers": 2}).node.workers == 2  # kwargs beat env
    with pytest.raises(ValidationError):
        Settings(node={"wokers": 2})


def test_file_keys_never_become_loader_options(tmp_path):
    # The file's tables reach pydantic-settings as data: a top-level key
    # named like one of its _options is an unknown key like any other.
    p = write(tmp_path, "_env_prefix = 'X_'\n_cli_parse_args = true\nfile_tables = 1\n")
    lines = sorted(config_error(p).splitlines())
    assert [line.split(": ")[1] for line in lines] == ["_cli_parse_args", "_env_prefix", "file_tables"]
    assert all("unknown key (expected one of: cluster, node, groups, ops, tls, auth)" in line for line in lines)


def test_no_file_leaks_between_loads(tmp_path):
    load_settings(write(tmp_path, "[node]\nworkers = 9\n"))
    assert Settings().node.workers == 3
    assert load_settings(write(tmp_path, "", "other.toml")).node.workers == 3


# --------------------------------------------------------------------------
# errors


def test_unknown_key(tmp_path):
    p = write(tmp_path, "[node]\nwokers = 3\n")
    msg = config_error(p)
    assert msg.startswith(f"{p}: node.wokers: unknown key (")
    assert "expected one of: workers, host, base_port" in msg


def test_unknown_table_and_group_key(tmp_path):
    p = write(tmp_path, "[nodes]\nworkers = 3\n" + SQLITE_GROUP + "cache_size = '1MiB'\n")
    lines = sorted(config_error(p).splitlines())
    assert len(lines) == 2
    assert lines[0].startswith(f"{p}: groups.scores.cache_size: unknown key")
    assert "cache_bytes" in lines[0]
    assert lines[1].startswith(f"{p}: nodes: unknown key")
    assert "cluster, node, groups" in lines[1]


def test_bad_type(tmp_path):
    p = write(tmp_path, "[node]\nworkers = 'abc'\n")
    assert config_error(p) == f"{p}: node.workers: expected an integer from 1 to 256, got 'abc'"


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ("[node]\nworkers = 0", "node.workers", "an integer from 1 to 256"),
        ("[node]\nworkers = true", "node.workers", "an integer from 1 to 256"),
        ("[node]\nbase_port = 70000", "node.base_port", "an integer from 1 to 65535"),
        ("[node]\nhot_cache_fraction = 0.9", "node.hot_cache_fraction", "a number from 0 to 0.5"),
        ("[node]\nlog_level = 'loud'", "node.log_level", 'one of "debug", "info", "warning", "error"'),
        ("[node]\nhost = '10.0.0.1:9999'", "node.host", "a host name or IP address without a port"),
        ("[node]\nstate_dir = 'relative/dir'", "node.state_dir", "an absolute path"),
        ("[node]\nring_hash = 'md5'", "node.ring_hash", 'one of "seed", "groupcache"'),
        ("[cluster]\nlease_ttl = 0", "cluster.lease_ttl", "an integer from 1 to 3600"),
        ("[cluster]\nembedded_etcd = 'maybe'", "cluster.embedded_etcd", "true or false"),
        ("[cluster]\netcd = []", "cluster.etcd", "at least one"),
        ("[cluster]\netcd = ['localhost']", "cluster.etcd[0]", '"host:port"'),
        ("[cluster]\netcd = ['http://x:2379']", "cluster.etcd[0]", "without a scheme"),
        ("[cluster]\nservice = '/groupcache/'", "cluster.service", "non-empty etcd key prefix"),
        ("[cluster]\nservice = ''", "cluster.service", "non-empty etcd key prefix"),
        ("[cluster]\netcd_user = 'u'", "cluster.etcd_password", "etcd_user and etcd_password together"),
        ("[cluster]\netcd_key = '/k.pem'", "cluster.etcd_cert", "etcd_cert and etcd_key together"),
        ("node = 3", "node", "a table"),
    ],
)
def test_bad_values(tmp_path, toml, key, expected):
    p = write(tmp_path, toml + "\n")
    msg = config_error(p)
    assert msg.startswith(f"{p}: {key}: "), msg
    assert expected in msg


def test_bad_size(tmp_path):
    p = write(tmp_path, SQLITE_GROUP + "cache_bytes = '64XB'\n")
    msg = config_error(p)
    assert msg.startswith(f'{p}: groups.scores.cache_bytes: expected a size like "64MiB"')
    assert "'64XB'" in msg


def test_zero_size(tmp_path):
    p = write(tmp_path, SQLITE_GROUP + "cache_bytes = 0\n")
    assert "groups.scores.cache_bytes: expected a size greater than 0" in config_error(p)


def test_bad_duration(tmp_path):
    p = write(tmp_path, SQLITE_GROUP + "ttl = '5 parsecs'\n")
    msg = config_error(p)
    assert msg.startswith(f"{p}: groups.scores.ttl: expected a duration like")
    assert "'5 parsecs'" in msg


def test_bad_policy(tmp_path):
    p = write(tmp_path, SQLITE_GROUP + "policy = 'mru'\n")
    assert config_error(p) == f'{p}: groups.scores.policy: expected one of "lru", "lfu", "fifo", got \'mru\''


def test_port_clash_with_embedded_etcd(tmp_path):
    p = write(tmp_path, "[node]\nbase_port = 2378\n")
    msg = config_error(p)
    assert msg.startswith(f"{p}: node.base_port: worker ports 2378-2380 clash with the embedded etcd")
    assert "2379" in msg


def test_port_clash_with_etcd_peer_port(tmp_path):
    p = write(tmp_path, "[cluster]\netcd_peer_port = 10000\n")
    assert config_error(p).startswith(f"{p}: cluster.etcd_peer_port: etcd_peer_port 10000 clashes")
    p = write(tmp_path, "[cluster]\netcd_peer_port = 2379\n")
    assert config_error(p).startswith(f"{p}: cluster.etcd_peer_port:")


def test_no_clash_with_external_or_remote_etcd(tmp_path):
    # external etcd: its port is somebody else's business
    load_settings(write(tmp_path, "[cluster]\nembedded_etcd = false\n[node]\nbase_port = 2378\n"))
    # embedded etcd on another address than the workers
    load_settings(
        write(
            tmp_path,
            "[cluster]\netcd = ['10.1.1.1:2379']\nplaintext_peers = true\n"
            "[node]\nhost = '10.2.2.2'\nbase_port = 2378\n",
        )
    )


def test_wildcard_host_clashes(tmp_path):
    p = write(tmp_path, "[cluster]\netcd = ['10.1.1.1:2379']\n[node]\nhost = '0.0.0.0'\nbase_port = 2378\n")
    assert "node.base_port: worker ports" in config_error(p)


def test_ports_past_65535(tmp_path):
    p = write(tmp_path, "[node]\nbase_port = 65535\nworkers = 3\n")
    msg = config_error(p)
    assert msg.startswith(f"{p}: node.base_port: expected worker ports within 1..65535")
    assert "65537" in msg


def test_sqlite_without_query(tmp_path):
    p = write(tmp_path, '[groups.scores]\norigin = "sqlite:////tmp/x.db"\n')
    msg = config_error(p)
    assert msg.startswith(f"{p}: groups.scores.query: expected a SQL query")
    assert ":key" in msg


def test_query_without_key_param(tmp_path):
    p = write(tmp_path, '[groups.scores]\norigin = "sqlite:////tmp/x.db"\nquery = "SELECT 1"\n')
    assert config_error(p).startswith(f'{p}: groups.scores.query: expected a query with the bind parameter ":key"')


def test_query_for_http(tmp_path):
    p = write(tmp_path, '[groups.web]\norigin = "http://h/{key}"\nquery = "SELECT :key"\n')
    assert config_error(p) == f"{p}: groups.web.query: query applies only to SQL origins; remove it for an http origin"


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("http://h/items", "containing {key}"),
        ("https:///{key}", "no host"),
        ("ftp://h/{key}", "got scheme 'ftp'"),
        ("pg://u@h/db", "did you mean postgresql://"),
        ("https://user:pw@h/{key}", "without credentials"),
        ("file://relative/dir", "file:///absolute/dir"),
        ("python:not a module", "python:package.module:function"),
        ("sqlite:///{statedir}/x.db", "unknown placeholder {statedir}"),
        ("scores.db", "expected an origin URL"),
        ("", "empty"),
    ],
)
def test_bad_origins(tmp_path, origin, expected):
    p = write(tmp_path, f'[groups.g]\norigin = "{origin}"\n')
    msg = config_error(p)
    assert msg.startswith(f"{p}: groups.g.origin: "), msg
    assert expected in msg


@pytest.mark.parametrize(
    "origin",
    [
        "sqlite:///relative.db",
        "sqlite:////abs/x.db",
        "sqlite+pysqlite:///{state_dir}/x.db",
        "postgresql://u:p@db.example.com:5432/app",
        "postgresql+psycopg://u@h/app",
        "mysql+pymysql://u:p@h/app",
        "mysql://u:p@h/app",
        "postgres://u@h/app",
        "mariadb://u@h/app",
    ],
)
def test_sql_origins_accepted(tmp_path, origin):
    p = write(tmp_path, f'[groups.g]\norigin = "{origin}"\nquery = "SELECT v FROM t WHERE k = :key"\n')
    assert load_settings(p).groups["g"].kind == "sql"


def test_missing_origin(tmp_path):
    p = write(tmp_path, "[groups.g]\ncache_bytes = '1MiB'\n")
    msg = config_error(p)
    assert msg.startswith(f"{p}: groups.g.origin: missing required key (expected an origin URL")


def test_options_for_the_wrong_origin(tmp_path):
    p = write(tmp_path, SQLITE_GROUP + "headers = { Accept = 'text/plain' }\n")
    assert "groups.scores.headers: headers applies only to http(s) origins" in config_error(p)
    p = write(tmp_path, '[groups.f]\norigin = "file:///srv"\ndemo_seed = true\n')
    assert "groups.f.demo_seed: demo_seed applies only to sqlite origins" in config_error(p)
    p = write(tmp_path, '[groups.w]\norigin = "http://h/{key}"\nheaders_from_env = { Authorization = "not a var" }\n')
    assert "groups.w.headers_from_env.Authorization: expected the name of an environment variable" in config_error(p)


def test_bad_group_names(tmp_path):
    p = write(tmp_path, '[groups."a b"]\norigin = "file:///srv"\n')
    assert config_error(p).startswith(f'{p}: groups."a b": expected a group name without "/" or whitespace')
    p = write(tmp_path, '[node]\nmax_group_bytes = 3\n[groups.long]\norigin = "file:///srv"\n')
    assert config_error(p).startswith(f"{p}: groups.long: expected a group name of at most node.max_group_bytes = 3")


def test_all_errors_are_collected(tmp_path):
    p = write(tmp_path, "[node]\nworkers = 'x'\nhost = ''\n[cluster]\nlease_ttl = 0\nfoo = 1\n")
    lines = config_error(p).splitlines()
    assert len(lines) == 4
    assert all(line.startswith(f"{p}: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"node.workers", "node.host", "cluster.lease_ttl", "cluster.foo"}


def test_toml_syntax_error(tmp_path):
    p = write(tmp_path, "[node]\nworkers = 3\nhost = \n")
    msg = config_error(p)
    assert msg.startswith(f"{p}: line 3, column 8: invalid TOML: ")
    p = write(tmp_path, "[node\n")
    assert config_error(p).startswith(f"{p}: line 1, column 6: invalid TOML: ")


def test_not_utf8(tmp_path):
    p = tmp_path / "bin.toml"
    p.write_bytes(b"[node]\nhost = '\xff'\n")
    assert config_error(p).startswith(f"{p}: not UTF-8 text")


def test_missing_file(tmp_path):
    p = tmp_path / "nope.toml"
    assert config_error(p) == f"cannot read config file {p}: No such file or directory"


def test_directory_instead_of_file(tmp_path):
    assert config_error(tmp_path) == f"cannot read config file {tmp_path}: Is a directory"


# --------------------------------------------------------------------------
# finding the file, directories, helpers


def test_find_config(tmp_path, monkeypatch):
    monkeypatch.setattr(cfg.load, "SYSTEM_CONFIG", tmp_path / "etc" / "appliance.toml")
    assert find_config(None) is None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "appliance.toml").write_text("")
    assert find_config(None) == tmp_path / "etc" / "appliance.toml"
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "env.toml"))
    assert find_config(None) == tmp_path / "env.toml"
    assert find_config(str(tmp_path / "x.toml")) == tmp_path / "x.toml"


def test_appliance_config_env_is_not_a_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "whatever.toml"))
    assert load_settings(write(tmp_path, "")).node.workers == 3


def test_default_dirs():
    env = {"HOME": "/home/u"}
    assert default_state_dir(env, root=False) == Path("/home/u/.local/state/appliance")
    assert default_state_dir({**env, "XDG_STATE_HOME": "/x"}, root=False) == Path("/x/appliance")
    assert default_state_dir(env, root=True) == Path("/var/lib/appliance")
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/appliance:/var/lib/other"}, root=True) == Path(
        "/var/lib/appliance"
    )
    assert default_runtime_dir({}, root=False) == Path(f"/tmp/appliance-{os.getuid()}")
    assert default_runtime_dir({"XDG_RUNTIME_DIR": "/run/user/1000"}, root=False) == Path("/run/user/1000/appliance")
    assert default_runtime_dir({}, root=True) == Path("/run/appliance")
    assert default_runtime_dir({"RUNTIME_DIRECTORY": "/run/appliance"}, root=False) == Path("/run/appliance")


def test_resolve_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    s = Settings(groups={"f": {"origin": "file:///{state_dir}/files"}})
    r = resolve_dirs(s)
    assert r.node.state_dir == tmp_path / "state"
    assert r.node.runtime_dir == Path(os.environ["XDG_RUNTIME_DIR"]) / "appliance"
    assert s.node.state_dir is None  # the original is untouched
    assert Layout(r).expand_origin("f") == f"file://{tmp_path}/state/files"
    assert Layout(s).state_path() == tmp_path / "state"
    explicit = Settings(node={"state_dir": "/srv/s", "runtime_dir": "/srv/r"})
    assert resolve_dirs(explicit).node.state_dir == Path("/srv/s")
    assert Layout(explicit).runtime_path() == Path("/srv/r")


def test_hostport_helpers():
    assert split_hostport("127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert split_hostport("[::1]:2379") == ("::1", 2379)
    assert split_hostport("etcd-0.example.com:2379") == ("etcd-0.example.com", 2379)
    assert join_hostport("::1", 9999) == "[::1]:9999"
    assert join_hostport("10.0.0.1", 9999) == "10.0.0.1:9999"
    for bad in ["", "host", ":2379", "host:", "host:0", "host:99999", "::1:2379", "a b:1", "[nothex]:1"]:
        with pytest.raises(ValueError):
            split_hostport(bad)


def test_ipv6_node_host():
    s = Settings(node={"host": "::1"}, cluster={"etcd": ["[::1]:2379"]})
    assert s.node.address(0) == "[::1]:9999"


def test_config_check_warns_when_any_etcd_client_can_join_the_ring(tmp_path):
    private = check_file(write(tmp_path, ""))
    assert "etcd embedded, private" in private and "member keys" not in private
    assert "writes authenticated, reads open" in private
    external = check_file(write(tmp_path, '[cluster]\nembedded_etcd = false\netcd = ["10.0.0.5:2379"]\n', "e.toml"))
    assert (
        "note: the external etcd is used without TLS or auth: any etcd client can write the ring's member keys"
        in external
    )
    # ... and what that gives away, and what it does not.
    assert "never receives the token" in external and "delete workers' keys" in external
    assert "stays out of the ring" in external
    seed = check_file(write(tmp_path, '[node]\nhost = "localhost"\n[cluster]\nseed_interop = true\n', "s.toml"))
    assert "a fake member owns a share of the keys" in seed
    exposed = check_file(write(tmp_path, "[cluster]\netcd_private = false\n", "x.toml"))
    assert "note: the embedded etcd listens on TCP (etcd_private = false) without auth" in exposed
    opened = check_file(write(tmp_path, '[auth]\nwrites = "open"\n', "o.toml"))
    assert "note: writes are open: any client that reaches a data port can Set and Remove values" in opened


def test_config_check_reads_the_token_files_and_names_what_is_wrong(tmp_path):
    token = tmp_path / "app.token"
    token.write_text("t" * 32)
    token.chmod(0o644)
    p = write(tmp_path, f'[auth.credentials.app]\ntoken_file = "{token}"\nscopes = ["write"]\n')
    msg = config_error(p, check=True)
    assert "auth.credentials.app.token_file" in msg and "chmod 600" in msg and "t" * 32 not in msg
    token.chmod(0o600)
    assert "credentials: app [write]" in check_file(p)
    both = write(tmp_path, f'[auth.credentials.x]\ntoken_file = "{token}"\ntls_identity = "x"\n', "b.toml")
    assert "expected token_file or tls_identity" in config_error(both)
    cert_only = write(tmp_path, '[auth.credentials.x]\ntls_identity = "x"\n', "c.toml")
    assert "client_auth = true" in config_error(cert_only)


BOXES = '["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]'


def test_a_box_of_an_embedded_etcd_cluster_runs_the_member_of_its_host(tmp_path):
    from appliance.supervision.conf import etcd_flags

    s = load_settings(
        write(tmp_path, f'[cluster]\netcd = {BOXES}\nplaintext_peers = true\n[node]\nhost = "10.0.0.2"\n')
    )
    layout = Layout(s)
    assert layout.etcd_clustered() and not layout.private_etcd()
    assert layout.etcd_member_endpoint() == "10.0.0.2:2379" and layout.etcd_peer_port() == 2380
    flags = dict(f.split("=", 1) for f in etcd_flags(s, cluster_state="existing"))
    assert flags["--name"] == "appliance-10.0.0.2"
    assert flags["--initial-cluster"] == (
        "appliance-10.0.0.1=http://10.0.0.1:2380,appliance-10.0.0.2=http://10.0.0.2:2380,"
        "appliance-10.0.0.3=http://10.0.0.3:2380"
    )
    assert flags["--initial-cluster-state"] == "existing"
    assert flags["--listen-client-urls"] == "http://10.0.0.2:2379"
    assert flags["--listen-peer-urls"] == "http://10.0.0.2:2380"
    checked = check_file(
        write(tmp_path, f'[cluster]\netcd = {BOXES}\nplaintext_peers = true\n[node]\nhost = "10.0.0.2"\n', "c.toml")
    )
    assert (
        "note: the embedded etcd cluster serves TCP without TLS or auth: "
        "any etcd client can write the ring's member keys" in checked
    )
    assert "note: each box makes its own cluster token: set [auth] token_file" in checked
    token = tmp_path / "cluster.token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    shared = (
        f'[cluster]\netcd = {BOXES}\nplaintext_peers = true\n[node]\nhost = "10.0.0.2"\n'
        f'[auth]\ntoken_file = "{token}"\n'
    )
    assert "own cluster token" not in check_file(write(tmp_path, shared, "s.toml"))


def test_an_embedded_etcd_cluster_with_tls_uses_the_box_certificate_and_says_what_client_auth_means(tmp_path):
    from appliance.supervision.conf import etcd_flags

    for name in ("node.pem", "node-key.pem", "ca.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    tls = f'[tls]\ncert = "{tmp_path}/node.pem"\nkey = "{tmp_path}/node-key.pem"\nca = "{tmp_path}/ca.pem"\n'
    base = f'[cluster]\netcd = {BOXES}\n[node]\nhost = "10.0.0.3"\n'
    open_ = load_settings(write(tmp_path, base + tls))
    flags = dict(f.split("=", 1) for f in etcd_flags(open_))
    assert flags["--listen-client-urls"] == "https://10.0.0.3:2379"
    assert flags["--peer-client-cert-auth"] == "true" and "--client-cert-auth" not in flags
    assert flags["--peer-trusted-ca-file"] == f"{tmp_path}/ca.pem"
    assert Layout(open_).etcd_tls() == (tmp_path / "ca.pem", tmp_path / "node.pem", tmp_path / "node-key.pem")
    assert "tls.client_auth is off" in report.etcd_warning(open_)
    closed = load_settings(write(tmp_path, base + tls + "client_auth = true\n", "m.toml"))
    assert dict(f.split("=", 1) for f in etcd_flags(closed))["--client-cert-auth"] == "true"
    assert report.etcd_warning(closed) is None


@pytest.mark.parametrize(
    "text, field, words",
    [
        (f'[cluster]\netcd = {BOXES}\n[node]\nhost = "10.0.0.9"\n', "node.host", "is none of 10.0.0.1:2379"),
        (
            '[cluster]\netcd = ["10.0.0.1:2379", "10.0.0.1:3379"]\n[node]\nhost = "10.0.0.1"\n',
            "cluster.etcd",
            "one endpoint per box",
        ),
        (
            f'[cluster]\netcd = {BOXES}\n[node]\nhost = "10.0.0.1"\nbase_port = 2378\n',
            "node.base_port",
            "clash with the embedded etcd's client port 2379 (10.0.0.1:2379)",
        ),
        (
            f'[cluster]\netcd = {BOXES}\n[node]\nhost = "10.0.0.1"\nbase_port = 2380\nworkers = 1\n',
            "cluster.etcd_peer_port",
            "peer port (etcd_peer_port = 0) 2380 clashes",
        ),
    ],
)
def test_a_box_of_an_embedded_etcd_cluster_is_checked_against_its_endpoints(tmp_path, text, field, words):
    msg = config_error(write(tmp_path, text))
    assert field in msg and words in msg, msg


def test_config_check_reports_ring_shares_and_warns_on_imbalance(tmp_path):
    from appliance.config import check_file

    uneven = tmp_path / "uneven.toml"
    uneven.write_text("[node]\nworkers = 3\n")  # 50 replicas: one worker owns 1.32x its share
    out = check_file(uneven)
    assert "note: ring shares:" in out and "ring imbalance" in out and "replicas" in out
    even = tmp_path / "even.toml"
    even.write_text("[node]\nworkers = 3\nreplicas = 500\n")
    assert "ring imbalance" not in check_file(even)
