"""[auth] on in-process nodes with real gRPC and HTTP: writes need a
credential with the write scope (a bearer token, or a client certificate
with mTLS), reads are open unless configured, peers authenticate their
fan-out with the cluster's own token. Both server backends."""

from __future__ import annotations

import json
import os

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from appliance import tls as tlsmod
from appliance.cache import errors
from appliance.client import AsyncClient
from appliance.pb import cache_pb2, cache_pb2_grpc, groupcache_pb2, groupcache_pb2_grpc
from appliance.rules.auth import Authenticator, Credentials
from appliance.tokens import TokenFileError, read_token
from support.nodes import CountingOrigin, cluster

CLUSTER_TOKEN = "c" * 8 + os.urandom(12).hex()


def token_file(tmp_path, name: str) -> tuple[str, str]:
    token = name[0] * 8 + os.urandom(12).hex()
    path = tmp_path / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token, str(path)


@pytest.fixture
def creds(tmp_path):
    writer, writer_file = token_file(tmp_path, "writer")
    reader, reader_file = token_file(tmp_path, "reader")
    auth = {
        "credentials": {
            "writer": {"token_file": writer_file, "scopes": ["read", "write"]},
            "reader": {"token_file": reader_file, "scopes": ["read"]},
        }
    }
    return {"writer": writer, "reader": reader, "auth": auth}


def reason(err: grpc.aio.AioRpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            info = error_details_pb2.ErrorInfo()
            status_pb2.Status.FromString(value).details[0].Unpack(info)
            return info.reason
    return ""


@pytest.mark.usefixtures("backend")
async def test_writes_need_the_write_scope_and_peers_fan_out_with_the_cluster_token(creds):
    data = {f"k{i}": b"origin" for i in range(50)}
    async with cluster(3, CountingOrigin(data), auth=creds["auth"], token=CLUSTER_TOKEN) as nodes:
        other = next(n for n in nodes if n.addr != nodes[0].peers.owner("k1"))  # a non-owner: it forwards
        async with grpc.aio.insecure_channel(other.addr) as ch:
            cache = cache_pb2_grpc.CacheStub(ch)
            request = cache_pb2.SetRequest(group="g", key="k1", value=b"new")
            for token, code, why in (
                (None, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
                ("w" * 40, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
                (creds["reader"], grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
            ):
                metadata = (("authorization", f"Bearer {token}"),) if token else None
                for call in (
                    cache.Set(request, timeout=5, metadata=metadata),
                    cache.Remove(cache_pb2.RemoveRequest(group="g", key="k1"), timeout=5, metadata=metadata),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == code and reason(info.value) == why
                    assert token is None or token not in info.value.details()
            # Not applied anywhere.
            assert all(n.groups["g"].peek("k1") is None for n in nodes)
            good = (("authorization", f"Bearer {creds['writer']}"),)
            reply = await cache.Set(request, timeout=5, metadata=good)
            # The owner stored it (a peer call with the cluster token) and
            # every other node confirmed dropping its copy (the same).
            assert [p.confirmed for p in reply.peers] == [True] * 3, reply
            owner = next(n for n in nodes if n.addr == reply.owner)
            assert owner.groups["g"].peek("k1").value == b"new"
            # Reads stay open.
            got = await groupcache_pb2_grpc.GroupCacheStub(ch).Get(
                groupcache_pb2.GetRequest(group="g", key="k1"), timeout=5
            )
            assert got.value == b"new"
            removed = await cache.Remove(cache_pb2.RemoveRequest(group="g", key="k1"), timeout=5, metadata=good)
            assert all(p.confirmed for p in removed.peers) and len(removed.peers) == 3
            assert all(n.groups["g"].peek("k1") is None for n in nodes)
        # The Python client sends its token with every call.
        async with AsyncClient([n.addr for n in nodes], token=creds["writer"]) as client:
            await client.set("g", "k2", b"via client")
            assert await client.get("g", "k2") == b"via client"
        async with AsyncClient([n.addr for n in nodes]) as anonymous:
            with pytest.raises(errors.Unauthenticated):
                await anonymous.set("g", "k2", b"x")
            assert await anonymous.get("g", "k2") == b"via client"


@pytest.mark.usefixtures("backend")
async def test_handoff_needs_the_cluster_token_and_a_planned_stop_presents_it(creds):
    data = {f"k{i}": f"v{i}".encode() for i in range(60)}
    async with cluster(3, CountingOrigin(data), auth=creds["auth"], token=CLUSTER_TOKEN) as nodes:
        a, b, c = nodes
        entry = cache_pb2.HandoffEntry(key="h", value=b"handed", ttl=0)
        request = cache_pb2.HandoffRequest(source=b.addr, group="g", entries=[entry])
        async with grpc.aio.insecure_channel(a.addr) as ch:
            peer = cache_pb2_grpc.PeerStub(ch)
            for token, code in (
                (None, grpc.StatusCode.UNAUTHENTICATED),
                (creds["reader"], grpc.StatusCode.PERMISSION_DENIED),
                (creds["writer"], grpc.StatusCode.PERMISSION_DENIED),
            ):
                metadata = (("authorization", f"Bearer {token}"),) if token else None
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await peer.Handoff(request, timeout=5, metadata=metadata)
                assert info.value.code() == code and reason(info.value) == code.name, info.value.details()
            assert a.groups["g"].main.get("h") is None
            # Peeks are reads: open here, like Get.
            await peer.Peek(cache_pb2.PeekRequest(group="g", key="k1"), timeout=5)
        # A planned stop hands off with the cluster token: its keys arrive.
        for key in data:
            await a.rules.get("g", key, timeout=5)
        leaving = c
        mine = [k for k in data if leaving.groups["g"].main.get(k) is not None]
        assert mine
        stay = [n for n in nodes if n is not leaving]
        for n in nodes:
            n.set_peers([m.addr for m in stay], 99)
        report = await leaving.handoff(5)
        assert report.accepted == len(mine) and report.failed == 0, report
        assert all(any(n.groups["g"].main.get(k) is not None for n in stay) for k in mine)


@pytest.mark.usefixtures("backend")
async def test_reads_can_require_a_credential_too(creds, tmp_path):
    auth = {**creds["auth"], "reads": "authenticated"}
    async with cluster(2, CountingOrigin({"k": b"v"}), auth=auth, token=CLUSTER_TOKEN) as nodes:
        for node in nodes:
            async with grpc.aio.insecure_channel(node.addr) as ch:
                stub = groupcache_pb2_grpc.GroupCacheStub(ch)
                get = groupcache_pb2.GetRequest(group="g", key="k")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Get(get, timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "read scope" in info.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await cache_pb2_grpc.CacheStub(ch).GetMany(
                        cache_pb2.GetManyRequest(group="g", keys=["k"]), timeout=5
                    )
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # A reader's Get also works through the non-owner: it
                # forwards with the cluster token.
                reply = await stub.Get(get, timeout=5, metadata=(("authorization", f"Bearer {creds['reader']}"),))
                assert reply.value == b"v"
        assert sum(n.groups["g"].stats.peer_errors for n in nodes) == 0


@pytest.mark.usefixtures("backend")
async def test_http_reads_follow_the_same_rule(creds):
    from appliance.node.serving import Node
    from support.nodes import settings

    s = settings(auth={**creds["auth"], "reads": "authenticated"})
    node = Node(s, {"g": CountingOrigin({"k": b"v"})}, port=0, http_port=0, token=CLUSTER_TOKEN)
    await node.start()
    node.set_peers([node.addr], 1)
    try:
        url = f"http://127.0.0.1:{node.http_api.port}/groups/g/keys/k"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 401 and "read scope" in await r.text()
            async with http.get(url, headers={"Authorization": "Bearer " + "x" * 30}) as r:
                assert r.status == 401
            async with http.get(url, headers={"Authorization": f"Bearer {creds['reader']}"}) as r:
                assert r.status == 200 and await r.read() == b"v"
    finally:
        await node.stop(0)


@pytest.mark.parametrize("server", ["grpcio", "engine"])
async def test_a_client_certificate_identity_can_carry_the_write_scope(pki, tmp_path, server):
    """With mTLS, [auth.credentials.X] tls_identity names a client
    certificate (its CN or a SAN); that certificate may then write."""
    if server == "engine":
        from appliance.fronts import engine_available

        if engine_available():
            pytest.skip(f"the engine is not built here: {engine_available()}")
    tls = {"cert": str(pki.cert), "key": str(pki.key), "ca": str(pki.ca), "client_auth": True}
    auth = {"credentials": {"ops": {"tls_identity": "groupcache client", "scopes": ["read", "write"]}}}
    async with cluster(2, CountingOrigin({"k": b"v"}), auth=auth, token=CLUSTER_TOKEN, tls=tls, server=server) as nodes:
        assert {n.backend for n in nodes} == {server}
        with_cert = tlsmod.credentials_from_files(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        node_cert = tlsmod.credentials_from_files(ca=pki.ca, cert=pki.cert, key=pki.key)
        request = cache_pb2.SetRequest(group="g", key="k", value=b"by cert")
        async with grpc.aio.secure_channel(nodes[0].addr, with_cert) as ch:
            reply = await cache_pb2_grpc.CacheStub(ch).Set(request, timeout=5)
            assert all(p.confirmed for p in reply.peers)
        async with grpc.aio.secure_channel(nodes[0].addr, node_cert) as ch:  # a valid certificate, not named
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache_pb2_grpc.CacheStub(ch).Set(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_files_must_be_private_and_long(tmp_path):
    path = tmp_path / "t"
    path.write_text("x" * 40)
    path.chmod(0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        read_token(path)
    path.chmod(0o600)
    assert read_token(path) == "x" * 40
    path.write_text("short")
    with pytest.raises(TokenFileError, match="at least 16") as info:
        read_token(path)
    assert "short" not in str(info.value)
    with pytest.raises(TokenFileError, match="cannot read"):
        read_token(tmp_path / "missing")


def test_tokens_are_compared_by_digest_against_every_credential():
    auth = Authenticator(tokens=[("a", "a" * 20, ["read"]), ("b", "b" * 20, ["read", "write"])])
    assert auth.authenticate(Credentials("Bearer " + "b" * 20)).name == "b"
    assert auth.authenticate(Credentials("bearer  " + "a" * 20)).name == "a"  # scheme is case-free
    assert auth.authenticate(Credentials()) is None
    for bad in ("Basic abc", "Bearer ", "Bearer " + "c" * 20):
        with pytest.raises(errors.Unauthenticated) as info:
            auth.authenticate(Credentials(bad))
        assert "c" * 20 not in str(info.value)
    # No token in the principal, its repr, or anything kept in clear.
    assert "b" * 20 not in repr(auth.__dict__) and "b" * 20 not in json.dumps(str(auth._tokens))
