"""The client of one worker's admin service (SetPeers, Stop, Stats, Metrics)
over its unix socket. Synchronous: the CLI, `appliance run`, the controller
and the box's metrics endpoint are threads, not event loops."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from .pb import admin_pb2, admin_pb2_grpc

__all__ = ["AdminClient"]

DEFAULT_TIMEOUT = 2.0  # seconds per call; a worker answers these at once


class AdminClient:
    """One channel to ``unix:<socket>``; grpc connects lazily and reconnects."""

    def __init__(self, socket: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = os.fspath(socket)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{self.socket}")
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    def __repr__(self) -> str:
        return f"AdminClient({self.socket!r})"

    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The worker's counters and ring (``Node.stats()``). Raises grpc.RpcError."""
        reply = self._stub.Stats(admin_pb2.StatsRequest(), timeout=timeout or self.timeout)
        return json.loads(reply.json)

    def metrics(self, *, timeout: float | None = None) -> admin_pb2.MetricsResponse:
        """The worker's Prometheus text and the address it serves."""
        return self.metrics_future(timeout=timeout).result()

    def metrics_future(self, *, timeout: float | None = None) -> grpc.Future:
        """``metrics()`` without waiting: a future of the MetricsResponse."""
        return self._stub.Metrics.future(admin_pb2.MetricsRequest(), timeout=timeout or self.timeout)

    def set_peers_future(
        self,
        peers: Sequence[str],
        revision: int,
        *,
        leases: Mapping[str, int] | None = None,
        generation: int = 0,
        timeout: float | None = None,
    ) -> grpc.Future:
        """Push a ring without waiting: a future of the SetPeersResponse."""
        request = admin_pb2.SetPeersRequest(
            peers=list(peers), revision=revision, leases=dict(leases or {}), generation=generation
        )
        return self._stub.SetPeers.future(request, timeout=timeout or self.timeout)

    def stop(self, drain_timeout: float = 0.0, *, timeout: float | None = None) -> None:
        """Ask the worker to stop gracefully (0: its own drain_timeout)."""
        self._stub.Stop(admin_pb2.StopRequest(drain_timeout=drain_timeout), timeout=timeout or self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
