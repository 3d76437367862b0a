import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.cache.group import Group
from appliance.pb import groupcache_pb2
from appliance.protocol import framing as wire


@given(st.binary(max_size=3000))
def test_framed_value_is_the_encoded_get_response(value):
    data = wire.FRAMING.prefix(value) + value
    assert data == groupcache_pb2.GetResponse(value=value).SerializeToString()
    assert data[wire.FRAMING.offset(data) :] == value


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


def test_encoded_get_many_reply_is_what_protobuf_writes():
    """codec.encode_get_many_response builds the GetManyResponse bytes by
    hand from the stored wire-form values; protobuf must read them back the
    same, and without TTLs (which move with the clock) the bytes are equal."""
    import random

    from appliance.cache import errors
    from appliance.cache.store import Entry
    from appliance.pb import cache_pb2
    from appliance.protocol import codec
    from appliance.protocol import framing as wire

    rng = random.Random(7)
    keys, results = [], []
    for i in range(300):
        key = rng.choice(["", "k", "ключ", "😀" * rng.randint(1, 3), f"key-{i}" * rng.randint(1, 40)])
        if rng.random() < 0.3:
            results.append(
                rng.choice(
                    [
                        errors.KeyNotFound(f"{key!r} missing"),
                        errors.OriginError(""),
                        errors.InvalidRequest("key longer than 250 bytes"),
                    ]
                )
            )
        else:
            value = rng.randbytes(rng.choice([0, 1, 127, 128, 300, 70_000]))
            prefix = wire.FRAMING.prefix(value)
            results.append(Entry(prefix + value, 0.0, len(value), len(prefix)))
        keys.append(key)
    ours = codec.encode_get_many_response(keys, results)
    assert ours == codec.get_many_response(keys, results).SerializeToString()
    # With TTLs: the same message, the TTLs within a moment of each other.
    import time

    expiring = [Entry(r.data, time.monotonic() + 30, r.size, r.offset) if isinstance(r, Entry) else r for r in results]
    a = cache_pb2.GetManyResponse.FromString(codec.encode_get_many_response(keys, expiring))
    b = codec.get_many_response(keys, expiring)
    assert [(r.key, r.value, r.code, r.error) for r in a.results] == [
        (r.key, r.value, r.code, r.error) for r in b.results
    ]
    assert all(abs(x.ttl - y.ttl) < 1 and x.ttl > 29 for x, y in zip(a.results, b.results, strict=True) if x.code == 0)
