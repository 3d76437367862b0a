"""Server processes the benchmarks drive.

    servers.py worker --port P --admin SOCK --ready FILE [--peers A,B] [--mirror 0]
                      [--delay-ms 50] [--cache-bytes 256MiB]
        A real cache node: appliance.node.node.Node with the product's
        services, one group "bench" whose Python loader returns N bytes for
        a key named "v<N>-<anything>" (100 bytes for any other key) after
        --delay-ms, or after <ms> for a key named "v<N>-d<ms>-<anything>".
        The ring is --peers (default: this node alone).

    servers.py echo --port P --ready FILE
        The baseline: a bare grpc.aio server with the same generated
        groupcachepb.GroupCache servicer, answering every Get with a
        prebuilt GetResponse of the value size the key names.

Both run on the default asyncio loop, like `appliance worker`, and write
the --ready file once they serve.

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


def experiment(names: str) -> None:
    """Local what-if patches of the product's hot path, applied in this
    process only (the product files are untouched); the bench reports the
    difference they make. Several may be joined with "+"."""
    for name in filter(None, names.split("+")):
        _experiment(name)


def _experiment(name: str) -> None:
    from appliance.node import service
    from appliance.pb import groupcache_pb2

    if name == "registered":
        # Register the product's services as grpc's generated code does
        # (add_registered_method_handlers: the method is matched in the C
        # core) instead of only as generic handlers looked up per call.
        from grpc._utilities import DictionaryGenericHandler
        from grpc.aio import _server

        add = _server.Server.add_generic_rpc_handlers

        def add_generic_rpc_handlers(self, handlers):
            add(self, handlers)
            for h in handlers:
                if isinstance(h, DictionaryGenericHandler) and h._name in (service.SERVICE, service.CACHE_SERVICE):
                    methods = {k.rsplit("/", 1)[1]: v for k, v in h._method_handlers.items()}
                    self.add_registered_method_handlers(h._name, methods)

        _server.Server.add_generic_rpc_handlers = add_generic_rpc_handlers
    elif name == "lean-handler":
        # A hit served without reading the metadata or the deadline, and
        # validate() without encoding short strings. Same answers; the one
        # difference: a forwarded Get that hits is not counted in
        # stats.server_requests (its metadata is read only when needed).
        from appliance.cache import errors
        from appliance.node.peers import FORWARDED, TTL_MS

        get = service.GroupCacheService.get

        def validate(self, group, key):
            if not group:
                raise errors.InvalidRequest("group is required")
            if not key:
                raise errors.InvalidRequest("key is required")
            # A code point is at most 4 bytes in UTF-8 (3 for a lone surrogate).
            if len(group) * 4 > self.max_group and len(group.encode("utf-8", "surrogatepass")) > self.max_group:
                raise errors.InvalidRequest(f"group name longer than {self.max_group} bytes")
            if len(key) * 4 > self.max_key and len(key.encode("utf-8", "surrogatepass")) > self.max_key:
                raise errors.InvalidRequest(f"key longer than {self.max_key} bytes")

        async def lean_get(self, request, context):
            if request is not None:
                group = self.node.groups.get(request.group)
                if group is not None:
                    key = request.key
                    try:
                        self.validate(request.group, key)
                    except errors.InvalidRequest:
                        group = None
                    if group is not None:
                        entry = group.main.get(key)
                        hot = entry is None
                        if hot:
                            entry = group.hot.get(key)
                        if entry is not None:
                            stats = group.stats
                            stats.gets += 1
                            if hot:
                                stats.hot_hits += 1
                            else:
                                stats.main_hits += 1
                            if entry.expires and FORWARDED in (context.invocation_metadata() or ()):
                                ttl_ms = int((entry.expires - time.monotonic()) * 1000)
                                context.set_trailing_metadata(((TTL_MS, str(max(ttl_ms, 1))),))
                            return entry.data  # the encoded GetResponse, as the product returns
            return await get(self, request, context)  # misses and errors: the product's path

        import time

        service.GroupCacheService.validate = validate
        service.GroupCacheService.get = lean_get
    elif name.startswith("peer-opts"):
        # Extra options on the channels a node opens to its peers.
        from appliance.node import peers

        extra = {
            "peer-opts": [("grpc.enable_retries", 0), ("grpc.http2.bdp_probe", 0)],
            "peer-opts-noretry": [("grpc.enable_retries", 0)],
            "peer-opts-nobdp": [("grpc.http2.bdp_probe", 0)],
        }[name]
        channel = peers.Peers._channel

        def _channel(self, target):
            self._options = [o for o in self._options if o[0] not in dict(extra)] + extra
            return channel(self, target)

        peers.Peers._channel = _channel
    elif name == "bypass":
        # The node's server and handler, none of the product logic: answer
        # from a dict of encoded replies (the product hands grpc bytes).
        responses: dict = {}

        async def get(self, request, context):
            response = responses.get(request.key)
            if response is None:
                response = responses[request.key] = groupcache_pb2.GetResponse(
                    value=b"v" * value_size(request.key)).SerializeToString()
            return response

        service.GroupCacheService.get = get
    else:
        raise SystemExit(f"unknown experiment {name!r}")


def time_handler(path: str) -> None:
    """Count the wall time spent in the product's Get handler; SIGUSR1
    writes the totals to `path` as JSON.

    A hit never suspends, so the handler's wall time is its CPU time (plus
    whatever preemption lands inside it): this splits the cost of one Get
    into the product's part and gRPC's."""
    import json
    import time

    from appliance.node import service

    acc = {"handler_calls": 0, "handler_ns": 0}
    get = service.GroupCacheService.get
    clock = time.perf_counter_ns

    async def timed_get(self, request, context):
        t = clock()
        try:
            return await get(self, request, context)
        finally:
            acc["handler_ns"] += clock() - t
            acc["handler_calls"] += 1

    service.GroupCacheService.get = timed_get

    def dump(*_):
        Path(path).write_text(json.dumps(acc))

    signal.signal(signal.SIGUSR1, dump)


async def worker(args) -> None:
    from appliance import logs
    from appliance.config import Settings
    from appliance.node.node import Node

    logs.setup("info", "bench-worker")  # as `appliance worker` does
    settings = Settings(
        node={"host": "127.0.0.1", "hot_cache_mirror": args.mirror, "peer_timeout": "5s"},
        groups={"bench": {"origin": "python:bench.servers:value_size", "cache_bytes": args.cache_bytes}},
        cluster={"embedded_etcd": False},
    )
    delay = args.delay_ms / 1000.0

    async def load(key: str) -> bytes:
        wait = key_delay(key)
        wait = delay if wait is None else wait
        if wait:
            await asyncio.sleep(wait)
        return b"v" * value_size(key)

    experiment(args.experiment)
    if args.timing:
        time_handler(args.timing)
    node = Node(settings, {"bench": load}, port=args.port, admin_address=f"unix:{args.admin}")
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
        stub = ch.unary_unary("/groupcachepb.GroupCache/Get",
                              request_serializer=groupcache_pb2.GetRequest.SerializeToString,
                              response_deserializer=groupcache_pb2.GetResponse.FromString)
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
    w.add_argument("--timing", default="", help="file: SIGUSR1 writes the handler's time totals there")
    w.add_argument("--experiment", default="", help="registered | lean-handler | bypass | peer-opts[-noretry|-nobdp], joined by + (what-if patches, this process only)")
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--ready", required=True)
    c = sub.add_parser("pyclient")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--key", required=True)
    c.add_argument("--n", type=int, default=2000)
    c.add_argument("--forwarded", action="store_true")
    args = p.parse_args()
    asyncio.run({"worker": worker, "echo": echo, "pyclient": pyclient}[args.cmd](args))


if __name__ == "__main__":
    main()
