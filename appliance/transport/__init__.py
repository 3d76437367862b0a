"""How a node is served and how it reaches its peers, behind one seam.

The cache logic (appliance.node.instance) does not know which gRPC server
library serves it. A backend implements `Transport` (base.py): start,
stop(grace), new_client(addr) and the value framing. Three backends:

- `engine` (engine/, module appliance_engine): our Rust front (tokio,
  hyper/h2) with the same event API as pygrpc-native's, served by the same
  Python (transport/native/server.py); message, stream, header and
  connection limits at the socket; TLS and mTLS (rustls).
- `native` (transport/native): pygrpc-native's NativeGrpcFront; HTTP/2 in
  Rust outside the GIL, hits answered without a coroutine. No TLS, and a
  request is buffered whole before its size is checked: only when asked for.
- `grpcio` (transport/grpc_aio): a grpc.aio server; TLS and mTLS. The
  portable path: what a machine without the engine (no Rust) runs.

`[node] server = "auto" | "engine" | "native" | "grpcio"` chooses; `auto`
takes the engine where it is built and the cluster has no seed Go nodes
(`cluster.seed_interop`: their `:authority` is one the engine refuses),
grpcio otherwise (`choose`). Peer clients are grpc.aio on every backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Transport

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["BACKENDS", "Transport", "choose", "create", "engine_available", "native_available"]

BACKENDS = ("engine", "native", "grpcio")


def native_available() -> str | None:
    """None when the native backend can run here, else why not."""
    try:
        import pygrpc_native  # noqa: F401
        from pygrpc_native import NativeGrpcFront  # noqa: F401
    except Exception as exc:  # ImportError, or a wheel built for another platform
        return f"pygrpc-native does not import ({type(exc).__name__}: {exc})"
    return None


def engine_available() -> str | None:
    """None when our engine (appliance_engine) imports here, else why not."""
    try:
        from appliance_engine import Front  # noqa: F401
    except Exception as exc:  # not built here (no Rust toolchain), or built for another Python
        return f"appliance_engine does not import ({type(exc).__name__}: {exc})"
    return None


def choose(settings: Settings, requested: str | None = None) -> tuple[str, str]:
    """(backend, why) for these settings; `requested` overrides node.server."""
    want = requested or settings.node.server
    tls = settings.tls.enabled
    seed = settings.cluster.seed_interop
    if want == "grpcio":
        return "grpcio", "node.server = grpcio"
    if want == "engine":
        if seed:
            raise ValueError("node.server = engine does not serve the seed's Go clients yet; use grpcio or auto")
        missing = engine_available()
        if missing:
            raise RuntimeError(f"node.server = engine, but {missing}")
        return "engine", "node.server = engine"
    if want == "native":
        # Config validation refuses these; code that builds Settings may not.
        if tls:
            raise ValueError("node.server = native cannot serve TLS; use grpcio or auto")
        if seed:
            raise ValueError("node.server = native cannot serve the seed's Go clients; use grpcio or auto")
        missing = native_available()
        if missing:
            raise RuntimeError(f"node.server = native, but {missing}")
        return "native", "node.server = native"
    if seed:
        # grpc-go sends :authority "groupcache/<addr>" (the etcd:/// target's
        # endpoint); the Rust http crate under the engine resets such a stream.
        return "grpcio", "auto: cluster.seed_interop (the engine refuses the Go clients' :authority)"
    missing = engine_available()
    if missing:
        return "grpcio", f"auto: {missing}"
    return "engine", "auto: the engine is built" + (" (TLS in rustls)" if tls else "")


def create(settings: Settings, backend: str, *, peer_token: str | None = None) -> Transport:
    """A backend; `peer_token` is what its peer clients present (the cluster's token)."""
    if backend == "engine":
        from .native.server import EngineTransport

        return EngineTransport(settings, peer_token=peer_token)
    if backend == "native":
        from .native.server import NativeTransport

        return NativeTransport(settings, peer_token=peer_token)
    if backend == "grpcio":
        from .grpc_aio.server import GrpcAioTransport

        return GrpcAioTransport(settings, peer_token=peer_token)
    raise ValueError(f"unknown server backend {backend!r}; expected one of {', '.join(BACKENDS)}")
