"""Server processes the benchmarks drive.

    servers.py worker --port P --admin SOCK --ready FILE [--server auto|engine|grpcio]
                      [--peers A,B] [--mirror 0] [--delay-ms 50] [--cache-bytes 256MiB]
                      [--forward stream|unary] [--peer-library engine|grpcio] [--tls-dir D]
        A real cache node: appliance.node.serving.Node with the product's
        services on the given server backend, one group "bench" whose
        Python loader returns N bytes for a key named "v<N>-<anything>"
        (100 bytes for any other key) after --delay-ms, or after <ms> for a
        key named "v<N>-d<ms>-<anything>". The ring is --peers (default:
        this node alone). --forward picks how its forwards reach an owner,
        --peer-library what the engine backend makes them with (the
        product's transport defaults otherwise; experiment knobs).

    servers.py echo --port P --ready FILE
        A baseline: a bare grpc.aio server with the same generated
        groupcachepb.GroupCache servicer, answering every Get with a
        prebuilt GetResponse of the value size the key names.

The worker runs on the loop `appliance worker` runs on (the engine's
SharedLoop), the echo server on the default asyncio loop; both write the
--ready file once they serve.

    servers.py pyclient --port P --key K [--n 2000] [--forwarded]
        Sequential Gets from a grpc.aio client made as a forwarding node
        makes them; prints p50/p99 as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402

MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", (4 << 20) + 65536),
    ("grpc.max_send_message_length", (4 << 20) + 65536),
]


def value_size(key: str) -> int:
    """N for a key "v<N>-…", else 100."""
    if key.startswith("v"):
        head = key[1:].split("-", 1)[0]
        if head.isdigit():
            return int(head)
    return 100


def key_delay(key: str) -> float | None:
    """Seconds for a key "v<N>-d<ms>-…" (the origin's own delay), else None."""
    parts = key.split("-", 2)
    if len(parts) == 3 and parts[1].startswith("d") and parts[1][1:].isdigit():
        return int(parts[1][1:]) / 1000.0
    return None


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def time_hits(path: str) -> None:
    """Count the wall time spent in the product's cache rules for each hit
    (NodeRules.hit: validate, look the group up, look the key up, count);
    SIGUSR1 writes the totals to `path` as JSON. A hit never suspends, so
    its wall time is its CPU time: this splits one Get into the product's
    part and the server library's."""
    import json
    import time

    from appliance.rules.node_rules import NodeRules

    acc = {"handler_calls": 0, "handler_ns": 0}
    hit = NodeRules.hit
    clock = time.perf_counter_ns

    def timed_hit(self, *args, **kwargs):  # NodeRules.hit's own signature, whatever it is
        t = clock()
        try:
            return hit(self, *args, **kwargs)
        finally:
            acc["handler_ns"] += clock() - t
            acc["handler_calls"] += 1

    NodeRules.hit = timed_hit

    def dump(*_):
        Path(path).write_text(json.dumps(acc))

    signal.signal(signal.SIGUSR1, dump)


async def worker(args) -> None:
    from appliance import logs
    from appliance.config import Settings
    from appliance.node.serving import Node

    logs.setup("info", "bench-worker")  # as `appliance worker` does
    tls_dir = Path(args.tls_dir).resolve()
    tls = {"cert": str(tls_dir / "cert.pem"), "key": str(tls_dir / "key.pem")} if args.tls_dir else {}
    settings = Settings(
        node={"host": "127.0.0.1", "hot_cache_mirror": args.mirror, "peer_timeout": "5s", "server": args.server},
        groups={"bench": {"origin": "python:bench.servers:value_size", "cache_bytes": args.cache_bytes}},
        cluster={"embedded_etcd": False},
        tls=tls,
    )
    delay = args.delay_ms / 1000.0

    async def load(key: str) -> bytes:
        wait = key_delay(key)
        wait = delay if wait is None else wait
        if wait:
            await asyncio.sleep(wait)
        return b"v" * value_size(key)

    if args.timing:
        time_hits(args.timing)
    node = Node(settings, {"bench": load}, port=args.port, admin_address=f"unix:{args.admin}")
    if args.forward:
        node.transport.peer_clients.forward = args.forward  # the experiment knob: before any client exists
    if args.peer_library:
        node.transport.peer_clients.library = args.peer_library  # engine's client or grpc.aio, likewise
    await node.start()
    node.set_peers(args.peers.split(",") if args.peers else [node.addr], 1)
    Path(args.ready).write_text(str(os.getpid()))
    try:
        await _until_signalled()
    finally:
        await node.stop(0)


async def echo(args) -> None:
    from appliance.pb import groupcache_pb2, groupcache_pb2_grpc

    responses: dict[str, groupcache_pb2.GetResponse] = {}

    class Echo(groupcache_pb2_grpc.GroupCacheServicer):
        async def Get(self, request, context):
            response = responses.get(request.key)
            if response is None:
                response = responses[request.key] = groupcache_pb2.GetResponse(value=b"v" * value_size(request.key))
            return response

    server = grpc.aio.server(options=MESSAGE_OPTIONS)
    groupcache_pb2_grpc.add_GroupCacheServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    Path(args.ready).write_text(str(os.getpid()))
    try:
        await _until_signalled()
    finally:
        await server.stop(0)


async def pyclient(args) -> None:
    """Sequential Gets from a grpc.aio client, made the way a forwarding node
    calls its peer (deadline, forwarded metadata, trailers read): prints the
    latency percentiles as JSON. What one peer call costs in Python."""
    import json
    import time

    from appliance.pb import groupcache_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.port}") as ch:
        stub = ch.unary_unary(
            "/groupcachepb.GroupCache/Get",
            request_serializer=groupcache_pb2.GetRequest.SerializeToString,
            response_deserializer=groupcache_pb2.GetResponse.FromString,
        )
        request = groupcache_pb2.GetRequest(group="bench", key=args.key)
        metadata = (("x-groupcache-forwarded", "1"),) if args.forwarded else None
        lat = []
        for i in range(args.n + 200):
            t = time.perf_counter()
            call = stub(request, timeout=5, metadata=metadata)
            await call
            await call.trailing_metadata()
            if i >= 200:  # the first 200 warm up
                lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    print(json.dumps({"n": len(lat), "p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99)]}))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--admin", required=True)
    w.add_argument("--ready", required=True)
    w.add_argument("--peers", default="")
    w.add_argument("--mirror", type=float, default=0.1)
    w.add_argument("--delay-ms", type=float, default=0)
    w.add_argument("--cache-bytes", default="256MiB")
    w.add_argument("--tls-dir", default="", help="serve TLS with cert.pem and key.pem from here (certs.self_signed)")
    w.add_argument("--timing", default="", help="file: SIGUSR1 writes the time totals of NodeRules.hit there")
    w.add_argument("--server", default="auto", choices=("auto", "engine", "grpcio"))
    w.add_argument("--forward", default="", choices=("", "stream", "unary"), help="how forwards reach the owner")
    w.add_argument(
        "--peer-library", default="", choices=("", "engine", "grpcio"), help="what the engine backend forwards with"
    )
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--ready", required=True)
    c = sub.add_parser("pyclient")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--key", required=True)
    c.add_argument("--n", type=int, default=2000)
    c.add_argument("--forwarded", action="store_true")
    args = p.parse_args()
    if args.cmd == "worker":  # as `appliance worker` runs it (appliance.worker.run)
        from appliance.fronts.grpc_engine.loop import run

        run(worker(args))
        return
    asyncio.run({"echo": echo, "pyclient": pyclient}[args.cmd](args))


if __name__ == "__main__":
    main()
