"""Real nodes on loopback, real gRPC: routing, single load, statuses."""

import asyncio
import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2

from appliance.cache.errors import OriginError
from appliance.cache.ring import HashRing
from appliance.pb import admin_pb2, admin_pb2_grpc, groupcache_pb2, groupcache_pb2_grpc
from appliance.rules.auth import bearer
from support.nodes import CountingOrigin, all_arrived, client_gets, cluster

pytestmark = pytest.mark.usefixtures("backend")  # each test on both server backends


async def get(addr, group, key, timeout=5.0, metadata=None):
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = groupcache_pb2_grpc.GroupCacheStub(ch)
        return (
            await stub.Get(groupcache_pb2.GetRequest(group=group, key=key), timeout=timeout, metadata=metadata)
        ).value


def reason(err: grpc.aio.AioRpcError) -> str:
    for k, v in err.trailing_metadata():
        if k == "grpc-status-details-bin":
            from google.rpc import status_pb2

            st = status_pb2.Status.FromString(v)
            info = error_details_pb2.ErrorInfo()
            st.details[0].Unpack(info)
            return info.reason
    return ""


async def test_concurrent_cold_gets_on_three_nodes_load_once():
    origin = CountingOrigin({"hot-key": b"value-1"})
    origin.gate = asyncio.Event()
    async with cluster(3, origin) as nodes:
        channels = [grpc.aio.insecure_channel(n.addr) for n in nodes]
        stubs = [groupcache_pb2_grpc.GroupCacheStub(c) for c in channels]
        req = groupcache_pb2.GetRequest(group="g", key="hot-key")
        calls = [asyncio.ensure_future(stubs[i % 3].Get(req, timeout=10)) for i in range(90)]
        # Every Get arrives while the owner's load is held, then it finishes.
        await all_arrived(nodes, 90)
        origin.gate.set()
        replies = await asyncio.gather(*calls)
        assert {r.value for r in replies} == {b"value-1"}
        assert origin.calls == ["hot-key"]
        owner = nodes[0].peers.owner("hot-key")
        stats = {n.addr: n.groups["g"].stats for n in nodes}
        assert stats[owner].local_loads == 1
        assert client_gets(nodes) == 90
        for c in channels:
            await c.close()


async def test_every_node_returns_the_same_value_for_many_keys():
    data = {f"k{i}": f"v{i}".encode() for i in range(200)}
    origin = CountingOrigin(data)
    async with cluster(3, origin) as nodes:
        for i, (k, v) in enumerate(data.items()):
            assert await get(nodes[i % 3].addr, "g", k) == v
        assert sorted(origin.calls) == sorted(data)  # each key loaded once...
        # ... by its owner: the ring's split (it depends on the free ports picked).
        ring = HashRing([n.addr for n in nodes])
        expected = {n.addr: sum(ring.owner(k) == n.addr for k in data) for n in nodes}
        assert {n.addr: n.groups["g"].stats.local_loads for n in nodes} == expected


@pytest.mark.parametrize(
    "group,key,code,why",
    [
        ("", "k", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        ("g", "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        ("g", "x" * 251, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        ("g", "键" * 84, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),  # 252 UTF-8 bytes
        ("nope", "k", grpc.StatusCode.NOT_FOUND, "GROUP_NOT_FOUND"),
        ("g", "missing", grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND"),
    ],
)
async def test_bad_requests_get_documented_statuses(group, key, code, why):
    origin = CountingOrigin({"k": b"v"})
    async with cluster(3, origin) as nodes:
        for n in nodes:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await get(n.addr, group, key)
            assert info.value.code() == code
            assert reason(info.value) == why
            assert await get(n.addr, "g", "k") == b"v"  # still serving


async def test_origin_failure_is_unavailable_with_cause_and_not_cached():
    class Flaky(CountingOrigin):
        fail = True

        async def __call__(self, key):
            self.calls.append(key)
            if self.fail:
                raise OriginError("database is down")
            return b"ok"

    origin = Flaky()
    token = "r" * 8 + "0123456789abcdef01234567"
    async with cluster(3, origin, token=token) as nodes:
        # A caller with a read credential (here the cluster's) is told the cause ...
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(nodes[0].addr, "g", "k", metadata=bearer(token))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "database is down" in info.value.details()
        assert reason(info.value) == "ORIGIN_ERROR"
        # ... anyone else the kind: the origin's words stay in the worker's log.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(nodes[1].addr, "g", "k")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and reason(info.value) == "ORIGIN_ERROR"
        assert "database" not in info.value.details()
        origin.fail = False
        assert await get(nodes[1].addr, "g", "k") == b"ok"
        assert len(origin.calls) == 3


async def test_malformed_request_bodies_are_invalid_argument():
    async with cluster(1, CountingOrigin({"k": b"v"})) as (node,):
        async with grpc.aio.insecure_channel(node.addr) as ch:
            raw = ch.unary_unary("/groupcachepb.GroupCache/Get")  # bytes in, bytes out
            bodies = [b"\xff\xff\xff", b"\x0a\x02\xc3\x28\x12\x01k", b"\x0a\x80\x80\x80\x80\x10"]
            for body in bodies:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await raw(body, timeout=5)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await get(node.addr, "g", "k") == b"v"


async def test_forwarded_request_is_served_by_the_receiver():
    origin = CountingOrigin({f"k{i}": b"v" for i in range(50)})
    async with cluster(2, origin) as (a, b):
        # Pick keys a does not own, and send them to a marked as forwarded.
        keys = [k for k in origin.data if a.peers.owner(k) == b.addr][:10]
        for k in keys:
            assert await get(a.addr, "g", k, metadata=(("x-groupcache-forwarded", "1"),)) == b"v"
        assert a.groups["g"].stats.server_requests == len(keys)
        assert a.groups["g"].stats.peer_loads == 0
        assert b.groups["g"].stats.gets == 0


async def test_owner_down_means_local_load_not_client_failure():
    origin = CountingOrigin({f"k{i}": b"v" for i in range(50)})
    async with cluster(2, origin) as (a, b):
        keys = [k for k in origin.data if a.peers.owner(k) == b.addr][:5]
        await b.stop(0)
        for k in keys:
            assert await get(a.addr, "g", k, timeout=3) == b"v"
        assert a.groups["g"].stats.peer_errors == len(keys)
        assert len(a.groups["g"].main) == 0  # not cached as owner


async def test_set_peers_on_admin_socket_ignores_stale_revisions(tmp_path):
    async with cluster(2, CountingOrigin({"k": b"v"}), admin_dir=tmp_path) as (a, b):
        async with grpc.aio.insecure_channel(f"unix:{tmp_path}/n0.sock") as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            r = await admin.SetPeers(admin_pb2.SetPeersRequest(peers=[a.addr], revision=5))
            assert r.applied and r.revision == 5 and list(a.peers.ring.nodes) == [a.addr]
            r = await admin.SetPeers(admin_pb2.SetPeersRequest(peers=[a.addr, b.addr], revision=4))
            assert not r.applied and r.revision == 5 and list(a.peers.ring.nodes) == [a.addr]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.SetPeers(admin_pb2.SetPeersRequest(peers=["not-an-address"], revision=9))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The admin service does not exist on the data port.
        async with grpc.aio.insecure_channel(a.addr) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin_pb2_grpc.AdminStub(ch).SetPeers(admin_pb2.SetPeersRequest(peers=[], revision=99))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_admin_address_must_be_local():
    from appliance.node.serving import Node
    from support.nodes import settings

    with pytest.raises(ValueError, match="unix socket or a loopback"):
        Node(settings(), {"g": CountingOrigin()}, port=0, admin_address="0.0.0.0:7000")


async def test_client_generated_from_the_seed_proto(tmp_path):
    from importlib.resources import files
    from pathlib import Path

    import grpc_tools

    proto_dir = Path(__file__).resolve().parent.parent / "fixtures" / "seed"
    out = tmp_path / "seedpb"
    out.mkdir()
    include = str(files(grpc_tools) / "_proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(proto_dir / "groupcachepb.proto"),
        ],
        check=True,
    )
    # A separate process: its descriptors would clash with ours in one pool.
    script = (
        "import sys, grpc, groupcachepb_pb2 as pb, groupcachepb_pb2_grpc as rpc\n"
        "stub = rpc.GroupCacheStub(grpc.insecure_channel(sys.argv[1]))\n"
        "for key in sys.argv[2:]:\n"
        "    print(stub.Get(pb.GetRequest(group='g', key=key), timeout=5).value.decode())\n"
    )
    origin = CountingOrigin({"张三": b"100", "李四": b"1000"})
    async with cluster(3, origin) as nodes:
        for n in nodes:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                script,
                n.addr,
                "张三",
                "李四",
                cwd=out,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, stderr.decode()
            assert stdout.decode().split() == ["100", "1000"]
    assert sorted(origin.calls) == ["张三", "李四"]
