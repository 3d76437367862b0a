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
grpcio otherwise (`choose`). Peer clients forward on the engine's own
client (engine_channel.py: unary calls over h2 in Rust) on the engine
backend, and on grpc.aio elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.backend import BACKENDS, choose, engine_available, native_available
from .base import Transport

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["BACKENDS", "Transport", "choose", "create", "engine_available", "native_available"]


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
