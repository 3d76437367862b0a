import pytest
from hypothesis import given, strategies as st

from appliance.cache.group import Group
from appliance.transport import wire
from appliance.pb import groupcache_pb2


@given(st.binary(max_size=3000))
def test_framed_value_is_the_encoded_get_response(value):
    data = wire.FRAMING.prefix(value) + value
    assert data == groupcache_pb2.GetResponse(value=value).SerializeToString()
    assert data[wire.FRAMING.offset(data):] == value


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 2**21 + 5])
def test_varint_boundaries(n):
    value = b"x" * n
    data = wire.FRAMING.prefix(value) + value
    assert groupcache_pb2.GetResponse.FromString(data).value == value
    assert wire.FRAMING.offset(data) == len(data) - n


def test_normalize_drops_what_is_not_the_value():
    value = b"abc"
    # field 1 twice (last wins in protobuf) and an unknown field 7
    odd = b"\x0a\x01z" + b"\x0a\x03abc" + b"\x38\x01"
    assert groupcache_pb2.GetResponse.FromString(odd).value == value
    assert wire.normalize(odd) == b"\x0a\x03abc"
    with pytest.raises(ValueError):
        wire.FRAMING.offset(odd)


async def test_group_with_framing_counts_only_value_bytes():
    async def load(key):
        return b"v" * 300

    g = Group("g", load, cache_bytes=10_000, framing=wire.FRAMING)
    entry = await g.get("k")
    assert entry.value == b"v" * 300
    assert entry.data == groupcache_pb2.GetResponse(value=b"v" * 300).SerializeToString()
    assert g.main.bytes == 1 + 300  # key + value; the 3 framing bytes are not counted
    g.set("k2", b"")
    assert g.peek("k2").value == b"" and g.peek("k2").data == b""
