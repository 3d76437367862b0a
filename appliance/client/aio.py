"""The asyncio client: the calls of Client as coroutines, on grpc.aio.

Nothing here blocks the event loop: etcd is read in a thread
(asyncio.to_thread), the ring is followed by a task. Use one AsyncClient
from one event loop (grpc.aio channels belong to the loop that made them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

import grpc
import grpc.aio

from ..pb import cache_pb2
from ..peering.engine_channel import AioEngineChannel, failure
from ..protocol.status import client_error
from . import routing
from .common import ClientBase
from .follow import STOP
from .routing import GET, GET_VALUE

log = logging.getLogger("appliance.client")


class AsyncClient(ClientBase):
    """The calls of Client as coroutines. The constructor does no I/O: with
    `discover`, the first call (or `async with`) reads the ring and, when
    it is followed, starts the task that does that until close()."""

    _grpc = grpc.aio
    _engine_channel = AioEngineChannel

    def _open(self) -> None:
        self._started = self._discover is None
        self._starting: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._closers: set[asyncio.Task] = set()

    # Starting and following ------------------------------------------------------

    async def _ready(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
            # Retrieved even if every caller waiting on it is cancelled.
            self._starting.add_done_callback(lambda t: t.cancelled() or t.exception())
        starting = self._starting
        try:
            # Shielded: a cancelled first call must not cancel the read the
            # calls after it wait on.
            await asyncio.shield(starting)
        except Exception:
            if self._starting is starting:
                self._starting = None  # the next call tries again
            raise

    async def _start(self) -> None:
        if self._follower is not None:
            self._follower.reset(*await asyncio.to_thread(self._follower.open))
            if self._closed:  # closed while reading
                await asyncio.to_thread(self._follower.release)
                return
            self._task = asyncio.create_task(self._follow(), name="appliance-client-ring")
        else:
            self._install(*await asyncio.to_thread(self._read_ring))
        self._started = True

    async def _follow(self) -> None:
        assert self._follower is not None
        loop = asyncio.get_running_loop()

        def post(watch: int, item: object) -> None:  # from the watch's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(self._events.put_nowait, (watch, item))

        steps = self._follower.steps(post)
        try:
            step = next(steps)
            while not self._closed:
                step = steps.send(await step.run_async(self._events))
        finally:
            steps.close()
            await asyncio.to_thread(self._follower.release)

    async def refresh(self) -> None:
        """Read the ring now (from etcd or `discover`); a static list stays."""
        if not self._started:
            await self._ready()  # that is a read
        elif self._discover is not None:
            self._install(*await asyncio.to_thread(self._read_ring))

    async def peers(self) -> list[str]:
        await self._ready()
        return self._peers()

    async def locate(self, key: str) -> str | None:
        """The node that owns key in the client's ring (None: no nodes)."""
        await self._ready()
        return self._locate(key)

    # Calls -----------------------------------------------------------------------

    async def get(self, group: str, key: str, *, timeout: float | None = None) -> bytes:
        """As Client.get."""
        if self.engine and type(group) is str and type(key) is str:
            deadline = self._deadline(timeout)
            await self._ready()
            return await self._get_value(group, key, deadline)
        op, deadline = routing.get_op(group, key), self._deadline(timeout)
        await self._ready()
        return await self._routed(op, deadline)

    async def _get_value(self, group: str, key: str, deadline: float) -> bytes:
        """As Client._get_value: a first try with no message objects."""
        router = self._router
        peer = router.first_get(group, key)
        if peer is None:  # no ring, or this Get listens for a hint (first_get took its turn)
            return await self._routed(routing.get_op(group, key), deadline, listen=router.hot is not None)
        got = await self._pool.methods(peer)[GET_VALUE](
            group, key, self._metadata_for(peer, GET), max(0.0, deadline - time.monotonic())
        )
        if got[0] == 0:
            return got[2]
        tries = router.attempts(key, deadline)
        if tries.after(peer, client_error(failure(got))):
            await self._refresh_quietly()
        return await self._routed(routing.get_op(group, key), deadline, tries)

    async def get_many(self, group: str, keys: Iterable[str], *, timeout: float | None = None) -> dict[str, bytes]:
        """As Client.get_many; the calls to the owners run concurrently."""
        deadline = self._deadline(timeout)
        await self._ready()
        ops = routing.get_many_ops(self._router.ring, group, keys)
        if len(ops) == 1:
            return await self._routed(ops[0], deadline)
        calls = [asyncio.ensure_future(self._routed(op, deadline)) for op in ops]
        try:
            return routing.merge(await asyncio.gather(*calls))
        finally:
            for call in calls:  # after a failure, the others are not wanted
                call.cancel()

    async def set(
        self, group: str, key: str, value: bytes, *, ttl: float = 0.0, timeout: float | None = None
    ) -> cache_pb2.ChangeResponse:
        """As Client.set."""
        op, deadline = routing.set_op(group, key, value, ttl), self._deadline(timeout)
        await self._ready()
        return await self._routed(op, deadline)

    async def remove(self, group: str, key: str, *, timeout: float | None = None) -> cache_pb2.ChangeResponse:
        """As Client.remove."""
        op, deadline = routing.remove_op(group, key), self._deadline(timeout)
        await self._ready()
        return await self._routed(op, deadline)

    async def _routed(
        self, op: routing.Op, deadline: float, tries: routing.Attempts | None = None, listen: bool | None = None
    ):
        router = self._router
        # As Client._routed.
        if listen is None:
            listen = tries is None and router.listens(op)
        if tries is None:
            tries = router.plan(op, deadline)
        for peer, left in tries:
            try:
                call = self._pool.methods(peer)[op.method.path](
                    op.request, timeout=left, metadata=self._metadata_for(peer, op.method)
                )
                reply = await call
                if listen:
                    router.heard(op, await call.trailing_metadata())
                return op.reply(reply)
            except grpc.RpcError as err:
                if tries.failed(client_error(err)):
                    await self._refresh_quietly()
        raise tries.error()

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # keep the ring we have
            log.debug("ring refresh failed: %s: %s", type(exc).__name__, exc)

    # Closing -----------------------------------------------------------------------

    def _discard(self, channels: list) -> None:
        # Called on the loop (by the follow task or a refresh): close in a task.
        for channel in channels:
            task = asyncio.ensure_future(channel.close())
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    async def close(self) -> None:
        """Stop following the ring and close every channel; calls after
        this raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._task is not None:
            self._events.put_nowait(STOP)
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._pool.drain()), *self._closers, return_exceptions=True)

    async def __aenter__(self) -> AsyncClient:
        await self._ready()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
