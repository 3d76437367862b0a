"""The HTTP front: a read-only API (api.py) on aiohttp."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import tls as tlsmod

if TYPE_CHECKING:
    from ...node.serving import Node
    from .api import HttpApi


def http_front(node: Node) -> HttpApi | None:
    """The node's HTTP API where it has an HTTP port (None: off)."""
    if node.http_port is None:
        return None
    from .api import HttpApi  # aiohttp is imported only where the API is served

    return HttpApi(
        node,
        node.host,
        node.http_port,
        ssl_context=tlsmod.server_ssl_context(node.settings.tls),
        limiter=node.transport.limiter,
        on_refused=node.metrics.refused.labels("http_connections").inc,
    )
