"""The clients' grpc-free core: ring installs, tries, requests, channel pool."""

import time

import pytest

from appliance.cache import errors
from appliance.cache.ring import HashRing
from appliance.client import routing
from appliance.pb import cache_pb2

PEERS = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]


def test_install_orders_by_revision_unless_forced():
    r = routing.Router(50, "seed")
    assert r.install(PEERS[::-1], 5) == []  # from empty: nobody left
    assert r.ring == HashRing(PEERS)  # sorted, as the nodes' controller sorts
    assert r.install(PEERS[:2], 4) is None  # older: ignored
    assert r.install(PEERS[:2], 5) is None  # same revision: nothing new
    assert r.install(PEERS[:2], 6) == [PEERS[2]]
    assert r.install(PEERS, 2, force=True) == []  # a follower's read is the truth
    assert r.revision == 2
    assert r.install(PEERS) is None  # no revision (a static list or a callable): same ring
    with pytest.raises(ValueError, match='expected "host:port"'):
        r.install(["nope"])
    with pytest.raises(TypeError, match="not a single str"):
        r.install("127.0.0.1:9001")


def test_attempts_go_to_the_owner_then_others_within_one_deadline():
    r = routing.Router(50, "seed")
    r.install(PEERS)
    owner = r.ring.owner("k")
    tries = r.attempts("k", time.monotonic() + 5)
    order = []
    for peer, left in tries:
        assert 0 < left <= 5
        order.append(peer)
        assert tries.failed(errors.PeerError(f"{peer} down")) == (len(order) == 1)  # refresh after the first
    assert order[0] == owner and sorted(order) == PEERS
    with pytest.raises(errors.PeerError, match="down"):
        raise tries.error()
    # An owner's own answer ends the call.
    tries = r.attempts("k", time.monotonic() + 5)
    for _ in tries:
        with pytest.raises(errors.KeyNotFound):
            tries.failed(errors.KeyNotFound("no"))
        break
    # Past the deadline: no try at all.
    assert list(r.attempts("k", time.monotonic() - 1)) == []
    assert isinstance(routing.Router(50, "seed").attempts("k", time.monotonic() + 1).error(), errors.PeerError)


def test_get_many_is_one_request_per_owner_and_keeps_only_missing_keys_quiet():
    ring = HashRing(PEERS)
    keys = [f"k{i}" for i in range(50)]
    ops = routing.get_many_ops(ring, "g", keys + keys[:5])
    assert len(ops) == 3
    assert sorted(k for op in ops for k in op.request.keys) == sorted(keys)
    for op in ops:
        assert {ring.owner(k) for k in op.request.keys} == {ring.owner(op.key)}
    reply = cache_pb2.GetManyResponse()
    reply.results.add(key="a", value=b"1")
    reply.results.add(key="b", code=5, error="missing")
    assert ops[0].reply(reply) == {"a": b"1"}
    reply.results.add(key="c", code=14, error="db down")
    with pytest.raises(errors.OriginError, match="db down"):
        ops[0].reply(reply)


def test_pool_dials_once_per_peer_and_closes_retired_channels_after_their_linger():
    dialled = []

    def dial(peer):
        dialled.append(peer)
        return f"channel-{peer}-{len(dialled)}", {"m": peer}

    pool = routing.Pool(dial, linger=0.0)
    assert pool.methods("a") == {"m": "a"} and pool.methods("a") == {"m": "a"}
    pool.methods("b")
    assert dialled == ["a", "b"]
    pool.retire(["a", "unknown"])
    assert pool.expired() == ["channel-a-1"]
    assert pool.expired() == []
    pool.methods("a")  # back in the ring: a new channel
    pool.linger = 60
    pool.retire(["a"])
    assert pool.expired() == []  # calls may still be on it
    assert sorted(pool.drain()) == ["channel-a-3", "channel-b-2"]
    with pytest.raises(RuntimeError, match="closed"):
        pool.methods("a")


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _first_peers(router, op, n):
    return [next(iter(router.plan(op, time.monotonic() + 5)))[0] for _ in range(n)]


def test_hot_key_gets_spread_over_every_node_cold_ones_go_to_the_owner():
    clock = _Clock()
    r = routing.Router(50, "seed", routing.HotKeys(threshold=4, half_life=1.0, clock=clock))
    r.install(PEERS)
    hot, cold = routing.get_op("g", "hot"), routing.get_op("g", "cold")
    owner = r.ring.owner("hot")
    assert _first_peers(r, hot, 3) == [owner] * 3  # not hot yet
    spread = _first_peers(r, hot, 30)
    assert set(spread) == set(PEERS)  # every node in turn
    assert _first_peers(r, cold, 1) == [r.ring.owner("cold")]
    # A write goes to the owner and resets the key: its next reads too.
    assert _first_peers(r, routing.set_op("g", "hot", b"v", 0), 1) == [owner]
    assert _first_peers(r, hot, 1) == [owner]
    # Rates decay: a key read rarely is not hot.
    _first_peers(r, hot, 10)
    clock.now += 30
    assert _first_peers(r, hot, 1) == [owner]


def test_hot_key_spreading_off_and_retries_still_reach_other_nodes():
    r = routing.Router(50, "seed")
    r.install(PEERS)
    op = routing.get_op("g", "k")
    assert _first_peers(r, op, 50) == [r.ring.owner("k")] * 50
    r = routing.Router(50, "seed", routing.HotKeys(threshold=1))
    r.install(PEERS)
    tries = [p for p, _ in r.plan(op, time.monotonic() + 5)]
    assert sorted(tries) == sorted(PEERS)  # the spread first try, then the others


def test_a_get_s_first_try_without_message_objects_routes_as_plan_does():
    """Router.first_get (the engine client's Get): the owner, or a hot key's
    next node; None on the turn that listens for a hint; a failed first try
    goes on with the other nodes (Attempts.after)."""
    r = routing.Router(50, "seed")
    assert r.first_get("g", "k") is None  # no ring
    r.install(PEERS)
    assert [r.first_get("g", "k") for _ in range(20)] == [r.ring.owner("k")] * 20
    clock = _Clock()
    r = routing.Router(50, "seed", routing.HotKeys(threshold=4, half_life=1.0, clock=clock))
    r.install(PEERS)
    firsts = [r.first_get("g", "hot") for _ in range(8 * routing.LISTEN_EVERY)]
    assert firsts.count(None) == 8  # the listening turns
    assert set(firsts[-16:]) - {None} == set(PEERS)  # hot: spread over every node
    owner = r.ring.owner("k")
    tries = r.attempts("k", time.monotonic() + 5)
    assert tries.after(owner, errors.PeerError("down"))  # refresh after the first failure
    assert owner not in [p for p, _ in tries] and len(PEERS) > 1
    with pytest.raises(errors.KeyNotFound):
        r.attempts("k", time.monotonic() + 5).after(owner, errors.KeyNotFound("no"))


def test_an_owners_hot_key_hint_spreads_a_key_this_client_reads_rarely():
    clock = _Clock()
    hot = routing.HotKeys(threshold=float("inf"), hint_s=2.0, clock=clock)  # its own reads never make a key hot
    r = routing.Router(50, "seed", hot)
    r.install(PEERS)
    op, other = routing.get_op("g", "k"), routing.get_op("g", "other")
    owner = r.ring.owner("k")
    assert _first_peers(r, op, 5) == [owner] * 5
    r.heard(op, (("x-groupcache-ttl-ms", "5"),))  # no hint
    r.heard(routing.set_op("g", "k", b"v", 0), (("x-groupcache-hot", "1"),))  # not a Get's
    assert _first_peers(r, op, 1) == [owner]
    r.heard(op, (("x-groupcache-hot", "1"),))
    assert set(_first_peers(r, op, 30)) == set(PEERS)  # spread while the hint holds
    assert _first_peers(r, other, 1) == [r.ring.owner("other")]  # for that key only
    clock.now += 2.5
    assert _first_peers(r, op, 3) == [owner] * 3  # the hint ran out
    r.heard(op, (("x-groupcache-hot", "1"),))
    _first_peers(r, routing.set_op("g", "k", b"v", 0), 1)  # a write drops it
    assert _first_peers(r, op, 1) == [owner]
    # Without spreading, hints are ignored.
    plain = routing.Router(50, "seed")
    plain.install(PEERS)
    plain.heard(op, (("x-groupcache-hot", "1"),))
    assert _first_peers(plain, op, 5) == [owner] * 5
