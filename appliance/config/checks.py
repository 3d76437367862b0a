"""The checks across the settings' tables: what rejects a config that each table alone accepts.

``cross_checks`` is the last validator of ``Settings``: group names within
node.max_group_bytes, an embedded etcd cluster's endpoints against
node.host, no port used twice (workers, the embedded etcd, the HTTP API,
metrics), a host the seed's Go nodes accept with seed_interop, [tls] for a
node reachable from other machines, mTLS for a tls_identity. The ports are
the layout's, so it computes the ``Layout`` of the settings it checks.

``secret_problems`` checks the token files, which loading does not read
(so that users without access to them can still load the config);
`config check` and `appliance run` do.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from ..addr import is_loopback as _is_loopback
from ..addr import split as split_hostport
from ..tokens import TokenFileError, read_token
from .layout import Layout, port_span
from .problems import FieldError

if TYPE_CHECKING:
    from .schema import Settings

__all__ = ["cross_checks", "secret_problems", "seed_accepts"]


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _may_share_ports(a: str, b: str) -> bool:
    """Whether sockets bound on hosts a and b would compete for the same ports."""
    if a.lower() == b.lower() or _is_wildcard(a) or _is_wildcard(b):
        return True
    return _is_loopback(a) and _is_loopback(b)


def seed_accepts(host: str) -> bool:
    """Whether the seed's Go nodes accept host:port as a node address: its
    utils.ValidPerrAddr wants "localhost" or a first label of 4 characters."""
    first = host.split(".", 1)[0]
    return ":" not in host and (first == "localhost" or len(first) == 4)


def cross_checks(settings: Settings) -> None:
    """Raise ``FieldError`` (at the key to change) for the first problem."""
    layout = Layout(settings)
    node, c = settings.node, settings.cluster
    limit = node.max_group_bytes
    for name in settings.groups:
        n = len(name.encode())
        if n > limit:
            raise FieldError(
                ("groups", name),
                f"expected a group name of at most node.max_group_bytes = {limit} bytes, got {n} bytes",
            )
    ports = node.ports
    if c.embedded_etcd and len(c.etcd) > 1:
        hosts = [h for h, _ in c.endpoints()]
        if len(set(hosts)) != len(hosts):
            raise FieldError(
                ("cluster", "etcd"), "expected one endpoint per box (hosts differ) for an embedded etcd cluster"
            )
        if node.host not in hosts:
            raise FieldError(
                ("node", "host"),
                f"with several cluster.etcd endpoints and embedded_etcd, each box runs the member whose "
                f"endpoint host is its node.host; node.host {node.host!r} is none of "
                f"{', '.join(c.etcd)}",
            )
    if c.embedded_etcd:
        member = layout.etcd_member_endpoint()
        ehost, eport = split_hostport(member)
        if eport in ports and _may_share_ports(ehost, node.host):
            raise FieldError(
                ("node", "base_port"),
                f"worker ports {ports[0]}-{ports[-1]} clash with the embedded etcd's client port {eport} "
                f"({member}); move base_port or the etcd endpoint",
            )
        peer = layout.etcd_peer_port()  # 2380 for a cluster unless set
        if peer:
            where = "etcd_peer_port" if c.etcd_peer_port else "the etcd cluster's peer port (etcd_peer_port = 0)"
            if peer in ports and _may_share_ports(ehost, node.host):
                raise FieldError(
                    ("cluster", "etcd_peer_port"),
                    f"{where} {peer} clashes with the worker ports {ports[0]}-{ports[-1]}; "
                    "pick another port" + ("" if layout.etcd_clustered() else ", or 0 for a free one"),
                )
            if peer == eport:
                raise FieldError(
                    ("cluster", "etcd_peer_port"),
                    f"{where} {peer} is the etcd client port ({member}); "
                    "pick another port" + ("" if layout.etcd_clustered() else ", or 0 for a free one"),
                )
    if c.seed_interop and not seed_accepts(node.host):
        raise FieldError(
            ("node", "host"),
            f"cluster.seed_interop needs a host the seed's Go nodes accept (utils.ValidPerrAddr): "
            f'"localhost" or a name whose first label has 4 characters, like "box1"; got {node.host!r}',
        )
    if not settings.tls.enabled and not c.plaintext_peers and not _is_loopback(node.host):
        raise FieldError(
            ("node", "host"),
            f"node.host {node.host!r} is reachable from other machines and [tls] is off: peers would send "
            "the cluster token (with every call) and every value in clear; set [tls] cert, key and ca, or, on "
            "a network you trust, [cluster] plaintext_peers = true",
        )
    for name, cred in settings.auth.credentials.items():
        if cred.tls_identity is not None and not settings.tls.client_auth:
            raise FieldError(
                ("auth", "credentials", name, "tls_identity"),
                "a tls_identity is checked only with mTLS: set [tls] client_auth = true (and tls.ca)",
            )
    _ops_port_checks(settings, layout)


def _ops_port_checks(settings: Settings, layout: Layout) -> None:
    """The HTTP API and metrics ports against each other, the workers and etcd."""
    n, o, c = settings.node, settings.ops, settings.cluster
    http = layout.http_ports()
    if http is not None and http[-1] > 65535:
        raise FieldError(
            ("ops", "http_base_port"),
            f"expected HTTP ports within 1..65535, but {n.workers} workers from http_base_port "
            f"{o.http_base_port} need ports up to {http[-1]}; lower http_base_port",
        )
    # (key, description, host, ports), checked pairwise.
    used: list[tuple[tuple[str, ...], str, str, range]] = [
        (("node", "base_port"), f"worker ports {port_span(n.ports)}", n.host, n.ports)
    ]
    if c.embedded_etcd:
        ehost, eport = split_hostport(layout.etcd_member_endpoint())
        used.append((("cluster", "etcd"), f"the embedded etcd's client port {eport}", ehost, range(eport, eport + 1)))
        if c.etcd_peer_port:
            p = c.etcd_peer_port
            used.append((("cluster", "etcd_peer_port"), f"etcd_peer_port {p}", ehost, range(p, p + 1)))
    if http is not None:
        used.append((("ops", "http_base_port"), f"HTTP ports {port_span(http)}", n.host, http))
    metrics = o.metrics_endpoint()
    if metrics is not None:
        mhost, mport = metrics
        used.append((("ops", "metrics_addr"), f"the metrics port {mport}", mhost, range(mport, mport + 1)))
    for i, (_, what_a, host_a, ports_a) in enumerate(used):
        for key, what_b, host_b, ports_b in used[i + 1 :]:
            if key[0] != "ops":
                continue  # worker/etcd clashes are reported above
            if set(ports_a) & set(ports_b) and _may_share_ports(host_a, host_b):
                verb = "clash" if what_b.startswith("HTTP ports") else "clashes"
                raise FieldError(key, f"{what_b} {verb} with {what_a}; pick ports that do not overlap")


def secret_problems(settings: Settings) -> list[str]:
    """What is wrong with the token files, one line each (checked by
    `config check` and `appliance run`, which read them; loading the
    config does not, so users without access to them can still load it)."""
    auth = settings.auth
    out = []
    files = [(f"auth.credentials.{n}.token_file", c.token_file) for n, c in auth.credentials.items()]
    if auth.token_file is not None:
        files.append(("auth.token_file", auth.token_file))
    for key, path in files:
        if path is None:
            continue
        try:
            read_token(path)
        except TokenFileError as exc:
            out.append(f"{key}: {exc}")
    return out
