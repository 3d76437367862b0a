"""The CLI as users run it: exit codes and messages, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cache.ring import HashRing

APPLIANCE = str(Path(sys.executable).parent / "appliance")
EXAMPLE = str(Path(__file__).parents[2] / "appliance" / "defaults" / "appliance.example.toml")


def run(*args, env=None):
    return subprocess.run([APPLIANCE, *args], capture_output=True, text=True, timeout=60, env=env)


def test_locate_with_static_peers_matches_the_ring():
    peers = ["127.0.0.1:9999", "127.0.0.1:10000", "127.0.0.1:10001"]
    keys = ["张三", "李四", "王五", "a", "b", "🙂"]
    out = run("locate", "--peers", ",".join(peers), *keys)
    assert out.returncode == 0, out.stderr
    ring = HashRing(peers)
    assert out.stdout.splitlines() == [f"{k}\t{ring.owner(k)}" for k in keys]


def test_locate_groupcache_scheme_from_config(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text('[node]\nring_hash = "groupcache"\n[cluster]\nembedded_etcd = false\n')
    peers = ["10.0.0.1:1", "10.0.0.2:1"]
    out = run("locate", "--config", str(cfg), "--peers", ",".join(peers), "k1", "k2")
    ring = HashRing(peers, scheme="groupcache")
    assert out.stdout.splitlines() == [f"k{i}\t{ring.owner(f'k{i}')}" for i in (1, 2)]


@pytest.mark.parametrize(
    "body,key",
    [
        ("[node]\nworkers = 'many'\n", "node.workers"),
        ("[node]\nwokers = 3\n", "node.wokers"),
        ("[groups.g]\norigin = 'sqlite:////tmp/x.db'\n", "groups.g"),
        ("[cluster]\netcd = ['127.0.0.1:10000']\n[node]\nbase_port = 9999\n", "node.base_port"),
        ("[groups.g]\ncache_bytes = 'lots'\norigin = 'http://x/{key}'\n", "groups.g.cache_bytes"),
        ("[node\n", "line 1"),
    ],
)
def test_bad_config_exits_2_naming_file_and_key(tmp_path, body, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    for args in (("config", "check", str(cfg)), ("run", "--config", str(cfg)), ("peers", "--config", str(cfg))):
        out = run(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert str(cfg) in out.stderr and key in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_env_override_error_names_the_variable(tmp_path):
    import os

    env = dict(os.environ, APPLIANCE_NODE__WORKERS="zero")
    out = run("config", "check", EXAMPLE, env=env)
    assert out.returncode == 2 and "APPLIANCE_NODE__WORKERS" in out.stderr and "Traceback" not in out.stderr


def test_config_check_ok_on_the_example():
    out = run("config", "check", EXAMPLE)
    assert out.returncode == 0 and out.stdout.startswith("OK")


def test_missing_file_and_bad_arguments():
    out = run("config", "check", "/nonexistent/appliance.toml")
    assert out.returncode == 2 and "/nonexistent/appliance.toml" in out.stderr
    out = run("stop-node", "nonsense", "--config", EXAMPLE)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    out = run("frobnicate")
    assert out.returncode == 2


def test_get_with_no_reachable_node_is_a_clear_error():
    out = run("get", "--peers", "127.0.0.1:1", "g", "k", "--timeout", "1")
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr and out.stderr.startswith("appliance:")


def test_run_refuses_ports_in_use(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "a.toml"
        cfg.write_text(
            f"[cluster]\nembedded_etcd = false\n[node]\nworkers = 1\nbase_port = {port}\n"
            f'state_dir = "{tmp_path}/s"\nruntime_dir = "{tmp_path}/r"\n[ops]\nmetrics_addr = ""\n'
        )
        out = run("run", "--config", str(cfg))
    assert out.returncode == 2 and f"127.0.0.1:{port}" in out.stderr and "in use" in out.stderr
    assert "Traceback" not in out.stderr


# Global options: before the command (kubectl, etcdctl, git) or after it ----------


def test_global_options_before_or_after_the_command(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text('[node]\nring_hash = "groupcache"\n[cluster]\nembedded_etcd = false\n')
    peers = ",".join(["10.0.0.1:1", "10.0.0.2:1"])
    ring = HashRing(peers.split(","), scheme="groupcache")
    want = [f"k{i}\t{ring.owner(f'k{i}')}" for i in (1, 2)]
    for args in (
        ("--config", str(cfg), "locate", "--peers", peers, "k1", "k2"),
        ("--config", str(cfg), "--peers", peers, "locate", "k1", "k2"),
        ("locate", "k1", "k2", "--config", str(cfg), "--peers", peers),
        # after the command wins
        (
            "--config",
            "/nonexistent.toml",
            "--peers",
            "10.9.9.9:1",
            "locate",
            "--config",
            str(cfg),
            "--peers",
            peers,
            "k1",
            "k2",
        ),
    ):
        out = run(*args)
        assert (out.returncode, out.stdout.splitlines()) == (0, want), (args, out.stderr)


def test_global_option_where_it_does_not_apply_exits_2():
    for args in (("--peers", "127.0.0.1:1", "stats"), ("--config", "/x.toml", "systemd", "install")):
        out = run(*args)
        assert out.returncode == 2, out.stderr
        assert "does not apply" in out.stderr or "applies only" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_stop_node_of_another_box_goes_through_etcd_and_says_when_it_cannot():
    # Not one of this box's workers: a drain request in etcd, which is not running here.
    out = run("--config", EXAMPLE, "stop-node", "127.0.0.1:1")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("appliance: cannot read the cluster from etcd (") and "Traceback" not in out.stderr


# `get` on a terminal ------------------------------------------------------------


def _read_all(fd: int) -> bytes:
    import os

    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _get_under_pty(*args: str) -> tuple[int, bytes]:
    import os
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([APPLIANCE, *args], stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    finally:
        os.close(slave)
    try:
        out = _read_all(master)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    return proc.returncode, out


async def test_get_adds_a_newline_on_a_tty_and_keeps_exact_bytes_in_a_pipe(tmp_path):
    import asyncio

    from support.nodes import CountingOrigin, cluster

    cfg = tmp_path / "a.toml"
    cfg.write_text("[cluster]\nembedded_etcd = false\n")
    async with cluster(1, CountingOrigin({"k": b"v\x00v", "nl": b"line\n"})) as nodes:
        peers = nodes[0].addr
        piped = await asyncio.to_thread(run, "--config", str(cfg), "get", "--peers", peers, "g", "k")
        assert (piped.returncode, piped.stdout) == (0, "v\x00v")
        piped = await asyncio.to_thread(run, "--config", str(cfg), "get", "--peers", peers, "g", "nl")
        assert piped.stdout == "line\n"  # no second newline in a pipe
        _, tty = await asyncio.to_thread(_get_under_pty, "--config", str(cfg), "get", "--peers", peers, "g", "k")
        assert tty == b"v\x00v\r\n"  # the terminal's ONLCR turns the added "\n" into "\r\n"


def test_get_with_given_peers_does_not_hand_the_box_token_to_them(tmp_path):
    """`appliance get --peers X` as a user who can read the box's token
    (root, the service user): X may be anyone, and a read needs no
    credential, so X sees no authorization at all. A write to X proves the
    token for X's address (GC-Proof) and never sends it."""
    from concurrent import futures

    import grpc

    from appliance.pb import cache_pb2, groupcache_pb2

    seen: list[tuple[str, str | None]] = []

    def record(method):
        def handler(request, context):
            auth = dict(context.invocation_metadata()).get("authorization")
            seen.append((method, auth))
            if method == "Get":
                return groupcache_pb2.GetResponse(value=b"v")
            return cache_pb2.ChangeResponse(owner="x")

        return handler

    def service(name, method, request, response):
        handler = grpc.unary_unary_rpc_method_handler(
            record(method), request_deserializer=request.FromString, response_serializer=response.SerializeToString
        )
        return grpc.method_handlers_generic_handler(name, {method: handler})

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        [
            service("groupcachepb.GroupCache", "Get", groupcache_pb2.GetRequest, groupcache_pb2.GetResponse),
            service("appliance.cache.Cache", "Set", cache_pb2.SetRequest, cache_pb2.ChangeResponse),
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        state = tmp_path / "state"
        (state / "auth").mkdir(mode=0o700, parents=True)
        token = "b" * 8 + "0123456789abcdef01234567"
        (state / "auth" / "cluster.token").write_text(token + "\n")
        (state / "auth" / "cluster.token").chmod(0o600)
        cfg = tmp_path / "a.toml"
        cfg.write_text(f'[cluster]\nembedded_etcd = false\n[node]\nstate_dir = "{state}"\n')
        peer = f"127.0.0.1:{port}"
        got = run("get", "--config", str(cfg), "--peers", peer, "scores", "k")
        assert got.returncode == 0 and got.stdout == "v", got.stderr
        put = run("set", "--config", str(cfg), "--peers", peer, "scores", "k", "v2")
        assert put.returncode == 0, put.stderr
    finally:
        server.stop(0)
    assert [m for m, _ in seen] == ["Get", "Set"] and seen[0][1] is None, seen
    assert seen[1][1].startswith("GC-Proof ") and token not in seen[1][1], seen
