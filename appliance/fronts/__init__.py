"""The fronts: the servers of a node, one package per protocol, all running
the calls of one table (calls.py) against the rules (appliance.rules).

The gRPC front is one of two backends behind `Transport` (base.py: start,
stop(grace), the value framing and the peer clients it picks the library of):

- `engine` (grpc_engine/; the Rust crate in engine/, module
  appliance_engine): our front on tokio, hyper/h2 and rustls. Hits are
  answered in Rust from the engine's stores; every other call comes to the
  Python in grpc_engine/server.py as an event. Message, stream, header
  and connection limits at the socket; TLS and mTLS.
- `grpcio` (grpc_aio/): a grpc.aio server; TLS and mTLS. The portable
  path: what a machine without the engine (no Rust) runs.

Beside it, side fronts on ports of their own (base.SideFront): the HTTP
read API (http/). The admin service (admin.py) serves a unix socket.

`[node] server = "auto" | "engine" | "grpcio"` chooses; `auto` takes the
engine where it is built, grpcio otherwise (`choose`). Peer clients forward
on the engine's own client (peering/engine_channel.py: unary calls over h2 in Rust)
on the engine backend, and on grpc.aio elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.backend import BACKENDS, choose, engine_available
from .base import SideFront, Transport

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["BACKENDS", "SideFront", "Transport", "choose", "create", "engine_available"]


def create(settings: Settings, backend: str, *, peer_token: str | None = None) -> Transport:
    """A backend; `peer_token` is what its peer clients present (the cluster's token)."""
    if backend == "engine":
        from .grpc_engine.server import EngineTransport

        return EngineTransport(settings, peer_token=peer_token)
    if backend == "grpcio":
        from .grpc_aio.server import GrpcAioTransport

        return GrpcAioTransport(settings, peer_token=peer_token)
    raise ValueError(f"unknown server backend {backend!r}; expected one of {', '.join(BACKENDS)}")
