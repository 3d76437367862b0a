"""The members of an embedded etcd cluster (one per box): how a box's member
starts, and adding or replacing a box.

Boxes may start in any order. A box whose member has no data yet asks the
other members whether a cluster is already running: if none answers, it
bootstraps with the rest ("new"); if one does and lists this box as added
but not started, it joins it ("existing"). A box it does not list, or lists
as already started (its data was lost), must be added first:
`appliance etcd add-member HOST` on a box of the cluster (after
`remove-member HOST` for a replacement).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import addr as addrs
from ..config import Layout
from . import etcd

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)


class MembershipError(Exception):
    """A member cannot start, or cannot be added or removed; the message
    says what to do."""


def _client(settings: Settings, endpoints: list[str] | None = None, timeout: float = 2.0) -> Any:
    cluster = settings.cluster
    if endpoints is not None:
        cluster = cluster.model_copy(update={"etcd": endpoints})
    return etcd.connect(cluster, tls=Layout(settings).etcd_tls(), timeout=timeout)


def members(settings: Settings, endpoints: list[str] | None = None, timeout: float = 2.0) -> list[Any]:
    """The cluster's members (id, name, peer_urls, client_urls), read through
    any endpoint that answers; raises when none does."""
    client = _client(settings, endpoints, timeout)
    try:
        return etcd.call(client, lambda c: list(c.members))
    finally:
        client.close()


def join_state(settings: Settings) -> str:
    """--initial-cluster-state for this box's member: "new" or "existing"."""
    layout = Layout(settings)
    data = layout.state_path() / "etcd" / "member"
    if data.exists():
        return "new"  # etcd reads its membership from its data; the flag is ignored
    host = settings.node.host
    mine = layout.etcd_peer_url(host)
    others = [e for e in settings.cluster.etcd if addrs.split(e)[0] != host]
    try:
        found = members(settings, others, timeout=1.5)
    except Exception:
        log.info("no member of the etcd cluster answers: bootstrapping with %s", ", ".join(settings.cluster.etcd))
        return "new"
    for m in found:
        if mine in list(m.peer_urls):
            if m.name:
                raise MembershipError(
                    f"this box's etcd member ({m.name}, {mine}) has run before, but {data.parent} is empty "
                    f"(its data is lost): on a running box, `appliance etcd remove-member {host}` and then "
                    f"`appliance etcd add-member {host}`; then start this box again"
                )
            log.info("joining the running etcd cluster as %s", mine)
            return "existing"
    raise MembershipError(
        f"the etcd cluster ({', '.join(others)}) runs without this box ({mine}): on a running box, "
        f"`appliance etcd add-member {host}` first (and list this box's endpoint in cluster.etcd on every box)"
    )


def add_member(settings: Settings, host: str, wait: float = 15.0) -> Any:
    """Add the member of the box `host` (not started yet) to the cluster,
    waiting up to `wait` seconds for the cluster to accept a member."""
    url = Layout(settings).etcd_peer_url(host)
    if any(url in list(m.peer_urls) for m in members(settings)):
        raise MembershipError(f"{url} is already a member")
    # Its own endpoint cannot answer yet (it is added before it starts).
    others = [e for e in settings.cluster.etcd if addrs.split(e)[0] != host] or None
    client = _client(settings, others)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                return etcd.call(client, lambda c: c.add_member([url]))
            except etcd.UNREACHABLE as exc:
                # etcd refuses new members until every member has been
                # connected for 5 s (strict reconfig check): wait that out.
                if "unhealthy cluster" not in etcd.describe(exc) or time.monotonic() > deadline:
                    raise
                etcd.revive(client)
                time.sleep(0.5)
    finally:
        client.close()


def remove_member(settings: Settings, host: str) -> Any:
    """Remove the member of the box `host` (by its peer URL or name)."""
    url = Layout(settings).etcd_peer_url(host)
    found = [m for m in members(settings) if url in list(m.peer_urls) or m.name == Layout.etcd_member_name(host)]
    if not found:
        raise MembershipError(f"no member has the peer URL {url}")
    client = _client(settings)
    try:
        etcd.call(client, lambda c: c.remove_member(found[0].id))
    finally:
        client.close()
    return found[0]


def health(settings: Settings, member: Any) -> str:
    """ "healthy (leader)", "healthy" or why not, asked of the member itself."""
    urls = [u for u in member.client_urls]
    if not urls:
        return "not started"
    endpoint = urls[0].split("://", 1)[-1]
    client = _client(settings, [endpoint], timeout=1.5)
    try:
        status = client.status()
        return "healthy (leader)" if status.leader.id == member.id else "healthy"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    finally:
        client.close()
