"""Peer proofs (appliance.rules.peer_proofs): what a callee accepts, and what
a caller takes as a reply. Pure: the clock is a list."""

from __future__ import annotations

import pytest

from appliance.cache import errors
from appliance.rules.auth import CLUSTER, Authenticator, Credentials
from appliance.rules.peer_proofs import READ, REPLY_KEY, SCHEME, WINDOW_S, WRITE, PeerProofs, ProofError

TOKEN = "unit-test-cluster-token-0123456789"
ADDR = "127.0.0.1:7001"


def pair(now=1000.0):
    clock = [now]
    caller = PeerProofs(TOKEN, clock=lambda: clock[0])
    callee = PeerProofs(TOKEN, clock=lambda: clock[0])
    callee.listening(ADDR, now)
    return clock, caller, callee


def body(authorization: str) -> str:
    scheme, _, rest = authorization.partition(" ")
    assert scheme == SCHEME
    return rest


def test_a_proof_for_the_callees_address_is_accepted_and_names_its_nonce_and_scope():
    _, caller, callee = pair()
    for scope in (READ, WRITE):
        authorization, nonce = caller.make(ADDR, scope)
        assert callee.check(body(authorization)) == (nonce, scope)
        assert callee.check(body(authorization)) == (nonce, scope)  # again: from the recent proofs
        assert TOKEN not in authorization


def tampered(authorization: str) -> str:
    """The same proof with one character of its MAC changed (always a change)."""
    last = authorization[-1]
    return authorization[:-1] + ("A" if last != "A" else "B")


def rescoped(authorization: str) -> str:
    """A read's proof relabelled as a write's, its MAC kept."""
    ms, nonce, _, mac = body(authorization).split(".")
    return f"{SCHEME} {ms}.{nonce}.{WRITE}.{mac}"


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda caller, callee, clock: caller.make("127.0.0.1:7002")[0], "not for this worker"),
        (lambda caller, callee, clock: PeerProofs("another-token-0123456789").make(ADDR)[0], "not for this worker"),
        (lambda caller, callee, clock: (clock.__setitem__(0, 999.0), caller.make(ADDR)[0])[1], "before this worker"),
        (lambda caller, callee, clock: tampered(caller.make(ADDR)[0]), "not for this worker"),
        (lambda caller, callee, clock: rescoped(caller.make(ADDR, READ)[0]), "not for this worker"),
        (lambda caller, callee, clock: caller.make("localhost:7001")[0], "not for this worker"),
        (lambda caller, callee, clock: SCHEME + " garbage", 'is "GC-Proof'),
    ],
    ids=[
        "other address",
        "other token",
        "made before listening",
        "tampered mac",
        "a read's proof relabelled a write's",
        "another name of the same port",
        "malformed",
    ],
)
def test_a_proof_that_does_not_hold_is_refused_with_its_reason(change, reason):
    clock, caller, callee = pair()
    authorization = change(caller, callee, clock)
    clock[0] = 1000.0
    with pytest.raises(ProofError, match=reason):
        callee.check(body(authorization))


def test_a_proof_older_than_the_window_is_refused():
    clock, caller, callee = pair()
    authorization, _ = caller.make(ADDR)
    clock[0] += WINDOW_S + 1
    with pytest.raises(ProofError, match="from this worker's clock"):
        callee.check(body(authorization))


def test_a_callee_not_listening_yet_accepts_nothing():
    caller = PeerProofs(TOKEN)
    with pytest.raises(ProofError, match="not listening"):
        PeerProofs(TOKEN).check(body(caller.make(ADDR)[0]))


def test_a_reply_proves_the_callee_only_for_the_callers_nonce():
    _, caller, callee = pair()
    _, nonce = caller.make(ADDR)
    reply = callee.reply(nonce)
    assert caller.replied(nonce, reply)
    assert not caller.replied("another-nonce", reply)
    assert not caller.replied(nonce, ())
    assert not caller.replied(nonce, PeerProofs("another-token-0123456789").reply(nonce))
    assert not caller.replied(nonce, ((REPLY_KEY, b"bytes"),))


def test_the_authenticator_takes_a_valid_proof_as_the_cluster_and_replies_only_to_it():
    auth = Authenticator(reads_open=False, tokens=[(CLUSTER, TOKEN, ("read", "write"))])
    assert auth.proofs is not None
    auth.proofs.listening(ADDR, 0.0)
    authorization, nonce = PeerProofs(TOKEN).make(ADDR)
    creds = Credentials(authorization)
    assert auth.is_cluster(creds)
    # A read's proof reads; only a write's proof writes (a Set, a Handoff).
    assert auth.require("read", "Get", creds).name == CLUSTER
    with pytest.raises(errors.PermissionDenied, match="write scope"):
        auth.require("write", "Handoff", creds)
    assert auth.require("write", "Set", Credentials(PeerProofs(TOKEN).make(ADDR, WRITE)[0])).name == CLUSTER
    assert PeerProofs(TOKEN).replied(nonce, auth.reply_proof(creds))
    forged = Credentials(f"{SCHEME} 1.nonce.mac")
    with pytest.raises(errors.Unauthenticated, match="peer proof refused"):
        auth.authenticate(forged)
    assert auth.reply_proof(forged) == ()
    assert auth.reply_proof(Credentials(f"Bearer {TOKEN}")) == ()


def test_a_node_without_the_cluster_token_refuses_proofs():
    auth = Authenticator()
    with pytest.raises(errors.Unauthenticated, match="no cluster token"):
        auth.authenticate(Credentials(PeerProofs(TOKEN).make(ADDR)[0]))


def test_a_proof_made_in_the_millisecond_of_the_bind_is_accepted_and_one_before_it_is_not():
    """Proofs carry whole milliseconds: a peer calling a worker that has
    just bound (the same millisecond, truncated below its start) is served;
    a millisecond earlier is before it listened (a squatter's catch)."""
    clock, caller, callee = pair(now=1000.0007)
    callee.check(body(caller.make(ADDR)[0]))  # 1000000 ms, made at 1000.0007 s
    clock[0] = 999.9995
    early = caller.make(ADDR)[0]
    clock[0] = 1000.0007
    with pytest.raises(ProofError, match="before this worker"):
        callee.check(body(early))
