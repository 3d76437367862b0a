"""What Client and AsyncClient share beyond routing: their arguments, the
ring and its updates, and dialling a peer (grpc or grpc.aio channels have
one API)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..peering import engine_channel
from ..peering.peer_client import PEER_CHANNEL_OPTIONS
from ..rules.peer_proofs import READ, WRITE, PeerProofs
from ..tls import files_of
from .follow import EtcdMembers, Follower
from .routing import GET_VALUE, METHODS, REMOVE, SET, HotKeys, Method, Pool, Router, checked_str, deadline_of, peer_list

if TYPE_CHECKING:
    import grpc

    from ..config import Settings

log = logging.getLogger("appliance.client")

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024 + 65536


def settings_kwargs(settings: Settings) -> dict:
    """Client keyword arguments that must match the nodes' config: TLS
    credentials (the box's certificate), the message size limit, and the
    box's own token where this user may read it (root, the service user),
    which each call proves to the node it goes to and never sends."""
    from .. import tls
    from ..config import Layout
    from ..tokens import TokenFileError, read_token

    try:
        token = read_token(Layout(settings).token_path())
    except TokenFileError:
        token = None  # not this user's to read: reads still work, writes are refused
    return {
        "credentials": tls.channel_credentials(settings.tls),
        "channel_options": tls.channel_options(settings.tls),
        "max_message_bytes": settings.node.max_value_bytes + 64 * 1024,
        "cluster_token": token,
    }


class ClientBase:
    _grpc: Any  # the module channels come from: grpc or grpc.aio
    _engine_channel: Any  # its engine counterpart (peering/engine_channel.py)

    def __init__(
        self,
        peers: Iterable[str] = (),
        *,
        replicas: int = 50,
        scheme: str = "seed",
        timeout: float = 5.0,
        discover: EtcdMembers | Callable[[], list[str]] | None = None,
        follow: bool = True,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        channel_options: list[tuple[str, object]] | None = None,
        token: str | None = None,
        cluster_token: str | None = None,
        spread_hot: bool = True,
        engine: bool | None = None,
    ) -> None:
        """`peers` is a static list, used as it is. Or `discover` finds the
        peers: an EtcdMembers (what from_settings passes), whose ring is
        followed while the client is open (unless `follow` is False), or
        any callable returning the peer list. Either is read again after a
        call fails. `timeout` (seconds) bounds each call, its retries
        included. `credentials` (appliance.tls.credentials_from_files) dials
        the nodes over TLS; `max_message_bytes` should be the nodes'
        max_value_bytes + 64 KiB (from_settings does that). `token` is a
        bearer token ([auth.credentials]) sent with every call: Set and
        Remove need one with the write scope unless writes are open.
        `cluster_token` is the box's own token (settings_kwargs reads it
        where this user may: root, the service user): each call proves it to
        the node called (a GC-Proof for that address) instead of sending it.
        `spread_hot`: Gets of keys this client reads often go to every node
        in turn (their hot caches serve them), not only to the owner.
        `engine`: make calls on the engine's client (Rust, HTTP/2 in
        hyper), which costs a fraction of grpc's per call. None (default):
        where it is built and can dial as asked (TLS credentials from
        appliance.tls with a CA file); True: raise ValueError if not;
        False: grpc's."""
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise ValueError("token must be a non-empty string")
        if token and cluster_token:
            raise ValueError("give either token or cluster_token, not both")
        self._metadata = (("authorization", f"Bearer {token.strip()}"),) if token else None
        # The box's own token is proven per call, for the address called
        # (node/peer_proofs.py): a listener that is not our worker learns nothing.
        self._proofs = PeerProofs(cluster_token) if cluster_token else None
        deadline_of(timeout)  # checks it
        static = peer_list(peers)
        if discover is not None:
            if not callable(discover):
                raise TypeError(f"discover must be an EtcdMembers or a callable, got {type(discover).__name__}")
            if static:
                raise ValueError("give either peers or discover, not both")
        self.timeout = float(timeout)
        self._router = Router(replicas, scheme, HotKeys() if spread_hot else None)
        self._pool: Pool = Pool(self._dial, linger=self.timeout)
        self._discover = discover
        self._follower = Follower(discover, self._followed) if follow and isinstance(discover, EtcdMembers) else None
        self._credentials = credentials
        self._options = [
            *PEER_CHANNEL_OPTIONS,  # reach a node that restarted at once
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *(channel_options or ()),
        ]
        self._max_message = max_message_bytes
        self._server_name = dict(channel_options or ()).get("grpc.ssl_target_name_override")
        self._tls_files = files_of(credentials)
        self.engine = self._use_engine(engine, credentials)
        self._closed = False
        if discover is None:
            self._install(static)
        self._open()

    def _use_engine(self, wanted: bool | None, credentials) -> bool:
        if wanted is False:
            return False
        missing = engine_channel.usable()
        if missing is None and credentials is not None:
            if self._tls_files is None:
                missing = "the credentials were not made by appliance.tls (their files are unknown)"
            elif self._tls_files.ca is None:
                missing = "the credentials trust the system's roots, which the engine's client does not read"
        if missing is None:
            return True
        if wanted:
            raise ValueError(f"engine=True, but {missing}")
        log.debug("grpc's client: %s", missing)
        return False

    def _metadata_for(self, peer: str, method: Method):
        if self._proofs is None:
            return self._metadata
        scope = WRITE if method in (SET, REMOVE) else READ
        return (("authorization", self._proofs.make(peer, scope)[0]),)

    def _open(self) -> None:
        """The I/O layer's own setup, last in __init__."""
        raise NotImplementedError

    @classmethod
    def from_settings(cls, settings: Settings, *, follow: bool = True, poll_interval: float = 5.0, **kwargs):
        """A client of the cluster `settings` describe: its ring from etcd
        (followed unless `follow` is False; `poll_interval` seconds between
        checks of a quiet watch), its TLS and limits from the config."""
        from ..config import Layout

        defaults = {"replicas": settings.node.replicas, "scheme": settings.node.ring_hash, **settings_kwargs(settings)}
        layout = Layout(settings)
        discover = EtcdMembers(
            settings.cluster, poll_interval=poll_interval, socket=layout.etcd_socket(), tls=layout.etcd_tls()
        )
        return cls(discover=discover, follow=follow, **{**defaults, **kwargs})

    @property
    def ring(self):
        """The HashRing in use now (replaced whole on each change)."""
        return self._router.ring

    def _peers(self) -> list[str]:
        return list(self._router.ring.nodes)

    def _locate(self, key: str) -> str | None:
        return self._router.ring.owner(checked_str("key", key))

    def _deadline(self, timeout: float | None) -> float:
        return deadline_of(self.timeout if timeout is None else timeout)

    # Ring updates ----------------------------------------------------------------

    def _install(self, peers: Iterable[str], revision: int | None = None, *, force: bool = False) -> None:
        departed = self._router.install(peers, revision, force=force)
        if departed is None:
            return
        ring = self._router.ring
        log.info(
            "ring: %d peers%s%s",
            len(ring),
            f" at etcd revision {revision}" if revision is not None else "",
            f"; left: {', '.join(departed)}" if departed else "",
        )
        self._pool.retire(departed)
        expired = self._pool.expired()
        if expired:
            self._discard(expired)

    def _followed(self, peers: list[str], revision: int) -> None:
        self._install(peers, revision, force=True)

    def _read_ring(self) -> tuple[list[str], int | None]:
        """(peers, etcd revision or None) from `discover` (blocking)."""
        if isinstance(self._discover, EtcdMembers):
            return self._discover.read()
        assert self._discover is not None
        return self._discover(), None

    def _discard(self, channels: list) -> None:
        """Close channels of peers that left the ring."""
        raise NotImplementedError

    # Channels --------------------------------------------------------------------

    def _dial(self, peer: str) -> tuple[Any, dict[str, Callable]]:
        if self.engine:
            channel = self._engine_channel(
                peer, max_message=self._max_message, tls=self._tls_files, server_name=self._server_name
            )
        elif self._credentials is not None:
            channel = self._grpc.secure_channel(peer, self._credentials, options=self._options)
        else:
            channel = self._grpc.insecure_channel(peer, options=self._options)
        methods = {
            m.path: channel.unary_unary(
                m.path, request_serializer=m.request.SerializeToString, response_deserializer=m.response.FromString
            )
            for m in METHODS
        }
        if hasattr(channel, "get_value"):  # the engine's blocking channel
            methods[GET_VALUE] = channel.get_value
        return channel, methods
