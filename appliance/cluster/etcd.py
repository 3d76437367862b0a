"""etcd access shared by the registry, the controller and the CLI.

Keys follow Go's naming/endpoints layout: `<service>/<host:port>` holding
`{"Addr": "<host:port>", "Metadata": ...}`; a bare `host:port` value (the
seed's `clusters` prefix) is accepted on read.

Our Metadata is a JSON object carried as a string. Go's resolver hands it
to grpc-go as resolver.Address.Metadata, and a JSON object would decode to
a map, which grpc-go hashes or compares with ==: the seed's round-robin
client (grpc/serviceRegisterCall) panics with "hash of unhashable type
map[string]interface {}" (etcd-io/etcd#19700, grpc/grpc-go#8225). A string,
like the seed's own "groupcache services", is safe.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import etcd3
import grpc
from etcd3.client import Endpoint

from .. import addr as addrs
from ..config import Layout

if TYPE_CHECKING:
    from ..config import ClusterSettings, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
S = TypeVar("S")  # a step of a driver of `retrying`

# The prefix the seed's Go nodes read their peer list from (bare host:port
# values), once, at start: main.go's services.GetPeers("clusters").
SEED_CLUSTERS = "clusters"

# Reconnect fast after etcd comes back; grpc's default backoff grows to 2 min.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def prefix(service: str) -> str:
    return service.rstrip("/") + "/"


def member_key(service: str, addr: str) -> str:
    return prefix(service) + addr


def member_value(addr: str, metadata: dict | None = None) -> str:
    text = None if metadata is None else json.dumps(metadata, separators=(",", ":"))
    return json.dumps({"Addr": addr, "Metadata": text}, separators=(",", ":"))


def parse_member(key: bytes | str, value: bytes | str) -> tuple[str, dict | None]:
    """(addr, metadata) of one registration; ValueError if it is not one."""
    text = value.decode() if isinstance(value, bytes) else value
    text = text.strip()
    metadata = None
    if text.startswith("{"):
        doc = json.loads(text)
        addr = doc.get("Addr") or doc.get("addr")
        metadata = doc.get("Metadata")
        if not isinstance(addr, str):
            raise ValueError(f"no Addr in {text[:80]!r}")
    else:
        addr = text
    addrs.split(addr)
    if isinstance(metadata, str) and metadata.startswith("{"):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            metadata = None
    return addr, metadata if isinstance(metadata, dict) else None


class Backoff:
    """How long to wait before trying etcd again, for every loop that keeps
    a watch or a lease (registry, controller, box operations, the client's
    ring follower): FIRST_S, doubling to `cap` (CAP_S unless a caller's own
    cadence is slower); reset() once etcd answers again."""

    FIRST_S = 0.1
    CAP_S = 1.0

    def __init__(self, cap: float = CAP_S) -> None:
        self.cap = cap
        self.current = self.FIRST_S

    def reset(self) -> None:
        self.current = self.FIRST_S

    def next(self) -> float:
        """The wait now; the one after doubles, up to the cap."""
        wait = self.current
        self.current = min(self.current * 2, self.cap)
        return wait


class Pause(NamedTuple):
    """Between two attempts of `retrying`: wait this long (0: go on at once)."""

    seconds: float


def retrying(
    attempt: Callable[[Backoff], Generator[S, Any, None]],
    failed: Callable[[Exception, float], bool],
    backoff: Backoff,
) -> Generator[S | Pause, Any, None]:
    """The one loop of every etcd watcher or lease keeper, as steps its
    driver runs (a thread: keep_trying; the client's ring follower: its
    sync and async drivers). `attempt` runs over and over, its own steps
    passed through; it calls backoff.reset() once etcd has answered. When
    it raises, `failed(exc, wait)` says so (logs, counts) and returns
    whether to pause `wait` seconds, the backoff's next."""
    while True:
        try:
            yield from attempt(backoff)
        except Exception as exc:
            wait = backoff.next()
            yield Pause(wait if failed(exc, wait) else 0.0)
        else:
            yield Pause(0.0)


def keep_trying(
    stop: threading.Event,
    attempt: Callable[[Backoff], None],
    failed: Callable[[Exception, float], bool],
    *,
    backoff: Backoff | None = None,
) -> None:
    """`retrying` on a thread: `attempt` blocks, and runs until `stop` is set
    (a failure once it is set is not reported)."""

    def blocking(backoff: Backoff) -> Generator[Pause, Any, None]:
        attempt(backoff)
        yield from ()

    def reported(exc: Exception, wait: float) -> bool:
        return not stop.is_set() and failed(exc, wait)

    for pause in retrying(blocking, reported, backoff or Backoff()):
        if stop.is_set():
            return
        if pause.seconds:
            stop.wait(pause.seconds)


# A member that failed a call is skipped this long (python3-etcd3 marks it;
# `call` revives them all when every one is marked, so one endpoint is
# retried at once).
SKIP_FAILED_S = 10.0


class MemberDown(etcd3.exceptions.ConnectionFailedError):
    """A member answered with a gRPC error python3-etcd3 passes through
    untranslated but that means it cannot serve now: UNKNOWN "context
    deadline exceeded" from a member without quorum, or UNAVAILABLE from
    an untranslated call (raised by `call` from that error)."""


# What a call that should go to another member raises (python3-etcd3 has
# marked the member it tried as failed already).
UNREACHABLE = (
    etcd3.exceptions.ConnectionFailedError,  # MemberDown too
    etcd3.exceptions.ConnectionTimeoutError,
    etcd3.exceptions.InternalServerError,
    etcd3.exceptions.NoServerAvailableError,
)


def revive(client: etcd3.MultiEndpointEtcd3Client) -> None:
    """Forget every member's failure: all are to be tried again."""
    for endpoint in client.endpoints.values():
        endpoint.last_failed = 0


def describe(exc: BaseException) -> str:
    """An etcd client error with etcd's own reason (python-etcd3 keeps it on
    the gRPC error it was raised from), like "ConnectionFailedError: etcd
    connection failed (etcdserver: unhealthy cluster)"."""
    if isinstance(exc, grpc.RpcError):
        details = getattr(exc, "details", None)
        text = f"etcd answered {exc.code().name}" if callable(getattr(exc, "code", None)) else "etcd failed"
    else:
        text = f"{type(exc).__name__}: {exc}"
        details = getattr(exc.__cause__ or exc.__context__, "details", None)
    if callable(details):
        try:
            reason = details()
        except Exception:  # not a finished gRPC call
            reason = None
        if reason:
            text += f" ({reason})"
    return text


def call(client: etcd3.MultiEndpointEtcd3Client, fn: Callable[[Any], T]) -> T:
    """fn(client), tried once on each member at most: one that fails (down,
    cut off, too slow) is skipped at once for the next try, and for
    SKIP_FAILED_S after. Raises the last failure when none answers."""
    tries = max(1, len(client.endpoints))
    for i in range(tries):
        try:
            return fn(client)
        except etcd3.exceptions.NoServerAvailableError:
            revive(client)  # every member failed lately: try each again
            if i == tries - 1:
                raise
        except UNREACHABLE:
            if i == tries - 1:
                raise
        except grpc.RpcError as exc:
            # python3-etcd3 passes some errors through untranslated (UNKNOWN,
            # and every error of the `members` property) without marking
            # the member failed.
            if exc.code() not in _MEMBER_DOWN:
                raise
            _mark_failed(client)
            if i == tries - 1:
                raise MemberDown() from exc
    raise AssertionError("unreachable")


# UNKNOWN: etcd's "context deadline exceeded" (a member that cannot reach quorum).
_MEMBER_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)


def _mark_failed(client: etcd3.MultiEndpointEtcd3Client) -> None:
    endpoint = client.endpoint_in_use
    if endpoint is not None:
        endpoint.fail()
        client._clear_old_stubs()  # the stubs are bound to that member's channel


def connect_to(settings: Settings, *, timeout: float = 2.0) -> etcd3.MultiEndpointEtcd3Client:
    """A client of the etcd `settings` describe: the private socket, or the
    endpoints (over TLS where Layout.etcd_tls says so)."""
    layout = Layout(settings)
    return connect(settings.cluster, socket=layout.etcd_socket(), tls=layout.etcd_tls(), timeout=timeout)


def connect(
    cluster: ClusterSettings,
    *,
    socket: Path | None = None,
    tls: tuple[Path | None, Path | None, Path | None] | None = None,
    timeout: float = 2.0,
) -> etcd3.MultiEndpointEtcd3Client:
    """A client for the configured endpoints, failing over between them; or,
    with `socket` (Layout.etcd_socket(): the private embedded etcd), for
    that unix socket alone. `tls`: (ca, cert, key), else the cluster's."""
    if socket is not None:
        # Endpoint dials "host:port": the socket file is named "<name>:<port>"
        # (etcd names it after its URL's host:port).
        path, _, socket_port = str(socket).rpartition(":")
        endpoint = Endpoint(
            f"unix:{path}", int(socket_port), secure=False, time_retry=SKIP_FAILED_S, opts=_CHANNEL_OPTIONS
        )
        return etcd3.MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=timeout, failover=True)
    creds = None
    ca, cert, key = tls or (cluster.etcd_ca, cluster.etcd_cert, cluster.etcd_key)
    if ca or cert:
        creds = grpc.ssl_channel_credentials(_read(ca), _read(key), _read(cert))
    endpoints = []
    for endpoint in cluster.etcd:
        host, port = addrs.split(endpoint)
        endpoints.append(
            Endpoint(host, port, secure=creds is not None, creds=creds, time_retry=SKIP_FAILED_S, opts=_CHANNEL_OPTIONS)
        )
    client = etcd3.MultiEndpointEtcd3Client(
        endpoints=endpoints,
        timeout=timeout,
        user=cluster.etcd_user,
        password=cluster.etcd_password,
        failover=True,
    )
    if creds is None and client.call_credentials is not None:
        # grpc refuses call credentials on a plain-text channel ("does not
        # have a sufficient security level"); every call also sends the
        # auth token as plain metadata, which is what etcd reads.
        client.call_credentials = None
    return client


class Member(NamedTuple):
    """One registration: its address, metadata and etcd lease (0: none)."""

    addr: str
    metadata: dict | None
    lease: int = 0


def member_of(kv) -> Member:
    """The Member of one etcd KeyValue; ValueError if it is not one."""
    return Member(*parse_member(kv.key, kv.value), kv.lease)


def read_members(client, service: str) -> tuple[dict[str, Member], int]:
    """{etcd key: Member} under the service prefix, and the revision read."""
    response = client.get_prefix_response(prefix(service))
    members = {}
    for kv in response.kvs:
        key = kv.key.decode()
        try:
            members[key] = member_of(kv)
        except ValueError as exc:
            log.warning("ignoring %s: %s", key, exc)
    return members, response.header.revision


def apply_events(members: dict[str, Member], revision: int, response) -> tuple[dict[str, Member], int]:
    """The members after a WatchResponse, and the revision they are at.

    Events at or before `revision` are skipped: a read at that revision
    already holds them (a watch may start before a re-read of the prefix)."""
    members = dict(members)
    for event in response.events:
        if event.kv.mod_revision <= revision:
            continue
        key = event.kv.key.decode()
        if is_delete(event):
            members.pop(key, None)
            continue
        try:
            members[key] = member_of(event.kv)
        except ValueError as exc:
            log.warning("ignoring %s: %s", key, exc)
            members.pop(key, None)
    return members, max(revision, response.header.revision)


def peers_of(members: dict[str, Member]) -> list[str]:
    # Sorted: every controller must hand its workers the same order, since
    # ring collisions resolve by order.
    return sorted({m.addr for m in members.values()})


def leases_of(members: dict[str, Member]) -> dict[str, int]:
    return {m.addr: m.lease for m in members.values() if m.lease}


class WatchEnded(Exception):
    """The watch stream stopped: etcd restarted, compacted or cancelled it."""


def watch_prefix(client, key_prefix: str, start_revision: int, sink: Callable[[object], None]) -> Callable[[], None]:
    """Stream WatchResponses of a prefix to sink(response) from a thread.

    The stream's end, whatever the cause, reaches sink as a WatchEnded or
    the error itself. (python3-etcd3's own watcher drops that error: its
    thread dies on an unimported `six` before telling its callbacks.)
    Returns a function that cancels the watch."""
    from etcd3 import etcdrpc, utils

    raw = key_prefix.encode()
    requests: queue.Queue = queue.Queue()
    create = etcdrpc.WatchCreateRequest(key=raw, range_end=utils.prefix_range_end(raw), start_revision=start_revision)
    requests.put(etcdrpc.WatchRequest(create_request=create))

    def outgoing():
        while (request := requests.get()) is not None:
            yield request

    stream = etcdrpc.WatchStub(client.channel).Watch(
        outgoing(), metadata=client.metadata, credentials=client.call_credentials
    )

    def pump() -> None:
        try:
            for response in stream:
                if response.compact_revision:
                    raise WatchEnded(f"revision {start_revision} compacted (now {response.compact_revision})")
                if response.canceled:
                    raise WatchEnded(f"cancelled by etcd: {response.cancel_reason or 'no reason given'}")
                if response.events:
                    sink(response)
            raise WatchEnded("stream closed by etcd")
        except Exception as exc:
            sink(exc)

    threading.Thread(target=pump, name=f"watch-{key_prefix}", daemon=True).start()

    def cancel() -> None:
        requests.put(None)
        stream.cancel()

    return cancel


def is_delete(event) -> bool:
    return event.type == event.DELETE
