"""A bug in a handler (an exception that is not a CacheError) answers
INTERNAL naming the exception type, on every method and both backends, and
the node keeps serving."""

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from appliance.cache.group import Group
from appliance.pb import cache_pb2, cache_pb2_grpc, groupcache_pb2, groupcache_pb2_grpc
from support.nodes import CountingOrigin, cluster

pytestmark = pytest.mark.usefixtures("backend")  # each test on both server backends


class Buggy(CountingOrigin):
    """Raises TypeError for keys starting with "bug" (the origin's own code
    failing, not an origin error: it is not wrapped into a CacheError)."""

    async def __call__(self, key):
        if key.startswith("bug"):
            self.calls.append(key)
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
        return await super().__call__(key)


def assert_internal(err: grpc.aio.AioRpcError, exception: str = "TypeError") -> None:
    assert err.code() == grpc.StatusCode.INTERNAL, (err.code(), err.details())
    assert err.details() == f"internal error: {exception}"
    details = dict(err.trailing_metadata()).get("grpc-status-details-bin")
    assert details is not None, err.trailing_metadata()
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, dict(info.metadata)) == ("INTERNAL", {"exception": exception})
    assert "operand" not in err.details()  # the message may hold data: never sent


async def test_unexpected_exceptions_answer_internal_and_the_node_keeps_serving(monkeypatch):
    origin = Buggy({f"k{i}": f"v{i}".encode() for i in range(100)})
    async with cluster(2, origin) as (a, b):

        def owned_by(node, prefix):
            return next(f"{prefix}{i}" for i in range(1000) if a.peers.owner(f"{prefix}{i}") == node.addr)

        # Keys a owns: a Set or Remove a forwards to a failing owner is that
        # owner's failure (UNAVAILABLE), not a's bug.
        bug_a, bug_b, k, k2 = owned_by(a, "bug"), owned_by(b, "bug"), owned_by(a, "k"), owned_by(b, "k")
        async with grpc.aio.insecure_channel(a.addr) as ch:
            get = groupcache_pb2_grpc.GroupCacheStub(ch).Get
            cache = cache_pb2_grpc.CacheStub(ch)
            # Get of a key a owns (loaded here) and of one b owns (forwarded:
            # b's Forward answers INTERNAL, a loads it itself and fails the same).
            for key in (bug_a, bug_b):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await get(groupcache_pb2.GetRequest(group="g", key=key), timeout=5)
                assert_internal(info.value)
            assert b.groups["g"].stats.server_requests == 1  # the forward reached b
            # GetMany: one key's bug fails the whole call (it is not a per-key answer).
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache.GetMany(cache_pb2.GetManyRequest(group="g", keys=[k, bug_a]), timeout=5)
            assert_internal(info.value)

            def broken(self, *args, **kwargs):
                raise AttributeError("'NoneType' object has no attribute 'main'")

            monkeypatch.setattr(Group, "set", broken)
            monkeypatch.setattr(Group, "remove", broken)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache.Set(cache_pb2.SetRequest(group="g", key=k, value=b"w"), timeout=5)
            assert_internal(info.value, "AttributeError")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache.Remove(cache_pb2.RemoveRequest(group="g", key=k), timeout=5)
            assert_internal(info.value, "AttributeError")
            monkeypatch.undo()

            # Still serving, every method.
            value = origin.data[k]
            assert (await get(groupcache_pb2.GetRequest(group="g", key=k), timeout=5)).value == value
            many = await cache.GetMany(cache_pb2.GetManyRequest(group="g", keys=[k, k2]), timeout=5)
            assert {r.key: r.value for r in many.results} == {k: value, k2: origin.data[k2]}
            assert (await cache.Set(cache_pb2.SetRequest(group="g", key=k, value=b"w"), timeout=5)).owner == a.addr
            assert (await get(groupcache_pb2.GetRequest(group="g", key=k), timeout=5)).value == b"w"
            removed = await cache.Remove(cache_pb2.RemoveRequest(group="g", key=k), timeout=5)
            assert all(p.confirmed for p in removed.peers)
            assert (await get(groupcache_pb2.GetRequest(group="g", key=k), timeout=5)).value == value


async def test_a_bug_in_the_hit_path_answers_internal(monkeypatch):
    # The engine backend serves events inline, outside any task: its own catch-all.
    from appliance.rules.node_rules import NodeRules

    async with cluster(1, CountingOrigin({"k": b"v"})) as (node,):
        real = NodeRules.hit

        def hit(self, group, key, forwarded=False, credentials=None):
            if key == "boom":
                raise KeyError(key)
            return real(self, group, key, forwarded, credentials)

        monkeypatch.setattr(NodeRules, "hit", hit)
        async with grpc.aio.insecure_channel(node.addr) as ch:
            get = groupcache_pb2_grpc.GroupCacheStub(ch).Get
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await get(groupcache_pb2.GetRequest(group="g", key="boom"), timeout=5)
            assert_internal(info.value, "KeyError")
            assert (await get(groupcache_pb2.GetRequest(group="g", key="k"), timeout=5)).value == b"v"


async def test_a_bug_while_building_the_reply_answers_internal(monkeypatch):
    # The reply is built after the node's rules ran: a bad answer from them
    # (here: what no handler expects) is a bug like any other.
    from appliance.rules.node_rules import Ack, Change, NodeRules

    async with cluster(1, CountingOrigin({"k": b"v"})) as (node,):

        def hit(self, group, key, forwarded=False, credentials=None):
            return object()  # not an Entry

        async def get_many(self, group, keys, **kwargs):
            return [None] * len(keys)  # neither Entries nor errors

        async def change(self, group, key, *args, **kwargs):
            return Change(node.addr, [Ack(node.addr, True, error=123)])  # not a str

        monkeypatch.setattr(NodeRules, "hit", hit)
        monkeypatch.setattr(NodeRules, "get_many", get_many)
        monkeypatch.setattr(NodeRules, "set", change)
        monkeypatch.setattr(NodeRules, "remove", change)
        async with grpc.aio.insecure_channel(node.addr) as ch:
            get = groupcache_pb2_grpc.GroupCacheStub(ch).Get
            cache = cache_pb2_grpc.CacheStub(ch)
            calls = [
                (get(groupcache_pb2.GetRequest(group="g", key="k"), timeout=5), "AttributeError"),
                (cache.GetMany(cache_pb2.GetManyRequest(group="g", keys=["k"]), timeout=5), "AttributeError"),
                (cache.Set(cache_pb2.SetRequest(group="g", key="k", value=b"w"), timeout=5), "TypeError"),
                (cache.Remove(cache_pb2.RemoveRequest(group="g", key="k"), timeout=5), "TypeError"),
            ]
            for call, exception in calls:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert_internal(info.value, exception)
            monkeypatch.undo()
            assert (await get(groupcache_pb2.GetRequest(group="g", key="k"), timeout=5)).value == b"v"
