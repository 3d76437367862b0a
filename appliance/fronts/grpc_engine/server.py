"""The gRPC front on the engine: our Rust front (engine/, module appliance_engine:
tokio, hyper/h2, rustls) and the Python that serves what it hands over.

HTTP/2, gRPC framing, TLS and the socket limits run in Rust threads outside
the GIL. A hit (a Get, a GetMany whose keys all hit, a peer's forward) is
answered there from the engine's stores (engine/src/hits.rs), and a client's
Get for a key another member owns is forwarded from there where the rules
allow (engine/src/forward.rs; `_push_forwarding` tells it the ring and the
breakers). Every other
call comes to Python as an event (id, method, request bytes, metadata,
peer, deadline), in batches. One thread waits for batches; on a SharedLoop
it serves each under the loop's lock (parse, call the rules, respond, with
no coroutine and no context object per call), and hands the loop only what
must wait: misses, writes and health watches become tasks.

Served from events: every call of the table (fronts/calls.py: Get,
GetMany, Set, Remove, Peek, Handoff), Health/Check and Health/Watch. The rest (Peer/Forward,
a bidirectional stream, and reflection) goes to a grpc.aio server on a unix
socket in a private directory, which the front proxies to.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from ... import addr as addrs
from ...cache import errors
from ...cache.native_store import native_store
from ...cache.promoter import Promoter, RandomPromoter, RatePromoter
from ...peering.breaker import Breaker
from ...protocol import codec
from ...protocol.metadata import FORWARDED, HOT
from ...protocol.status import Failure, failure, internal_failure, rate_limited_failure
from ...rules.auth import Credentials
from ...rules.node_rules import MAX_BATCH_KEYS, RESULT_OVERHEAD
from ...rules.ratelimit import client_address
from .. import calls, health
from ..base import BaseTransport
from ..calls import CallContext, Reply
from ..grpc_aio.server import REFLECTED, add_services
from ..grpc_aio.services import PeerService
from .loop import lock_of

if TYPE_CHECKING:
    from ...config import Settings
    from ...rules.node_rules import NodeRules

log = logging.getLogger(__name__)

# Method ids are indexes into this list (the front numbers them in order):
# the calls of the table, then health.
CALLS = calls.METHODS
METHODS = tuple((m.path, False) for m in CALLS) + (
    (f"/{health.SERVICE}/Check", False),
    (f"/{health.SERVICE}/Watch", True),
)
GET, GET_MANY = CALLS.index(calls.GET), CALLS.index(calls.GET_MANY)
HEALTH_CHECK, HEALTH_WATCH = len(CALLS), len(CALLS) + 1
BATCH = 256
# How often the engine's hit counters and samples reach the groups (and
# the owner's hot keys reach the engine) when nothing reads them sooner.
HITS_COLLECT_INTERVAL = 0.2
# Event kinds and stream-send results, as the front numbers them.
EVENT_CANCEL = 1
STREAM_FULL = 1
STREAM_CLOSED = 2
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _hot_copies(promoter: Promoter) -> int | None:
    """How the engine may keep hot copies of what it forwards, as the
    group's promoter would: never (0), while the hot cache has room (1:
    RatePromoter admits a key asked for lately, and a forwarded one was);
    None: only Python may decide (its misses go to Python)."""
    if isinstance(promoter, RatePromoter):
        return 1
    if isinstance(promoter, RandomPromoter) and promoter.probability == 0:
        return 0
    return None


def _name_os_thread(name: bytes) -> None:
    """The name `top -H` and /proc/PID/task/*/comm show (Python 3.11 sets none)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class EngineTransport(BaseTransport):
    """Limits enforced at the socket, TLS and mTLS in rustls (certificates
    read at start, as grpcio does; a reload restarts the worker). With mTLS
    each call's event carries the client certificate's names, as grpcio's
    auth context does.

    The groups keep their entries in the engine's stores, and a hit is
    answered there without an event; its counters reach the group when
    they are read (Group.collect) or every HITS_COLLECT_INTERVAL. With
    [ops] rate_limit the engine charges the buckets Python charges
    (appliance_engine.TokenBuckets); a call they refuse comes here."""

    name = "engine"
    # Peers run the same config, so an owner is on the engine too: a unary
    # Get is answered in Rust there, while a Peer/Forward stream would go to
    # its grpc.aio fallback (bench/forwarded.py measures both).
    forward = "unary"

    def __init__(self, settings: Settings, *, io_threads: int = 1, peer_token: str | None = None) -> None:
        super().__init__(settings, peer_token=peer_token)
        self.io_threads = io_threads
        self.store = native_store() or self.store
        self._collector: asyncio.Task | None = None
        # Forwards go out on the engine's client where it can dial as
        # grpc.aio would (TLS needs `tls.ca`: rustls trusts no system roots).
        self.peer_clients.engine_usable()
        self._front: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[int, asyncio.Task] = {}  # call id -> task of a call not answered inline
        self._stopping = False
        self._forwarding_told: tuple | None = None
        self._forwards = False  # the engine forwards misses itself
        self.hits_open = False  # the engine answers hits (and forwards) once there is a ring
        self._fallback: grpc.aio.Server | None = None
        self._fallback_dir: str | None = None
        self._peer_service: PeerService | None = None
        self._pump: threading.Thread | None = None
        self._batches: collections.deque = collections.deque()  # received, not yet handled
        self._scheduled = False  # a _drain is queued on the loop

    # Lifecycle -----------------------------------------------------------------

    async def start(self, rules: NodeRules, host: str, port: int) -> int:
        self._bind(rules)
        self._loop = asyncio.get_running_loop()
        try:
            front = self._make_front(addrs.join(host, port))
        except OSError as exc:
            raise RuntimeError(f"Failed to bind to address {addrs.join(host, port)}: {exc}") from exc
        try:
            await self._start_fallback(rules, front)
            front.start()
        except BaseException:
            front.close()
            await self._stop_fallback(0)
            raise
        self._front = front
        self._pump = threading.Thread(target=self._receive, name="engine-recv", daemon=True)
        self._pump.start()
        self._serve_hits(rules, front)
        return front.bound_port

    def _serve_hits(self, rules: NodeRules, front: Any) -> None:
        """Let the engine answer hits from the groups' stores (once a ring
        exists), charging the rate limit's buckets as Python does."""
        limiter = self.limiter
        if limiter is not None:
            try:
                front.set_limit(limiter.buckets, sorted(limiter.trusted()))
            except (TypeError, ValueError) as exc:  # Python's buckets (no engine's), or a test clock
                log.info("hits are answered in Python: the engine cannot charge these buckets (%s)", exc)
                return
        tokens, identities = rules.auth.grants("read")
        front.set_access(rules.reads_open, tokens, identities)
        forwards = self._forwards = self._forwards_here()
        for name, group in rules.groups.items():
            served = front.serve_group(name, group.main, group.hot, group.owned_hot.every)
            group.collect = functools.partial(self._collect, group, served, {"hot": frozenset()})
            if forwards:
                front.forward_group(name, _hot_copies(group.promoter), group.ttl, group.cache_bytes)
        if forwards:
            rules.on_ring_change = functools.partial(self._push_forwarding, rules)
        self._collector = asyncio.get_running_loop().create_task(self._keep_collecting(rules))

    def _forwards_here(self) -> bool:
        """Whether the engine forwards misses itself: where the node's peer
        clients would make the same call (unary Gets on the engine's
        client), in plaintext, to nodes of our own (no seed_interop)."""
        settings, clients = self.settings, self.peer_clients
        return (
            clients.library == "engine"
            and clients.forward == "unary"
            and not settings.tls.enabled
            and not settings.cluster.seed_interop
        )

    def _push_forwarding(self, rules: NodeRules) -> None:
        """Tell the engine the ring and which peers' breakers are closed,
        when either changed (none before there is a ring). Peeks at previous
        owners are the owner's, on its own miss: forwards need none."""
        front, peers = self._front, rules.peers
        if front is None:
            return
        ring = peers.ring
        nodes = list(ring.nodes)
        allowed = [bool((facts := peers.facts(n)) is not None and facts.read_allowed()) for n in nodes]
        state = None if peers.revision < 0 else (peers.version, tuple(allowed))
        if state == self._forwarding_told:
            return
        self._forwarding_told = state
        if state is None:
            front.set_forwarding([], None, None, [], 0.0, 0.0)
            return
        index = {n: i for i, n in enumerate(nodes)}
        points = [(h, index[n]) for h, n in ring.points()]
        me = index.get(peers.self_addr)
        front.set_forwarding(points, nodes, me, allowed, float(self.settings.node.peer_timeout), Breaker.SHARE)

    def _silenced(self, rules: NodeRules, addrs: list[str]) -> None:
        now = time.monotonic()
        for addr in addrs:
            facts = rules.peers.facts(addr)
            if facts is not None and facts.read_allowed():
                facts.silenced(now)
                log.warning("%s does not answer: loading its keys locally until it does", addr)

    async def _start_fallback(self, rules: NodeRules, front: Any) -> None:
        # mkdtemp makes the directory 0700: only this user reaches the socket.
        self._fallback_dir = tempfile.mkdtemp(prefix="appliance-engine-")
        path = os.path.join(self._fallback_dir, "fallback.sock")
        server = grpc.aio.server(options=self.message_options)
        self._peer_service = PeerService(rules, self.limiter)
        add_services(server, self._peer_service.handlers())
        reflection.enable_server_reflection(REFLECTED, server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        self._fallback = server
        front.set_fallback(path)

    async def stop(self, grace: float | None) -> None:
        """As grpc.aio's stop: refuse new calls, give those in flight `grace`
        seconds, then cancel the rest; open streams end at once."""
        self._stopping = True
        if self._front is not None:
            self._front.open_hits(False)
        if self._collector is not None:
            self._collector.cancel()
        await self.health.close()  # ends every Health/Watch
        fallback = asyncio.ensure_future(self._stop_fallback(grace))
        tasks = list(self._tasks.values())
        if tasks and grace:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await fallback
        front, self._front = self._front, None
        if front is not None:
            await asyncio.get_running_loop().run_in_executor(None, front.close)
        if self._pump is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._pump.join, 5)

    async def _stop_fallback(self, grace: float | None) -> None:
        if self._peer_service is not None:
            await self._peer_service.close()
        if self._fallback is not None:
            await self._fallback.stop(grace)
            self._fallback = None
        if self._fallback_dir is not None:
            shutil.rmtree(self._fallback_dir, ignore_errors=True)
            self._fallback_dir = None

    # Calls ---------------------------------------------------------------------

    def _receive(self) -> None:
        """The pump thread: batches from Rust.

        On a SharedLoop (what `appliance worker` runs) it serves each batch
        itself, under the loop's lock: hits are answered here, and only the
        rest (misses, writes, watches, cancels) goes to the loop, in one hop
        per batch that has any. On another loop every batch goes to the loop.
        While a drain is already queued (the loop is behind), a batch only
        joins the queue: no wakeup write per batch."""
        front, loop = self._front, self._loop
        assert front is not None and loop is not None
        _name_os_thread(b"engine-recv")
        lock = lock_of(loop)
        batches = self._batches
        while (events := front.recv_batch_details(BATCH)) is not None:
            if lock is not None:
                later: list = []
                with lock:
                    self._on_events(events, later)
                if not later:
                    continue
                batches.append((True, later))
            else:
                batches.append((False, events))
            if not self._scheduled:
                self._scheduled = True
                try:
                    loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed: nobody to serve
                    return

    def _drain(self) -> None:
        # Clear the flag before taking batches: one appended after this
        # point queues a new drain (under the GIL, deque ops are atomic).
        self._scheduled = False
        batches = self._batches
        while batches:
            served, batch = batches.popleft()
            if not served:
                self._on_events(batch, None)
                continue
            for call_id, coro in batch:  # what the pump thread left for the loop
                if coro is None:
                    self._cancel(call_id)
                else:
                    self._spawn(call_id, coro)

    def _cancel(self, call_id: int) -> None:
        task = self._tasks.pop(call_id, None)
        if task is not None:
            task.cancel()

    def _on_events(self, events: list, later: list | None) -> None:
        """Serve a batch. `later` None: on the loop, tasks start here. Else
        (the pump thread, under the loop's lock) what needs the loop is
        appended to `later` as (call id, coroutine), a cancel as (call id,
        None), and nothing here touches asyncio."""
        front = self._front
        if front is None:
            return
        rules = self.rules
        assert rules is not None  # bound in start(), before the front takes calls
        if self._forwards and (silenced := front.forwards_silenced()):
            # Before the calls those forwards handed over: they load locally.
            self._silenced(rules, silenced)
        limiter = self.limiter
        limit = self.message_limit
        spawn = self._spawn if later is None else (lambda call_id, coro: later.append((call_id, coro)))
        for kind, call_id, method, payload, names, details in events:
            # One call's bug must not cost the rest of the batch its answers.
            try:
                if kind == EVENT_CANCEL:
                    if later is None:
                        self._cancel(call_id)
                    else:
                        later.append((call_id, None))
                    continue
                if self._stopping:
                    front.fail(call_id, _UNAVAILABLE, "server is stopping")
                    continue
                if len(payload) > limit:
                    self._fail(
                        call_id,
                        Failure(_EXHAUSTED, f"Received message larger than max ({len(payload)} vs. {limit})", ()),
                    )
                    continue
                metadata, peer, remaining = details
                if method >= len(CALLS):
                    self._health(front, call_id, method, payload, metadata, spawn)
                    continue
                call = CALLS[method]
                request = call.parse(payload)
                creds = Credentials.from_metadata(metadata, names or ())
                forwarded = FORWARDED in metadata and rules.from_peer(True, creds)
                client = client_address(peer or "")
                if limiter is not None:  # charged before anything else, a malformed call too
                    free = forwarded or (call.peer_call and rules.from_peer(True, creds))
                    wait = limiter.admit(client, forwarded=free, cost=codec.call_cost(request))
                    if wait:
                        buckets = limiter.buckets
                        self._fail(call_id, rate_limited_failure(wait, client, buckets.rate, buckets.burst))
                        continue
                if request is None:
                    self._fail(call_id, call.malformed())
                    continue
                ctx = CallContext(creds, forwarded, remaining, client)
                # A hit, a peek, a handoff: answered here, no task, no copy.
                outcome = calls.answer_now(call, rules, request, ctx)
                if outcome is None:
                    spawn(call_id, self._later(call_id, call, request, ctx))
                else:
                    self._send(call_id, outcome)
            except Exception as exc:  # a bug: answer INTERNAL and keep serving
                log.exception("call to %s failed", METHODS[method][0] if 0 <= method < len(METHODS) else method)
                self._fail(call_id, internal_failure(exc))

    def _spawn(self, call_id: int, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks[call_id] = task
        task.add_done_callback(functools.partial(self._finished, call_id))

    def _finished(self, call_id: int, task: asyncio.Task) -> None:
        if self._tasks.get(call_id) is task:
            del self._tasks[call_id]

    def _fail(self, call_id: int, status: Failure) -> None:
        if self._front is not None:
            self._front.fail(call_id, status.code.value[0], status.details, list(status.trailing_metadata))

    def _respond(self, call_id: int, data: bytes, trailers=None) -> None:
        if len(data) > self.message_limit:
            self._fail(
                call_id, Failure(_EXHAUSTED, f"Sent message larger than max ({len(data)} vs. {self.message_limit})", ())
            )
        elif self._front is not None:
            self._front.respond(call_id, data, None, trailers)

    def _send(self, call_id: int, outcome: Reply | Failure) -> None:
        if isinstance(outcome, Failure):
            self._fail(call_id, outcome)
        else:
            self._respond(call_id, outcome.data, list(outcome.trailers) or None)

    async def _later(self, call_id: int, call: calls.Method, request: Any, ctx: CallContext) -> None:
        assert self.rules is not None  # bound in start()
        self._send(call_id, await calls.answer_later(call, self.rules, request, ctx))

    # Health ----------------------------------------------------------------------

    def _health(self, front: Any, call_id: int, method: int, payload: bytes, metadata, spawn) -> None:
        if method == HEALTH_CHECK:
            assert self.rules is not None  # bound in start()
            proof = self.rules.auth.reply_proof(Credentials.from_metadata(metadata))
            self._health_check(front, call_id, payload, proof)
            return
        watch = codec.parser(health_pb2.HealthCheckRequest)(payload)
        if watch is None:
            self._fail(call_id, failure(errors.InvalidRequest("malformed HealthCheckRequest")))
        else:
            spawn(call_id, self._health_watch(call_id, watch.service))

    def _health_check(self, front: Any, call_id: int, payload: bytes, proof: tuple = ()) -> None:
        request = codec.parser(health_pb2.HealthCheckRequest)(payload)
        if request is None:
            self._fail(call_id, failure(errors.InvalidRequest("malformed HealthCheckRequest")))
            return
        status = self.health.check(request.service)
        if status is None:
            front.fail(call_id, grpc.StatusCode.NOT_FOUND.value[0], f"unknown service {request.service!r}")
        else:
            front.respond(call_id, health.response(status), None, list(proof) or None)

    async def _health_watch(self, call_id: int, service: str) -> None:
        front = self._front
        assert front is not None  # spawned by _on_events while the front is up
        loop = asyncio.get_running_loop()
        async for status in self.health.watch(service):
            data = health.response(status)
            sent = front.stream_try_send(call_id, data)
            if sent == STREAM_FULL:  # the client is behind: wait off the loop
                if not await loop.run_in_executor(None, front.stream_send, call_id, data):
                    return
            elif sent == STREAM_CLOSED:
                return
        front.stream_end(call_id)  # closed by a stop: end the stream with OK

    def _make_front(self, target: str) -> Any:
        from appliance_engine import Front

        node = self.settings.node
        return Front(
            target,
            list(METHODS),
            io_threads=self.io_threads,
            max_message=self.message_limit,
            max_concurrent_streams=node.max_concurrent_streams,
            max_header_list_size=node.max_header_list_size,
            max_connections=node.max_connections,
            **self._tls_files(),
            hits=(
                GET,
                node.max_group_bytes,
                node.max_key_bytes,
                [HOT],
                (GET_MANY, MAX_BATCH_KEYS, self.message_limit, RESULT_OVERHEAD),
            ),
        )

    async def _keep_collecting(self, rules: NodeRules) -> None:
        front = self._front
        callee_told = None
        limiter = self.limiter
        trusted_told = None if limiter is None else set(limiter.trusted())
        while front is not None and not self._stopping:
            # A bug here must not stop the counters for good: log it, go on.
            try:
                # Hits wait for a ring, as NodeRules.hit does (else: no ring yet).
                self.hits_open = rules.peers.revision >= 0
                front.open_hits(self.hits_open)
                # Peers' forwards: checked by their proofs once we know the
                # address we serve (NodeRules.from_peer), else on the marker.
                proofs = rules.auth.proofs
                callee = (None, "", 0) if proofs is None else proofs.callee()
                if callee is not None and callee != callee_told:
                    front.set_peer_proofs(*callee)
                    callee_told = callee
                # The ring's addresses, whose forwards the limit lets through.
                if limiter is not None and (trusted := limiter.trusted()) != trusted_told:
                    front.set_limit(limiter.buckets, sorted(trusted))
                    trusted_told = set(trusted)
                for group in rules.groups.values():
                    if group.collect is not None:
                        group.collect()
                if rules.on_ring_change is not None:  # the breakers move too
                    rules.on_ring_change()
            except Exception:
                log.exception("collecting the engine's hits failed")
            await asyncio.sleep(HITS_COLLECT_INTERVAL)

    @staticmethod
    def _collect(group, served, pushed: dict) -> None:
        """What the engine answered since the last call, into the group;
        the owner's hot keys, when they changed, into the engine."""
        gets, main_hits, hot_hits, forwarded, owned, seen, forward_gets, fetches, peer_loads = served.take()
        if gets or forward_gets or seen or fetches:
            group.absorb(gets, main_hits, hot_hits, forwarded, owned, seen, forward_gets, fetches, peer_loads)
        hot = group.owned_hot.hot
        if hot != pushed["hot"]:
            pushed["hot"] = frozenset(hot)
            served.set_hot(list(hot))

    def socket_refusals(self) -> dict[str, int]:
        """What the engine refused before any call reached Python."""
        if self._front is None:
            return {"request_bytes": 0, "connections": 0}
        requests, connections = self._front.refusals()
        return {"request_bytes": requests, "connections": connections}

    def _tls_files(self) -> dict[str, Any]:
        tls = self.settings.tls
        if not tls.enabled:
            return {}
        return {
            "tls_cert": str(tls.cert),
            "tls_key": str(tls.key),
            "tls_ca": str(tls.ca) if tls.ca else None,
            "client_auth": bool(tls.client_auth),
        }
