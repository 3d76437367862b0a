"""A helper that runs inside a test's network namespace (tests/support/seed.py).

    ip netns exec NS .venv/bin/python tests/support/ns_agent.py ETCD_ENDPOINT

The test process stays in the root namespace; it sends one JSON request per
line on stdin and reads one JSON reply per line on stdout. Ops:

  get        {"calls": [[addr, group, key], ...], "timeout": s}  all at once, each on
             its own channel: [{"value": base64} | {"code": NAME, "details": str}]
  etcd_prefix {"prefix": p}           {key: [value, lease id]}
  put        {"key": k, "value": v}    (no lease: an operator's entry)
  revoke     {"key": k}                revoke the lease holding k (a graceful leave)
  peer_client {"addr": a, "group": g, "keys": [...]}   for each key, a new channel and a
             new appliance PeerClient (nothing remembered) forwards one Get to addr:
             [{"value": base64 | None, "error": str | None, "streaming": bool,
               "first_error": str | None, "final_code": NAME | None}]
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import grpc  # noqa: E402

from appliance.cluster import etcd  # noqa: E402
from appliance.config import Settings  # noqa: E402
from appliance.pb import groupcache_pb2, groupcache_pb2_grpc  # noqa: E402


async def get(calls, timeout=10.0):
    async def one(addr, group, key):
        async with grpc.aio.insecure_channel(addr) as ch:
            try:
                reply = await groupcache_pb2_grpc.GroupCacheStub(ch).Get(
                    groupcache_pb2.GetRequest(group=group, key=key), timeout=timeout
                )
            except grpc.aio.AioRpcError as err:
                return {"code": err.code().name, "details": err.details()}
            return {"value": base64.b64encode(reply.value).decode()}

    return await asyncio.gather(*(one(*c) for c in calls))


async def peer_client(addr, group, keys):
    from appliance.cache.errors import CacheError
    from appliance.peering.peer_client import GrpcPeerClient as PeerClient

    out = []
    for key in keys:
        channel = grpc.aio.insecure_channel(addr)
        client = PeerClient(addr, channel)  # its calls alone: no breaker
        row = {"value": None, "error": None}
        try:
            encoded, _ = await client.get(group, key, 2.0)  # GetResponse wire form
            row["value"] = base64.b64encode(groupcache_pb2.GetResponse.FromString(bytes(encoded)).value).decode()
        except CacheError as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        stream = client._stream
        row["streaming"] = client.streaming
        broken = stream.broken if stream is not None else None
        row["first_error"] = (
            None
            if broken is None
            else (broken.code().name if isinstance(broken, grpc.aio.AioRpcError) else type(broken).__name__)
        )
        final = None
        if stream is not None:
            try:
                final = (await asyncio.wait_for(stream._call.code(), 1.0)).name
            except Exception:
                pass
        row["final_code"] = final
        await client.close()
        out.append(row)
    return out


def main() -> None:
    endpoint = sys.argv[1]
    client = etcd.connect(Settings(cluster={"etcd": [endpoint], "embedded_etcd": False}).cluster)

    async def serve():
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            req = json.loads(line)
            op = req.pop("op")
            try:
                if op == "get":
                    result = await get(**req)
                elif op == "peer_client":
                    result = await peer_client(**req)
                elif op == "etcd_prefix":
                    result = {m.key.decode(): [v.decode(), m.lease_id] for v, m in client.get_prefix(req["prefix"])}
                elif op == "put":
                    client.put(req["key"], req["value"])
                    result = True
                elif op == "revoke":
                    _, meta = client.get(req["key"])
                    result = bool(meta and meta.lease_id)
                    if result:
                        client.revoke_lease(meta.lease_id)
                elif op == "ping":
                    result = "pong"
                else:
                    raise ValueError(f"unknown op {op!r}")
                reply = {"ok": result}
            except Exception as exc:  # reported to the test, which decides
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()

    try:
        asyncio.run(serve())
    finally:
        client.close()


if __name__ == "__main__":
    main()
