"""Values kept in the wire form of groupcachepb.GetResponse{bytes value = 1}.

A node stores each value behind the few bytes that make it an encoded
GetResponse (tag 0x0a, varint length), so a hit is sent as is: no message
object, no copy of the value per Get. Entry.value still gives the value.
"""

from __future__ import annotations

from ..pb import groupcache_pb2

_TAG = 0x0A  # field 1, length-delimited


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


class GetResponseFraming:
    """appliance.cache.group.Framing for GetResponse."""

    def prefix(self, value: bytes) -> bytes:
        # proto3 leaves an empty bytes field out: an empty value is b"".
        return b"\x0a" + varint(len(value)) if value else b""

    def offset(self, data: bytes) -> int:
        """Start of the value in an encoded GetResponse; ValueError when data
        is not exactly one field 1 (a peer added other fields, say)."""
        if not data:
            return 0
        if data[0] != _TAG:
            raise ValueError("not a bare GetResponse")
        n, shift, i = 0, 0, 1
        while True:
            if i >= len(data) or i > 10:
                raise ValueError("truncated length")
            byte = data[i]
            n |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
        if i + n != len(data):
            raise ValueError("trailing bytes after the value")
        return i


FRAMING = GetResponseFraming()


def normalize(data: bytes) -> bytes:
    """An encoded GetResponse from a peer, reduced to the bare form we keep."""
    try:
        FRAMING.offset(data)
        return data
    except ValueError:
        value = groupcache_pb2.GetResponse.FromString(data).value
        return FRAMING.prefix(value) + value
