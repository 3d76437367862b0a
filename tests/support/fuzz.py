"""Random and malformed GroupCache/Get requests: raw request bodies (bytes
for `channel.unary_unary(method)` without serializers) and metadata."""

from __future__ import annotations

import random

from appliance.pb import groupcache_pb2

GET = "/groupcachepb.GroupCache/Get"
MiB = 1024 * 1024

_META_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."
_RESERVED = {"te", "content-type", "user-agent", "host", "authority", "grpc-timeout"}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, data: bytes) -> bytes:
    """A length-delimited field, whatever `data` holds."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def text(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.25:
        return rng.choice(
            ["", "a", "k1", "张三", "\x00", "x" * 250, "x" * 251, "🙂" * 62, "🙂" * 63, " ", "../etc/passwd"]
        )
    if pick < 0.4:
        return "k" + str(rng.randrange(20))  # keys the origin holds, or near them
    n = rng.choice([1, 2, 8, 40, 300]) if rng.random() < 0.9 else rng.choice([2000, 100_000])
    chars = []
    while len(chars) < min(n, 200):
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10FFFF)])
        if not 0xD800 <= cp <= 0xDFFF:  # surrogates cannot be sent as UTF-8
            chars.append(chr(cp))
    return ("".join(chars) * (n // len(chars) + 1))[:n]  # long texts repeat a random stretch


def body(rng: random.Random, groups: list[str]) -> tuple[str, bytes]:
    """(kind, raw request body)."""
    kind = rng.choice(
        [
            "random",
            "valid",
            "valid",
            "valid",
            "bad-utf8",
            "truncated",
            "wire-type",
            "long-prefix",
            "unknown",
            "repeated",
            "big",
        ]
    )
    group = rng.choice(groups) if rng.random() < 0.8 else text(rng)
    if kind == "random":
        return kind, rng.randbytes(rng.choice([0, 1, 2, 5, 16, 64, 4096]))
    if kind == "valid":
        return kind, groupcache_pb2.GetRequest(group=group, key=text(rng)).SerializeToString()
    if kind == "bad-utf8":
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"k\x80k", rng.randbytes(8) + b"\xfe"])
        if rng.random() < 0.5:
            return kind, field(1, group.encode()) + field(2, bad)
        return kind, field(1, bad) + field(2, b"k1")
    if kind == "truncated":
        full = groupcache_pb2.GetRequest(group=group, key=text(rng) or "k").SerializeToString()
        return kind, full[: rng.randrange(len(full))]
    if kind == "wire-type":  # group as a varint, key as fixed64 or fixed32, a start-group tag
        return kind, rng.choice(
            [b"\x08\x01", b"\x11" + rng.randbytes(8), b"\x15" + rng.randbytes(4), b"\x0b\x0c", b"\x13"]
        )
    if kind == "long-prefix":
        return kind, b"\x12" + varint(rng.choice([4, 1000, 2**31 - 1, 2**63])) + b"abc"
    if kind == "unknown":
        return kind, field(1, group.encode()) + field(rng.randrange(3, 2**29), rng.randbytes(10)) + field(2, b"k1")
    if kind == "repeated":
        return kind, field(1, b"nope") + field(2, b"k2") + field(1, group.encode()) + field(2, b"k1")
    # "big": fields far over the key / group limit, under the message limit
    size = rng.choice([251, 4096, 1 * MiB, 3 * MiB])
    return kind, rng.choice([field(1, b"g" * size) + field(2, b"k1"), field(1, b"g") + field(2, b"k" * size)])


def metadata(rng: random.Random) -> tuple[tuple[str, str | bytes], ...]:
    pairs = []
    for _ in range(rng.choice([0, 0, 1, 2, 5])):
        key = "".join(rng.choice(_META_CHARS) for _ in range(rng.randrange(1, 20)))
        if key in _RESERVED or key.startswith("grpc-") or key[0] in "-_.":
            continue
        if rng.random() < 0.3:
            pairs.append((key + "-bin", rng.randbytes(rng.randrange(0, 64))))
        else:
            pairs.append((key, "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(0, 50)))))
    if rng.random() < 0.3:
        pairs.append(("x-groupcache-forwarded", rng.choice(["1", "0", "", "yes"])))
    if rng.random() < 0.05:
        pairs.append(("x-groupcache-ttl-ms", rng.choice(["-1", "abc", "99999999999999999999"])))
    return tuple(pairs)
