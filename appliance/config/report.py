"""The config's report: what `appliance config check` prints and `appliance run` logs of valid settings.

- ``summary``: one line, from the workers to which engine serves
  (``server_choice``, from ``backend.choose``);
- ``notes``: what the settings do not show by themselves: the
  ``warnings``, open writes, what a mixed cluster with the seed needs, the
  ring's shares;
- ``warnings``: ``etcd_warning`` (an etcd others can write, and what that
  exposes) and ``token_warning`` (a box-made token where several boxes
  share etcd), which `run` also logs at start.

Functions of a ``Settings``; they describe its ``Layout`` and decide nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..addr import join as join_hostport
from ..cache.ring import HashRing, balance_warning
from ..units import format_bytes, format_duration
from .backend import choose
from .layout import Layout, port_span

if TYPE_CHECKING:
    from .schema import Settings

__all__ = ["etcd_warning", "notes", "server_choice", "summary", "token_warning", "warnings"]

# What an etcd others can write gives them (appended to etcd_warning).
ETCD_EXPOSES = (
    "; a member key whose address does not prove the cluster token stays out of the ring "
    "(groupcache_controller_unproven_members) and never receives the token, but such a client can delete "
    "workers' keys (taking them out of the ring), and Clients that follow etcd dial any address a key names"
)
SEED_ETCD_EXPOSES = (
    "; with seed_interop a member joins unproven (the seed's Go nodes cannot prove the cluster token), so a "
    "fake member owns a share of the keys and may answer forwards with values of its choosing; it never "
    "receives the token"
)


def summary(settings: Settings) -> str:
    """One line for humans (the first of ``check_file``'s)."""
    n = settings.node
    workers = f"{n.workers} worker{'s' if n.workers != 1 else ''} on {join_hostport(n.host, port_span(n.ports))}"
    return (
        f"{workers}, {_etcd(settings)}, groups: {_groups(settings)}{_ops(settings)}; server: {server_choice(settings)}"
    )


def _etcd(settings: Settings) -> str:
    layout, c = Layout(settings), settings.cluster
    if layout.private_etcd():
        return "etcd embedded, private (a unix socket in the runtime directory)"
    if layout.etcd_clustered():
        return (
            f"etcd cluster of {len(c.etcd)} embedded members ({', '.join(c.etcd)}; "
            f"this box's: {layout.etcd_member_endpoint()}, peer port {layout.etcd_peer_port()}"
            + (", TLS" if layout.etcd_tls() else "")
            + ")"
        )
    return f"etcd {', '.join(c.etcd)}" + (" (embedded)" if c.embedded_etcd else "")


def _groups(settings: Settings) -> str:
    if not settings.groups:
        return "none"
    parts = []
    for name, g in settings.groups.items():
        extra = f", ttl {format_duration(g.ttl)}" if g.ttl else ""
        parts.append(f"{name} ({format_bytes(g.cache_bytes)} {g.policy}{extra}, {g.kind} origin)")
    return ", ".join(parts)


def _ops(settings: Settings) -> str:
    """The ops, TLS and auth part of the summary, with its leading "; "."""
    ops, tls, a = settings.ops, settings.tls, settings.auth
    out = []
    if ops.metrics_addr:
        out.append(f"metrics on {ops.metrics_addr}")
    http = Layout(settings).http_ports()
    if http is not None:
        out.append(f"HTTP API on {join_hostport(settings.node.host, port_span(http))}")
    if tls.enabled:
        out.append("mTLS" if tls.client_auth else "TLS")
    if ops.rate_limit:
        out.append(f"rate limit {ops.rate_limit:g}/s (burst {ops.burst()}) per client")
    creds = ", ".join(f"{name} [{', '.join(c.scopes)}]" for name, c in a.credentials.items())
    out.append(f"writes {a.writes}, reads {a.reads}" + (f" (credentials: {creds})" if creds else ""))
    return "; " + ", ".join(out)


def server_choice(settings: Settings) -> str:
    """Which server backend the workers will run, and why."""
    try:
        backend, why = choose(settings)
    except (RuntimeError, ValueError) as exc:
        return f"none ({exc})"
    return f"{backend} ({why})"


def notes(settings: Settings) -> list[str]:
    """Lines for `appliance config check` beyond the summary: what the
    settings do not show by themselves."""
    out = warnings(settings)
    if settings.auth.writes == "open":
        out.append("writes are open: any client that reaches a data port can Set and Remove values")
    if settings.cluster.seed_interop or (settings.node.host == "localhost"):
        out.append(
            "mixed cluster with the seed's Go nodes: every member named localhost:P or with a 4-character "
            'first label, ring_hash = "seed" and replicas = 50 on both sides, etcd without auth or TLS, '
            "cluster.seed_interop = true, and Go nodes restarted after each membership change "
            "(they read clusters/ once, at start)"
            + ("" if settings.cluster.seed_interop else "; seed_interop is off here")
        )
    ns = settings.node
    shares = HashRing(ns.addresses(), ns.replicas, ns.ring_hash).shares()
    out.append("ring shares: " + ", ".join(f"{a} {v:.1%}" for a, v in shares.items()))
    balance = balance_warning(shares, ns.replicas)
    if balance:
        out.append(balance)
    return out


def warnings(settings: Settings) -> list[str]:
    """The etcd and token warnings that apply (logged at start, printed by `config check`)."""
    return [w for w in (etcd_warning(settings), token_warning(settings)) if w]


def token_warning(settings: Settings) -> str | None:
    """What a box-made cluster token means when there are several boxes."""
    if settings.auth.token_file is not None:
        return None
    if Layout(settings).etcd_clustered():
        return (
            "each box makes its own cluster token: set [auth] token_file to the same 0600 file on every box, "
            "or the boxes keep each other's workers out of the ring (they cannot prove the token to each other)"
        )
    if not settings.cluster.embedded_etcd:
        return "if several boxes share this etcd, set [auth] token_file to the same 0600 file on every box"
    return None


def etcd_warning(settings: Settings) -> str | None:
    """What an etcd anyone can write means, if this one is such: the line
    says what it exposes."""
    warning = _open_etcd(settings)
    if not warning:
        return None
    return f"{warning}{SEED_ETCD_EXPOSES if settings.cluster.seed_interop else ETCD_EXPOSES}"


def _open_etcd(settings: Settings) -> str | None:
    layout, c, tls = Layout(settings), settings.cluster, settings.tls
    if layout.private_etcd():
        return None
    if layout.etcd_clustered():
        if c.etcd_user is not None or (tls.enabled and tls.ca and tls.client_auth):
            return None
        if tls.enabled:
            return (
                "the embedded etcd cluster takes clients without a certificate (tls.client_auth is off): "
                "any etcd client that reaches it can write the ring's member keys"
            )
        return (
            "the embedded etcd cluster serves TCP without TLS or auth: any etcd client can write the ring's member keys"
        )
    if c.embedded_etcd:
        where = (
            "the embedded etcd listens on TCP (for the seed's Go nodes)"
            if c.seed_interop
            else ("the embedded etcd listens on TCP (etcd_private = false) without auth")
        )
        if c.etcd_user is None and c.etcd_cert is None:
            return f"{where}: any etcd client can write the ring's member keys"
        return None
    if c.etcd_user is None and c.etcd_cert is None:
        return "the external etcd is used without TLS or auth: any etcd client can write the ring's member keys"
    return None
