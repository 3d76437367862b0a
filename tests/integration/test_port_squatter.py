"""A local user who binds a stopped worker's port catches nothing it can use
and plants no value (issue 21: "a local user squats a stopped worker's port").

Real nodes on loopback, real gRPC, each server backend. Node B stops while
node A still has it in its ring (a crashed worker keeps its etcd lease for
a while, and a stopped one is still asked for peeks). The squatter, a gRPC
server on B's port, records every call's metadata and answers Get, Peek,
GetMany, Forward and Health with a value of its choosing. Then:

- no call it receives carries the cluster token;
- A serves the origin's value, never the planted one, for Gets (forwarded
  to the squatter as the owner) and for misses that peek at it as a
  previous owner;
- what it caught, replayed to B restarted on the same port, is refused.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from appliance.node.serving import Node
from appliance.pb import cache_pb2, groupcache_pb2
from appliance.rules.peer_proofs import READ, WRITE
from support.nodes import CountingOrigin, cluster, settings

pytestmark = pytest.mark.usefixtures("backend")

TOKEN = "squatter-test-cluster-token-0123456789"
PLANTED = b"planted-by-the-squatter"
AUTH = {"writes": "authenticated"}


class Squatter:
    """Answers every value-bearing call with PLANTED; records what it is sent."""

    def __init__(self, addr: str) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        self.server.add_insecure_port(addr)
        self.addr = addr

    def _seen(self, method: str, context) -> None:
        self.calls.append((method, tuple(context.invocation_metadata() or ())))

    def service(self, details):
        method = details.method
        planted = groupcache_pb2.GetResponse(value=PLANTED).SerializeToString()

        def unary(reply: bytes):
            async def handle(request, context):
                self._seen(method, context)
                return reply

            return grpc.unary_unary_rpc_method_handler(handle)

        if method == "/groupcachepb.GroupCache/Get":
            return unary(planted)
        if method == "/appliance.cache.Cache/GetMany":

            async def many(request, context):
                self._seen(method, context)
                keys = cache_pb2.GetManyRequest.FromString(request).keys
                reply = cache_pb2.GetManyResponse()
                for key in keys:
                    reply.results.add(key=key, value=PLANTED)
                return reply.SerializeToString()

            return grpc.unary_unary_rpc_method_handler(many)
        if method == "/appliance.cache.Peer/Peek":
            return unary(cache_pb2.PeekResponse(found=True, response=planted).SerializeToString())
        if method == "/grpc.health.v1.Health/Check":
            return unary(health_pb2.HealthCheckResponse(status=1).SerializeToString())
        if method == "/appliance.cache.Peer/Forward":

            async def forward(requests, context):
                self._seen(method, context)
                async for raw in requests:
                    request = cache_pb2.ForwardRequest.FromString(raw)
                    yield cache_pb2.ForwardResponse(id=request.id, response=planted).SerializeToString()

            return grpc.stream_stream_rpc_method_handler(forward)
        return None

    def authorizations(self) -> list[str]:
        return [v for _, md in self.calls for k, v in md if k == "authorization"]


def owned_by(node: Node, addr: str, prefix: str, count: int) -> list[str]:
    keys = (f"{prefix}-{i}" for i in range(100_000))
    return [k for k in keys if node.peers.owner(k) == addr][:count]


async def test_a_squatter_on_a_stopped_workers_port_catches_no_token_and_plants_no_value(tmp_path):
    origin = CountingOrigin()
    async with cluster(2, origin, auth=AUTH, token=TOKEN) as (a, b):
        b_addr, b_port = b.addr, b.port
        forwarded = owned_by(a, b_addr, "fwd", 5)
        batched = owned_by(a, b_addr, "many", 5)
        peeked = owned_by(a, b_addr, "peek", 5)
        origin.data.update({k: f"value:{k}".encode() for k in forwarded + batched + peeked})
        await b.stop(0)
        squatter = Squatter(b_addr)
        await squatter.server.start()
        try:
            # B is still in A's ring: A forwards B's keys to the squatter (a
            # batch first, while A has no reason yet not to ask it).
            many = await a.rules.get_many("g", batched)
            assert [e.value for e in many] == [f"value:{k}".encode() for k in batched]
            for key in forwarded:
                assert (await a.groups["g"].get(key)).value == f"value:{key}".encode()
            # B leaves A's ring: A asks it, a previous owner, before the origin.
            a.set_peers([a.addr], 2)
            for key in peeked:
                assert (await a.groups["g"].get(key)).value == f"value:{key}".encode()
            methods = {m for m, _ in squatter.calls}
            assert "/appliance.cache.Cache/GetMany" in methods, methods
            assert methods & {"/groupcachepb.GroupCache/Get", "/appliance.cache.Peer/Forward"}, methods
            assert "/appliance.cache.Peer/Peek" in methods, methods
            caught = squatter.authorizations()
            assert caught, "A's calls carried no credential at all"
            assert not any(TOKEN in v for v in caught), "the cluster token reached the squatter"
        finally:
            await squatter.server.stop(0)

        # What the squatter caught, replayed to the worker that comes back on
        # that port, neither writes nor counts as a peer's.
        again = Node(settings(("g",), AUTH), {"g": origin}, port=b_port, token=TOKEN)
        await again.start()
        try:
            async with grpc.aio.insecure_channel(again.addr) as channel:
                set_ = channel.unary_unary("/appliance.cache.Cache/Set")
                request = cache_pb2.SetRequest(group="g", key="replayed", value=b"x").SerializeToString()
                for authorization in set(caught):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await set_(request, metadata=(("authorization", authorization),), timeout=5)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "before this worker began listening" in refused.value.details()
        finally:
            await again.stop(0)


async def test_a_replayed_proof_is_refused_by_every_other_worker():
    """A proof is for one address: caught anywhere, it opens nothing elsewhere."""
    origin = CountingOrigin()
    async with cluster(3, origin, auth=AUTH, token=TOKEN) as (a, b, c):
        authorization, _ = a.rules.auth.proofs.make(b.addr, WRITE)  # as A would call B
        request = cache_pb2.SetRequest(group="g", key="k", value=b"x").SerializeToString()
        async with grpc.aio.insecure_channel(b.addr) as to_b, grpc.aio.insecure_channel(c.addr) as to_c:
            await to_b.unary_unary("/appliance.cache.Cache/Set")(
                request, metadata=(("authorization", authorization),), timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await to_c.unary_unary("/appliance.cache.Cache/Set")(
                    request, metadata=(("authorization", authorization),), timeout=5
                )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert f"not for this worker ({c.addr})" in refused.value.details()


async def test_a_reads_proof_never_writes_and_another_name_of_the_port_is_refused():
    """What a listener could catch from reads (Gets, Peeks, probes) cannot
    Set or hand entries off; and a proof for `localhost:P`, a name a local
    user could bind beside the worker's 127.0.0.1:P, opens nothing there."""
    origin = CountingOrigin()
    async with cluster(2, origin, auth=AUTH, token=TOKEN) as (a, b):
        proofs = a.rules.auth.proofs
        set_request = cache_pb2.SetRequest(group="g", key="k", value=b"x").SerializeToString()
        handoff = cache_pb2.HandoffRequest(source=a.addr, group="g")
        handoff.entries.add(key="k", value=b"planted", ttl=0)
        async with grpc.aio.insecure_channel(b.addr) as to_b:
            calls = {
                "/appliance.cache.Cache/Set": set_request,
                "/appliance.cache.Peer/Handoff": handoff.SerializeToString(),
            }
            for path, body in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await to_b.unary_unary(path)(
                        body, metadata=(("authorization", proofs.make(b.addr, READ)[0]),), timeout=5
                    )
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (path, refused.value)
                assert "write scope" in refused.value.details()
            port = b.addr.rpartition(":")[2]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await to_b.unary_unary("/appliance.cache.Cache/Set")(
                    set_request, metadata=(("authorization", proofs.make(f"localhost:{port}", WRITE)[0]),), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert b.groups["g"].main.get("k") is None  # nothing planted
