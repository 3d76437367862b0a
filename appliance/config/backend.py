"""Which server backend serves: what is built here and what the settings
allow (`[node] server`). The config's report says it (``report.server_choice``:
`config check`, the worker's first log line); appliance.fronts builds the
backend chosen.

No RPC library is imported here: only whether the engine imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import Settings

BACKENDS = ("engine", "grpcio")


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
    if want == "grpcio":
        return "grpcio", "node.server = grpcio"
    missing = engine_available()
    if want == "engine":
        if missing:
            raise RuntimeError(f"node.server = engine, but {missing}")
        return "engine", "node.server = engine"
    if missing:
        return "grpcio", f"auto: {missing}"
    return "engine", "auto: the engine is built" + (" (TLS in rustls)" if settings.tls.enabled else "")
