"""The grpcio backend: a grpc.aio server with every service (TLS capable)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from grpc_reflection.v1alpha import reflection

from ... import addr as addrs
from ... import tls as tlsmod
from ...protocol.methods import CACHE_SERVICE, GET_SERVICE, PEER_SERVICE
from ...rules.auth import Credentials
from ..base import BaseTransport
from ..health import SERVICE as HEALTH_SERVICE
from ..health import grpc_handlers as health_handlers
from .rate_interceptor import RateLimitInterceptor
from .services import PeerService, unary_handlers
from .services import credentials as call_credentials

if TYPE_CHECKING:
    from ...config import Settings
    from ...rules.node_rules import NodeRules

REFLECTED = (GET_SERVICE, CACHE_SERVICE, PEER_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)


def add_services(server: grpc.aio.Server, services: dict[str, dict[str, grpc.RpcMethodHandler]]) -> None:
    # Registered (matched in grpc's core), not generic handlers looked up per call.
    for name, methods in services.items():
        server.add_registered_method_handlers(name, methods)


class GrpcAioTransport(BaseTransport):
    name = "grpcio"

    def __init__(self, settings: Settings, *, peer_token: str | None = None) -> None:
        super().__init__(settings, peer_token=peer_token)
        self._server: grpc.aio.Server | None = None
        self._peer_service: PeerService | None = None

    async def start(self, rules: NodeRules, host: str, port: int) -> int:
        self._bind(rules)
        interceptors = None
        if self.limiter is not None:
            interceptors = [
                RateLimitInterceptor(self.limiter, lambda md: rules.from_peer(True, Credentials.from_metadata(md)))
            ]
        server = grpc.aio.server(options=self.message_options, interceptors=interceptors)
        self._peer_service = PeerService(rules, self.limiter)
        services = unary_handlers(rules)
        services[PEER_SERVICE].update(self._peer_service.handlers()[PEER_SERVICE])
        add_services(server, services)
        prove = lambda context: rules.auth.reply_proof(call_credentials(context))  # noqa: E731
        add_services(server, {HEALTH_SERVICE: health_handlers(self.health, prove)})
        reflection.enable_server_reflection(REFLECTED, server)
        credentials = tlsmod.server_credentials(self.settings.tls)
        target = addrs.join(host, port)
        if credentials is not None:
            bound = server.add_secure_port(target, credentials)
        else:
            bound = server.add_insecure_port(target)
        await server.start()
        self._server = server
        return bound

    async def stop(self, grace: float | None) -> None:
        await self.health.close()
        if self._server is not None:
            if self._peer_service is not None:
                await self._peer_service.close()
            await self._server.stop(grace)
