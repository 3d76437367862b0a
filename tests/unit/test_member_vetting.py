"""MemberVetting: which etcd registrations may be in the ring, and when each
is asked (again) to prove itself. Pure: the clock is a list."""

from __future__ import annotations

from appliance.cluster.vetting import RETRY_MAX_S, RETRY_MIN_S, MemberVetting

A, B = "127.0.0.1:7001", "127.0.0.1:7002"


def vetting():
    clock = [0.0]
    return clock, MemberVetting(clock=lambda: clock[0])


def test_a_new_member_is_out_until_it_proves_itself_and_is_asked_once():
    _, v = vetting()
    assert v.admitted([(A, 1)]) == []
    assert v.due() == [(A, 1)]
    assert v.due() == []  # being asked
    assert v.record(A, 1, True)
    assert v.admitted([(A, 1)]) == [A]
    assert v.due() == []  # proven: not asked again


def test_a_member_that_fails_is_asked_again_with_a_growing_backoff_and_joins_when_it_proves():
    clock, v = vetting()
    v.admitted([(A, 1)])
    assert v.due() == [(A, 1)]
    waits = []
    for _ in range(6):
        assert not v.record(A, 1, False, "no answer")
        start = clock[0]
        while not (due := v.due()):
            clock[0] += 0.125
        assert due == [(A, 1)]
        waits.append(clock[0] - start)
    v.record(A, 1, False, "no answer")
    assert waits == sorted(waits) and waits[0] == RETRY_MIN_S and waits[-1] == RETRY_MAX_S
    assert v.unproven() == [A]
    clock[0] += RETRY_MAX_S
    assert v.due() == [(A, 1)]
    assert v.record(A, 1, True)
    assert v.admitted([(A, 1)]) == [A] and v.unproven() == []


def test_a_proven_address_re_registered_stays_in_while_asked_and_leaves_if_it_fails():
    _, v = vetting()
    v.admitted([(A, 1)])
    v.due()
    v.record(A, 1, True)
    assert v.admitted([(A, 2)]) == [A]  # a restarted worker: a new lease
    assert v.due() == [(A, 2)]
    assert v.record(A, 2, False, "no proof")
    assert v.admitted([(A, 2)]) == []


def test_an_outcome_for_a_lease_or_member_no_longer_there_changes_nothing():
    _, v = vetting()
    v.admitted([(A, 1), (B, 1)])
    v.due()
    assert v.admitted([(A, 2)]) == []  # A re-registered, B left
    assert not v.record(A, 1, True)
    assert not v.record(B, 1, True)
    assert v.admitted([(A, 2)]) == []
