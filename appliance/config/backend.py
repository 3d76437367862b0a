"""Which server backend serves: what is built here and what the settings
allow (`[node] server`). Part of the config's report (`config check`, the
worker's first log line); appliance.transport builds the backend chosen.

No RPC library is imported here: only whether the native fronts import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import Settings

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
