"""Every cache error answers alike on every front: one kind per error
(cache/errors.py), mapped to a gRPC code (protocol/status.py) and an HTTP
status (fronts/http/api.py). The expected answers are written out here, so a
new error, or a kind that moves, fails until it is listed."""

from __future__ import annotations

import grpc
import pytest

from appliance.cache import errors
from appliance.fronts.http.api import STATUS
from appliance.protocol import status

EXPECTED = {
    errors.InvalidRequest: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    errors.GroupNotFound: (grpc.StatusCode.NOT_FOUND, 404),
    errors.KeyNotFound: (grpc.StatusCode.NOT_FOUND, 404),
    errors.OriginError: (grpc.StatusCode.UNAVAILABLE, 503),
    errors.PeerError: (grpc.StatusCode.UNAVAILABLE, 503),
    errors.NotServing: (grpc.StatusCode.UNAVAILABLE, 503),
    errors.Draining: (grpc.StatusCode.UNAVAILABLE, 503),
    errors.Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    errors.PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, 403),
    errors.TooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_error_is_listed():
    assert set(_subclasses(errors.CacheError)) == set(EXPECTED)


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_each_error_has_one_answer_per_front(cls):
    code, http = EXPECTED[cls]
    exc = cls("x")
    assert (status.code_of(exc), STATUS[exc.kind]) == (code, http)
    assert status.failure(exc).code == code


def test_a_bare_cache_error_is_internal_on_both_fronts():
    exc = errors.CacheError("x")
    assert (status.code_of(exc), STATUS[exc.kind]) == (grpc.StatusCode.INTERNAL, 500)


def test_reasons_read_back_to_their_error():
    for cls in EXPECTED:
        assert status.BY_REASON[cls.reason] is cls
