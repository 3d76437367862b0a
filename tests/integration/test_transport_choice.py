"""Which server backend serves (appliance.fronts.choose), and a client
that sends a `:authority` with a "/" in it, as the seed's Go clients do."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from appliance.config import Settings
from appliance.fronts import choose
from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from support.nodes import CountingOrigin, cluster


def test_auto_takes_the_engine_where_it_is_built():
    from appliance.fronts import engine_available

    assert choose(Settings(node={"server": "grpcio"}))[0] == "grpcio"
    missing = engine_available()
    if missing:  # no Rust here: the portable path, and why
        assert choose(Settings()) == ("grpcio", f"auto: {missing}")
        return
    assert choose(Settings()) == ("engine", "auto: the engine is built")
    assert choose(Settings(cluster={"seed_interop": True}, node={"host": "localhost"}))[0] == "engine"
    assert choose(Settings(node={"server": "engine"})) == ("engine", "node.server = engine")
    # With TLS too: the engine serves it (rustls).
    base = Settings()
    tls = base.tls.model_copy(update={"cert": "/c", "key": "/k"})
    assert choose(base.model_copy(update={"tls": tls})) == ("engine", "auto: the engine is built (TLS in rustls)")


def test_without_the_engine_auto_serves_grpcio_and_says_why(tmp_path):
    """A machine without Rust: appliance_engine does not import, and config
    check says grpcio serves and why (a child process where the module is
    hidden, as on such a machine)."""
    path = tmp_path / "a.toml"
    path.write_text("")
    hide = "import sys; sys.modules['appliance_engine'] = None; from appliance.cli import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", hide, "config", "check", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "server: grpcio (auto: appliance_engine does not import" in out.stdout, out.stdout


@pytest.mark.parametrize(
    "toml, complaint",
    [
        ('[node]\nserver = "native"\n', '"native" (pygrpc-native) was removed'),
        ('[node]\nserver = "fast"\n', 'one of "auto", "engine", "grpcio"'),
    ],
)
def test_config_check_refuses_an_unknown_server(tmp_path, toml, complaint):
    path = tmp_path / "a.toml"
    path.write_text(toml)
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2, out
    assert "node.server" in out.stderr and complaint in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_config_check_says_which_server_runs(tmp_path):
    from appliance.fronts import engine_available

    path = tmp_path / "a.toml"
    path.write_text('[cluster]\nseed_interop = true\n[node]\nhost = "localhost"\n')
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    built = engine_available() is None
    want = "server: engine (auto: the engine is built)" if built else "server: grpcio (auto: appliance_engine"
    assert want in out.stdout, out.stdout


@pytest.mark.parametrize("server", ["engine", "grpcio"])
async def test_a_slash_in_the_authority_is_served(server):
    """grpc-go dials etcd:///groupcache/<addr> and sends `:authority:
    groupcache/<addr>`, which is not a URI authority. grpcio serves it; the
    engine does too (its h2 is patched not to reset such a stream:
    engine/vendor/README.vendor.md)."""
    from appliance.fronts import engine_available
    from support import nodes

    if server == "engine" and engine_available():
        pytest.skip(f"the engine is not built here: {engine_available()}")
    nodes.BACKEND["server"] = server
    try:
        async with cluster(1, CountingOrigin({"k": b"v"})) as (node,):
            assert node.backend == server
            options = [("grpc.default_authority", f"groupcache/{node.addr}")]
            async with grpc.aio.insecure_channel(node.addr, options=options) as ch:
                stub = groupcache_pb2_grpc.GroupCacheStub(ch)
                for _ in range(2):  # a miss, then a hit
                    reply = await stub.Get(groupcache_pb2.GetRequest(group="g", key="k"), timeout=5)
                    assert reply.value == b"v"
    finally:
        nodes.BACKEND["server"] = "auto"


def test_config_check_accepts_localhost_and_says_what_a_mixed_cluster_needs(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('[node]\nhost = "localhost"\n')
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stdout.splitlines() if line.startswith("note: mixed cluster")]
    assert len(notes) == 1 and "4-character" in notes[0] and "seed_interop is off" in notes[0], out.stdout
    path.write_text('[cluster]\nseed_interop = true\n[node]\nhost = "127.0.0.1"\n')
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "node.host" in out.stderr and "localhost" in out.stderr, out.stderr
