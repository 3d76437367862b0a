"""The layout the settings imply: this box's ports, endpoints and paths.

``Layout(settings)`` computes, without creating anything:

- ports: the HTTP API's (``http_ports``; the workers' are ``node.ports``);
- paths: the state and runtime directories (the configured ones, else the
  defaults of ``dirs``), the token file, the workers' admin sockets, a
  group's origin with ``{state_dir}`` expanded;
- the embedded etcd: clustered (one member a box) or private (unix sockets
  only), this box's member endpoint, the peer port and URLs, the member
  names, its socket, and the TLS files for reaching etcd.

It reads the settings at each call and keeps nothing: build one where it is
needed (``appliance run`` replaces its Settings on SIGHUP). ``resolve_dirs``
writes the two directories into a copy of the settings. The schema's
cross-checks use the layout (port clashes); the report describes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..addr import join as join_hostport
from ..addr import split as split_hostport
from ..origins import grammar
from . import dirs

if TYPE_CHECKING:
    from .schema import GroupSettings, Settings

__all__ = ["Layout", "port_span", "resolve_dirs"]


@dataclass(frozen=True)
class Layout:
    """Where this box's parts are, as ``settings`` place them."""

    settings: Settings

    # ---- ports ----------------------------------------------------------

    def http_ports(self) -> range | None:
        """Worker i serves the HTTP read API on ``http_ports()[i]``; None when off."""
        base = self.settings.ops.http_base_port
        return range(base, base + self.settings.node.workers) if base else None

    # ---- paths ----------------------------------------------------------

    def state_path(self) -> Path:
        """node.state_dir, or the default (see ``dirs.default_state_dir``)."""
        return self.settings.node.state_dir or dirs.default_state_dir()

    def runtime_path(self) -> Path:
        """node.runtime_dir, or the default (see ``dirs.default_runtime_dir``)."""
        return self.settings.node.runtime_dir or dirs.default_runtime_dir()

    def token_path(self) -> Path:
        """auth.token_file, or the one `appliance run` makes in the state dir."""
        return self.settings.auth.token_file or self.state_path() / dirs.TOKEN_FILE

    def admin_socket(self, index: int) -> Path:
        """Unix socket of worker ``index``'s admin service."""
        return self.runtime_path() / dirs.admin_socket_name(index)

    def admin_sockets(self) -> list[str]:
        """The admin sockets present in the runtime dir now (workers that run, or ran)."""
        return sorted(str(p) for p in self.runtime_path().glob(dirs.admin_socket_glob()))

    def expand_origin(self, group: str | GroupSettings) -> str:
        """The group's origin with ``{state_dir}`` replaced by the state
        directory (what ``build_origin`` loads from); ``{key}`` is left for
        each load."""
        g = self.settings.groups[group] if isinstance(group, str) else group
        return grammar.expand(g.origin, self.state_path())

    # ---- the embedded etcd ----------------------------------------------

    def etcd_clustered(self) -> bool:
        """Whether this box runs one member of a cluster of embedded etcds
        (several endpoints, one per box)."""
        c = self.settings.cluster
        return c.embedded_etcd and len(c.etcd) > 1

    def private_etcd(self) -> bool:
        """Whether the embedded etcd serves this box alone: then it listens on
        unix sockets in the runtime directory (0700) and on no TCP port, so
        no other local user can join the ring. The seed's Go nodes need TCP."""
        c = self.settings.cluster
        return c.embedded_etcd and c.etcd_private and len(c.etcd) == 1 and not c.seed_interop

    def etcd_member_endpoint(self) -> str:
        """The client endpoint this box's embedded etcd serves: the one whose
        host is node.host in a cluster, else etcd[0]."""
        c = self.settings.cluster
        if self.etcd_clustered():
            return next(e for e in c.etcd if split_hostport(e)[0] == self.settings.node.host)
        return c.etcd[0]

    def etcd_peer_port(self) -> int:
        """The members' peer port: etcd_peer_port, or 2380 for a cluster (0
        for one box: a free port at each start)."""
        return self.settings.cluster.etcd_peer_port or (2380 if self.etcd_clustered() else 0)

    @staticmethod
    def etcd_member_name(host: str) -> str:
        """The etcd member name of the box whose node.host is `host`."""
        return f"appliance-{host}"

    def etcd_peer_url(self, host: str) -> str:
        """The peer URL of the member on `host` (https when the cluster uses TLS)."""
        scheme = "https" if self.etcd_clustered() and self.settings.tls.enabled else "http"
        return f"{scheme}://{join_hostport(host, self.etcd_peer_port())}"

    def etcd_socket(self) -> Path | None:
        """The embedded etcd's client socket when it is private, else None."""
        return self.runtime_path() / dirs.ETCD_DIR / dirs.ETCD_CLIENT_SOCKET if self.private_etcd() else None

    def etcd_tls(self) -> tuple[Path | None, Path | None, Path | None] | None:
        """(ca, cert, key) to talk to etcd over TLS, or None: the cluster's
        own etcd_ca/etcd_cert/etcd_key, else, for an embedded cluster with
        [tls], the box's [tls] files (its members serve TLS with them)."""
        c, tls = self.settings.cluster, self.settings.tls
        if c.etcd_ca or c.etcd_cert:
            return c.etcd_ca, c.etcd_cert, c.etcd_key
        if self.etcd_clustered() and tls.enabled:
            return tls.ca, tls.cert, tls.key
        return None


def port_span(ports: range) -> str:
    """``"9999"`` for one port, ``"9999-10001"`` for several."""
    return f"{ports[0]}" if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


def resolve_dirs(settings: Settings) -> Settings:
    """A copy with node.state_dir and node.runtime_dir filled in. Creates nothing."""
    layout = Layout(settings)
    node = settings.node.model_copy(update={"state_dir": layout.state_path(), "runtime_dir": layout.runtime_path()})
    return settings.model_copy(update={"node": node})
