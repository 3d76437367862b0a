"""The admin service (SetPeers, Stop, Stats, Metrics): unix socket or loopback only."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import grpc

from ..pb import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from ..node.serving import Node


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    async def SetPeers(self, request, context):
        try:
            applied = self.node.set_peers(
                list(request.peers), request.revision, dict(request.leases), request.generation
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad peer list: {exc}")
        peers = self.node.peers
        return admin_pb2.SetPeersResponse(applied=applied, revision=peers.revision, generation=peers.generation)

    async def Stop(self, request, context):
        self.node.request_stop(request.drain_timeout or None)
        return admin_pb2.StopResponse()

    async def Stats(self, request, context):
        return admin_pb2.StatsResponse(json=json.dumps(self.node.stats()))

    async def Metrics(self, request, context):
        # Prometheus text of this worker's own registry; the controller
        # adds the `worker` label (see appliance.ops.box_metrics).
        return admin_pb2.MetricsResponse(text=self.node.metrics.exposition(), addr=self.node.addr)
