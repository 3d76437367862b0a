"""The peer picker: ring swaps, client reuse, and what is learned per peer
process (appliance.rules.peers). Pure: clients are fakes."""

import asyncio

from appliance.rules.peers import Peers
from support.fake_peers import FakeClient


def made():
    clients = []

    def new_client(addr, facts):
        clients.append(FakeClient(addr, facts))
        return clients[-1]

    return clients, new_client


async def test_a_new_lease_is_a_new_process_and_forgets_what_was_learned():
    clients, new_client = made()
    peers = Peers(new_client, close_grace=3.0)
    peers.self_addr = "a:1"
    assert peers.set_peers(["a:1", "b:1"], 1, {"b:1": 10})
    first = peers.client("b:1")
    first.facts.plain_get_only = True  # learned: b lacks Peer/Forward
    assert peers.set_peers(["a:1", "b:1", "c:1"], 2, {"b:1": 10, "c:1": 11})
    assert peers.client("b:1") is first and first.facts.plain_get_only
    # b leaves and comes back under the same lease (its key was deleted by
    # hand, say): the same process, so what we know of it still holds.
    assert peers.set_peers(["a:1", "c:1"], 3, {"c:1": 11})
    assert peers.set_peers(["a:1", "b:1", "c:1"], 4, {"b:1": 10, "c:1": 11})
    assert peers.client("b:1").facts.plain_get_only
    # b re-registers under a new lease: a new process, learned anew.
    second = peers.client("b:1")
    assert peers.set_peers(["a:1", "b:1", "c:1"], 5, {"b:1": 12, "c:1": 11})
    third = peers.client("b:1")
    assert third is not second and not third.facts.plain_get_only
    await asyncio.sleep(0)
    assert second.closed == 3.0  # the old client gets the grace to finish its calls
    assert peers.client("c:1") is clients[1]


async def test_stale_revisions_change_nothing_and_bad_peers_are_refused():
    _, new_client = made()
    peers = Peers(new_client)
    assert peers.set_peers(["a:1"], 5)
    assert not peers.set_peers(["a:1", "b:1"], 5)
    assert not peers.set_peers(["a:1", "b:1"], 4)
    assert list(peers.ring.nodes) == ["a:1"]
    try:
        peers.set_peers(["a:1", "no port"], 6)
    except ValueError as exc:
        assert "no port" in str(exc)
    else:
        raise AssertionError("expected ValueError")
    assert peers.revision == 5


async def test_without_lease_information_clients_are_kept():
    clients, new_client = made()
    peers = Peers(new_client)
    peers.set_peers(["a:1", "b:1"], 1)
    peers.set_peers(["a:1", "b:1"], 2, {"b:1": 7})  # first lease seen: same client
    assert len(clients) == 2 and peers.client("b:1") is clients[1]
    await peers.close()
    assert all(c.closed == 0 for c in clients)


def test_the_read_breaker_opens_on_a_silent_peer_and_closes_on_an_answer():
    from appliance.rules.peers import PeerFacts

    f = PeerFacts()
    assert f.read_allowed() and not f.probe_due(0.0)
    # Connected but no answer in time: slow (a slow origin) or silent (a cut
    # link, a frozen process)? A probe tells; the breaker stays closed meanwhile.
    assert f.read_unanswered(2.0, connected=True) is True
    f.probing = True
    assert f.read_unanswered(2.5, connected=True) is False  # one probe at a time
    f.probed(3.0, answered=True)  # a slow peer: nothing changes
    assert f.read_allowed()
    assert f.read_unanswered(4.0, connected=True)
    f.probing = True
    f.probed(6.0, answered=False)  # silent
    assert not f.read_allowed()  # no client read waits on it now
    assert not f.probe_due(6.5) and f.probe_due(7.0)  # asked again after 1 s
    f.probing = True
    assert not f.probe_due(8.0)  # one at a time
    f.probed(8.0, answered=False)
    assert f.down_for == 2.0 and not f.probe_due(9.9) and f.probe_due(10.0)
    for t in range(10, 100, 10):
        f.probed(float(t), answered=False)
    assert f.down_for == PeerFacts.DOWN_MAX_S and not f.read_allowed()
    f.probed(100.0, answered=True)
    assert f.read_allowed() and not f.probe_due(200.0)
    # Not connected: open at once, no probe needed.
    assert f.read_unanswered(300.0, connected=False) is False
    assert not f.read_allowed() and f.probe_due(301.0)
    f.read_answered()  # a read answered by another client of the same process
    assert f.read_allowed()


def test_a_forwarder_knows_whether_it_heard_from_the_owner_since_a_read_was_sent():
    """GrpcPeerClient waits past half the caller's deadline only for an
    owner that answered something (a probe, another read) since then."""
    from appliance.rules.peers import PeerFacts

    f = PeerFacts()
    assert not f.heard_since(0.0)  # never heard
    f.read_answered(5.0)
    assert f.heard_since(5.0) and not f.heard_since(5.1)
    f.probing = True
    f.probed(7.0, answered=True)  # a slow owner's server answers its probe
    assert f.heard_since(6.0) and not f.probing
    f.probing = True
    f.probed(9.0, answered=False)  # silent since: nothing heard after 7
    assert not f.heard_since(8.0) and not f.read_allowed()
    f.read_answered(6.5)  # an older answer reported late does not move it back
    f.read_answered()  # nor one without a time (a peer that rejoined the ring)
    assert f.heard_since(7.0) and not f.heard_since(7.5)
