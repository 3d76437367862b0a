"""The synchronous client: blocking calls, safe to share between threads."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

import grpc

from ..pb import cache_pb2
from ..peering.engine_channel import EngineChannel, failure
from ..protocol.status import client_error
from . import routing
from .common import ClientBase
from .follow import STOP
from .routing import GET, GET_VALUE

log = logging.getLogger("appliance.client")

# A step of the follower is one etcd call (2 s timeout per endpoint) or a wait.
_JOIN_TIMEOUT = 10.0


class Client(ClientBase):
    """Blocking calls, safe to share between threads. With `discover`, the
    ring is read in the constructor (PeerError if etcd cannot be read);
    when it is followed, a daemon thread does that until close()."""

    _grpc = grpc
    _engine_channel = EngineChannel

    def _open(self) -> None:
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._follower is not None:
            self._follower.reset(*self._follower.open())
            self._thread = threading.Thread(target=self._follow, name="appliance-client-ring", daemon=True)
            self._thread.start()
        elif self._discover is not None:
            self.refresh()

    def _follow(self) -> None:
        assert self._follower is not None
        steps = self._follower.steps(lambda watch, item: self._events.put((watch, item)))
        try:
            step = next(steps)
            while not self._stop.is_set():
                step = steps.send(step.run(self._events))
        finally:
            steps.close()
            self._follower.release()

    def refresh(self) -> None:
        """Read the ring now (from etcd or `discover`); a static list stays."""
        if self._discover is not None:
            self._install(*self._read_ring())

    def peers(self) -> list[str]:
        return self._peers()

    def locate(self, key: str) -> str | None:
        """The node that owns key in the client's ring (None: no nodes)."""
        return self._locate(key)

    # Calls -----------------------------------------------------------------------

    def get(self, group: str, key: str, *, timeout: float | None = None) -> bytes:
        """The value; raises KeyNotFound, GroupNotFound, InvalidRequest,
        OriginError, or PeerError when no node could answer in time."""
        if self.engine and type(group) is str and type(key) is str:
            return self._get_value(group, key, self._deadline(timeout))
        return self._routed(routing.get_op(group, key), self._deadline(timeout))

    def _get_value(self, group: str, key: str, deadline: float) -> bytes:
        """A Get on the engine's client whose first try builds no message
        object: Rust encodes the request and takes the value. A failed try
        goes on as _routed() would go on after it."""
        router = self._router
        peer = router.first_get(group, key)
        if peer is None:  # no ring, or this Get listens for a hint (first_get took its turn)
            return self._routed(routing.get_op(group, key), deadline, listen=router.hot is not None)
        got = self._pool.methods(peer)[GET_VALUE](
            group, key, self._metadata_for(peer, GET), max(0.0, deadline - time.monotonic())
        )
        if type(got) is bytes:
            return got
        tries = router.attempts(key, deadline)
        if tries.after(peer, client_error(failure(got))):
            self._refresh_quietly()
        return self._routed(routing.get_op(group, key), deadline, tries)

    def get_many(self, group: str, keys: Iterable[str], *, timeout: float | None = None) -> dict[str, bytes]:
        """{key: value} of the keys that exist. Keys go to their owners in one
        call per owner; errors other than a missing key raise."""
        deadline = self._deadline(timeout)
        ops = routing.get_many_ops(self._router.ring, group, keys)
        return routing.merge(self._routed(op, deadline) for op in ops)

    def set(
        self, group: str, key: str, value: bytes, *, ttl: float = 0.0, timeout: float | None = None
    ) -> cache_pb2.ChangeResponse:
        """Write through to the owner and drop hot copies; the ChangeResponse."""
        return self._routed(routing.set_op(group, key, value, ttl), self._deadline(timeout))

    def remove(self, group: str, key: str, *, timeout: float | None = None) -> cache_pb2.ChangeResponse:
        """Drop key everywhere; the ChangeResponse lists each peer's answer."""
        return self._routed(routing.remove_op(group, key), self._deadline(timeout))

    def _routed(
        self, op: routing.Op, deadline: float, tries: routing.Attempts | None = None, listen: bool | None = None
    ):
        router = self._router
        # A Get's trailers may carry its owner's hot-key hint (`listen` None:
        # the router's turn; never after a first try made without `tries`).
        if listen is None:
            listen = tries is None and router.listens(op)
        if tries is None:
            tries = router.plan(op, deadline)
        for peer, left in tries:
            try:
                method: Any = self._pool.methods(peer)[op.method.path]  # a grpc UnaryUnaryMultiCallable
                metadata = self._metadata_for(peer, op.method)
                if not listen:
                    return op.reply(method(op.request, timeout=left, metadata=metadata))
                reply, call = method.with_call(op.request, timeout=left, metadata=metadata)
                router.heard(op, call.trailing_metadata())
                return op.reply(reply)
            except grpc.RpcError as err:
                if tries.failed(client_error(err)):
                    self._refresh_quietly()
        raise tries.error()

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # keep the ring we have
            log.debug("ring refresh failed: %s: %s", type(exc).__name__, exc)

    # Closing -----------------------------------------------------------------------

    def _discard(self, channels: list) -> None:
        for channel in channels:
            channel.close()

    def close(self) -> None:
        """Stop following the ring and close every channel; calls after
        this raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._events.put(STOP)
            self._thread.join(_JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.warning("the ring watch thread did not stop within %.0fs (etcd hung?)", _JOIN_TIMEOUT)
        self._discard(self._pool.drain())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
