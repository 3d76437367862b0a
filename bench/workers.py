"""The bench's servers (bench/servers.py in a process of their own): cache
workers, alone or sharing a ring, the bare grpc.aio echo baseline, and how
the bench asks a worker (one Get, its stats, a key it owns)."""

from __future__ import annotations

from pathlib import Path

from processes import BENCH, HOST, OUT, PY, Proc, free_port, wait_file


def default_server() -> str:
    """What `server = "auto"` serves with: the engine where it is built."""
    from appliance.fronts import engine_available

    return "engine" if engine_available() is None else "grpcio"


def start_worker(
    name: str,
    *,
    port: int | None = None,
    peers: list[str] | None = None,
    mirror: float = 0.1,
    delay_ms: float = 0,
    cache_bytes: str = "256MiB",
    extra: list[str] = (),
    prefix: list[str] = (),
    server: str | None = None,
    forward: str = "",
    peer_library: str = "",
) -> tuple[Proc, int, Path]:
    """A real cache node (appliance.node.serving.Node) in its own process, on
    the given server backend (engine | grpcio; default: `default_server()`)."""
    port = port or free_port()
    server = server or default_server()
    admin = OUT / f"{name}.sock"
    ready = OUT / f"{name}.ready"
    ready.unlink(missing_ok=True)
    cmd = [
        *prefix,
        PY,
        str(BENCH / "servers.py"),
        "worker",
        "--port",
        str(port),
        "--admin",
        str(admin),
        "--ready",
        str(ready),
        "--mirror",
        str(mirror),
        "--delay-ms",
        str(delay_ms),
        "--cache-bytes",
        cache_bytes,
        "--server",
        server,
        *extra,
    ]
    if forward:
        cmd += ["--forward", forward]
    if peer_library:
        cmd += ["--peer-library", peer_library]
    if peers:
        cmd += ["--peers", ",".join(peers)]
    proc = Proc(cmd, name)
    wait_file(ready, 30, proc)
    return proc, port, admin


def start_echo(name: str = "echo", *, prefix: list[str] = ()) -> tuple[Proc, int]:
    """The baseline echo server: a bare grpc.aio server (`servers.py echo`)."""
    port = free_port()
    ready = OUT / f"{name}.ready"
    ready.unlink(missing_ok=True)
    proc = Proc([*prefix, PY, str(BENCH / "servers.py"), "echo", "--port", str(port), "--ready", str(ready)], name)
    wait_file(ready, 30, proc)
    return proc, port


def owned_key(owner: str, peers: list[str], size: int = 100, tag: str = "k", start: int = 0) -> str:
    """The first key "v<size>-<tag><i>" that the seed ring places on `owner`."""
    from appliance.cache.ring import HashRing

    ring = HashRing(peers, 50, "seed")
    for i in range(start, start + 100_000):
        key = value_key(size, f"{tag}{i}")
        if ring.owner(key) == owner:
            return key
    raise RuntimeError(f"no key for {owner}")


def start_ring(names: list[str], **kw) -> list[tuple[Proc, int, Path, str]]:
    """Worker processes that share one ring (revision 1); (proc, port, admin sock, addr) each."""
    ports = [free_port() for _ in names]
    peers = [f"{HOST}:{p}" for p in ports]
    out = []
    for name, port, addr in zip(names, ports, peers, strict=False):
        proc, port, sock = start_worker(name, port=port, peers=peers, **kw)
        out.append((proc, port, sock, addr))
    return out


def admin_stats(sock: Path) -> dict:
    from appliance.admin_client import AdminClient

    with AdminClient(sock, timeout=5) as admin:
        return admin.stats()


def group_stats(sock: Path, group: str = "bench") -> dict:
    return admin_stats(sock)["groups"][group]


def value_key(size: int, tag: str = "hot") -> str:
    """Bench loaders return `size` bytes for a key named like this."""
    return f"v{size}-{tag}"


def get_once(port: int, key: str, group: str = "bench") -> bytes:
    import grpc

    from appliance.pb import groupcache_pb2, groupcache_pb2_grpc

    opts = [("grpc.max_receive_message_length", 8 << 20)]
    with grpc.insecure_channel(f"{HOST}:{port}", options=opts) as ch:
        return (
            groupcache_pb2_grpc.GroupCacheStub(ch)
            .Get(groupcache_pb2.GetRequest(group=group, key=key), timeout=10)
            .value
        )
