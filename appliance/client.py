"""The Python client applications import: ring-aware Get over gRPC.

    from appliance.client import Client
    from appliance.config import find_config, load_settings

    # The live ring from the etcd the config names (TLS and limits from it too):
    with Client.from_settings(load_settings(find_config())) as c:
        c.get("scores", "张三")            # b"100"

    # Or a static peer list:
    with Client(["127.0.0.1:9999", "127.0.0.1:10000", "127.0.0.1:10001"]) as c:
        c.get("scores", "张三")

It sends each key straight to its owner (the same ring the nodes use), so a
Get costs one hop. When the owner fails, it reloads the ring and retries on
another node: any node can serve any key.
"""

from __future__ import annotations

import threading
from typing import Iterable

import grpc

from . import addr as addrs
from .cache import errors
from .cache.ring import HashRing
from .transport.status import error_of, from_rpc_error
from .pb import cache_pb2, cache_pb2_grpc, groupcache_pb2, groupcache_pb2_grpc


def settings_kwargs(settings) -> dict:
    """Client keyword arguments that must match the nodes' config: TLS
    credentials (the box's certificate) and the message size limit."""
    from . import tls

    return {
        "credentials": tls.channel_credentials(settings.tls),
        "channel_options": tls.channel_options(settings.tls),
        "max_message_bytes": settings.node.max_value_bytes + 64 * 1024,
    }


class Client:
    def __init__(
        self,
        peers: Iterable[str] = (),
        *,
        replicas: int = 50,
        scheme: str = "seed",
        timeout: float = 5.0,
        discover=None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 4 * 1024 * 1024 + 65536,
        channel_options: list[tuple[str, object]] | None = None,
    ) -> None:
        """`peers` is a static list; `discover` (a callable returning the live
        peer list) replaces it and is called again after a failure.
        `credentials` (see appliance.tls.credentials_from_files) dials the
        nodes over TLS; `max_message_bytes` should match the nodes'
        max_value_bytes + 64 KiB (from_settings does that)."""
        self.replicas, self.scheme, self.timeout = replicas, scheme, timeout
        self._discover = discover
        self._credentials = credentials
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *(channel_options or ()),
        ]
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[grpc.Channel, groupcache_pb2_grpc.GroupCacheStub, cache_pb2_grpc.CacheStub]] = {}
        self.ring = HashRing((), replicas, scheme)
        self._install(list(peers) if not discover else discover())

    @classmethod
    def from_settings(cls, settings, **kwargs) -> "Client":
        from .cluster import etcd

        def discover() -> list[str]:
            client = etcd.connect(settings.cluster)
            try:
                return etcd.peers_of(etcd.read_members(client, settings.cluster.service)[0])
            finally:
                client.close()

        return cls(replicas=settings.node.replicas, scheme=settings.node.ring_hash, discover=discover,
                   **{**settings_kwargs(settings), **kwargs})

    # Ring --------------------------------------------------------------------

    def _install(self, peers: list[str]) -> None:
        for p in peers:
            addrs.split(p)
        with self._lock:
            self.ring = HashRing(sorted(set(peers)), self.replicas, self.scheme)

    def refresh(self) -> None:
        if self._discover is not None:
            self._install(self._discover())

    def peers(self) -> list[str]:
        return list(self.ring.nodes)

    def locate(self, key: str) -> str | None:
        return self.ring.owner(key)

    # Calls -------------------------------------------------------------------

    def _stubs_for(self, peer: str):
        with self._lock:
            entry = self._stubs.get(peer)
            if entry is None:
                if self._credentials is not None:
                    channel = grpc.secure_channel(peer, self._credentials, options=self._options)
                else:
                    channel = grpc.insecure_channel(peer, options=self._options)
                entry = self._stubs[peer] = (
                    channel,
                    groupcache_pb2_grpc.GroupCacheStub(channel),
                    cache_pb2_grpc.CacheStub(channel),
                )
            return entry

    def _stub(self, peer: str) -> groupcache_pb2_grpc.GroupCacheStub:
        return self._stubs_for(peer)[1]

    def get(self, group: str, key: str, *, timeout: float | None = None) -> bytes:
        """The value; raises KeyNotFound, GroupNotFound, InvalidRequest,
        OriginError, or PeerError when no node could answer."""
        request = groupcache_pb2.GetRequest(group=group, key=key)
        return self._routed(key, lambda peer, t: self._stub(peer).Get(request, timeout=t).value, timeout)

    def get_many(self, group: str, keys: list[str], *, timeout: float | None = None) -> dict[str, bytes]:
        """{key: value} of the keys that exist. Keys go to their owners in one
        call per owner; errors other than NOT_FOUND raise."""
        by_owner: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            by_owner.setdefault(self.ring.owner(key) or "", []).append(key)
        found: dict[str, bytes] = {}
        for owner, batch in by_owner.items():
            request = cache_pb2.GetManyRequest(group=group, keys=batch)

            def call(peer, t, request=request):
                return self._stubs_for(peer)[2].GetMany(request, timeout=t)

            response = self._routed(batch[0], call, timeout)
            for r in response.results:
                if r.code == 0:
                    found[r.key] = r.value
                elif r.code != grpc.StatusCode.NOT_FOUND.value[0]:
                    raise error_of(r.code, r.error)
        return found

    def set(self, group: str, key: str, value: bytes, *, ttl: float = 0.0, timeout: float | None = None):
        """Write through to the owner and drop hot copies; the ChangeResponse."""
        request = cache_pb2.SetRequest(group=group, key=key, value=value, ttl=ttl)
        return self._routed(key, lambda peer, t: self._stubs_for(peer)[2].Set(request, timeout=t), timeout)

    def remove(self, group: str, key: str, *, timeout: float | None = None):
        """Drop key everywhere; the ChangeResponse lists each peer's answer."""
        request = cache_pb2.RemoveRequest(group=group, key=key)
        return self._routed(key, lambda peer, t: self._stubs_for(peer)[2].Remove(request, timeout=t), timeout)

    def _routed(self, key: str, call, timeout: float | None):
        """call(peer, timeout) on the owner, then on other nodes if it fails."""
        timeout = self.timeout if timeout is None else timeout
        last: errors.CacheError | None = None
        tried: set[str] = set()
        for attempt in range(3):
            peer = self._pick(key, tried)
            if peer is None:
                break
            tried.add(peer)
            try:
                return call(peer, timeout)
            except grpc.RpcError as err:
                last = from_rpc_error(err)
                if not isinstance(last, errors.PeerError):
                    raise last from None
                if attempt == 0:
                    self._safe_refresh()  # the ring may have changed under us
        raise last or errors.PeerError("no peers known")

    def _pick(self, key: str, tried: set[str]) -> str | None:
        """The owner, else any node not tried yet (every node can serve)."""
        ring = self.ring
        owner = ring.owner(key)
        if owner is not None and owner not in tried:
            return owner
        return next((p for p in ring.nodes if p not in tried), None)

    def _safe_refresh(self) -> None:
        try:
            self.refresh()
        except Exception:
            pass  # keep the ring we have

    def close(self) -> None:
        with self._lock:
            for channel, *_ in self._stubs.values():
                channel.close()
            self._stubs.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
