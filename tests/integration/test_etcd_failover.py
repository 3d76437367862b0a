"""etcd clients that survive the loss of any one member of a real 3-member
cluster: the member a client is talking to is stalled (SIGSTOP: its
connections stay open and nothing answers, the worst case), and

- a worker's registration keeps its lease and key, renewing through the
  other members well within the lease TTL (a slow answer is not a lost
  lease);
- the controller's watch moves on: a change made while the member is
  stalled reaches the nodes.

The same client code runs against the appliance's embedded etcd cluster in
tests/reliability/test_multibox.py (boxes killed and partitioned).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from appliance.cluster import etcd
from appliance.cluster.controller import Controller
from appliance.cluster.registry import Registration, call_timeout
from support.etcd_server import EtcdCluster
from support.faults import against, assert_within
from support.nodes import CountingOrigin, cluster

pytestmark = pytest.mark.integration
TTL = 2


@pytest.fixture
def etcd_cluster(tmp_path):
    c = EtcdCluster(tmp_path / "etcd").start()
    try:
        yield c
    finally:
        c.stop()


def member_of(c: EtcdCluster, client) -> int:
    """Which member (index) the client's calls go to now."""
    port = int(client.endpoint_in_use.netloc.rpartition(":")[2])
    return c.client_ports.index(port)


async def until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not before the deadline"
        await asyncio.sleep(0.02)


def leader_of(c: EtcdCluster) -> int:
    """Which member (index) leads the cluster now."""
    client = c.client()
    try:
        status = etcd.call(client, lambda cl: cl.status())
        urls = {m.id: list(m.client_urls) for m in etcd.call(client, lambda cl: list(cl.members))}
    finally:
        client.close()
    port = int(urls[status.leader.id][0].rpartition(":")[2])
    return c.client_ports.index(port)


def test_a_registration_keeps_its_lease_when_its_member_stalls(etcd_cluster):
    settings = etcd_cluster.settings()
    reg = Registration(
        lambda: etcd.connect(settings.cluster, timeout=call_timeout(TTL)), "groupcache", "127.0.0.1:7001", ttl=TTL
    )
    reg.start()
    observer = etcd_cluster.client()
    try:
        assert reg.registered.wait(10)
        lease = reg._lease.id
        stalled = member_of(etcd_cluster, reg._client)
        etcd_cluster.signal(stalled, signal.SIGSTOP)
        try:
            # Four lease TTLs: without failover the lease would expire in one.
            end = time.monotonic() + 4 * TTL
            while time.monotonic() < end:
                value, meta = etcd.call(observer, lambda c: c.get("groupcache/127.0.0.1:7001"))
                assert value is not None, "the registration vanished while one member was stalled"
                assert meta.lease_id == lease
                time.sleep(0.2)
            assert reg.registrations == 1  # never registered again
            assert member_of(etcd_cluster, reg._client) != stalled
        finally:
            etcd_cluster.signal(stalled, signal.SIGCONT)
        print(f"\n[etcd failover] registration kept lease {lease:x} through {4 * TTL}s of its member stalled")
    finally:
        reg.deregister()
        observer.close()


def test_a_registration_keeps_its_lease_through_an_election_longer_than_the_lease(etcd_cluster):
    """The leader's member and a follower stall: no member answers for 3 s,
    longer than the 2 s lease, yet etcd cannot expire it (no leader); the
    follower returns, the two elect a leader, which extends every lease. The
    registration keeps its own. It used to give the lease up after 2 s
    without an answer and register anew: under a new lease, a ring change
    at every peer (and a flaky test whenever an election outlasted a lease)."""
    settings = etcd_cluster.settings()
    reg = Registration(
        lambda: etcd.connect(settings.cluster, timeout=call_timeout(TTL)), "groupcache", "127.0.0.1:7001", ttl=TTL
    )
    reg.start()
    observer = etcd_cluster.client()
    leader = leader_of(etcd_cluster)
    follower = next(i for i in range(len(etcd_cluster.client_ports)) if i != leader)
    try:
        assert reg.registered.wait(10)
        lease = reg._lease.id
        etcd_cluster.signal(leader, signal.SIGSTOP)
        etcd_cluster.signal(follower, signal.SIGSTOP)
        try:
            silent_until = time.monotonic() + 1.5 * TTL  # no quorum: nobody answers, nothing expires
            while time.monotonic() < silent_until:
                time.sleep(0.1)
            etcd_cluster.signal(follower, signal.SIGCONT)  # quorum again, under a new leader
            deadline = time.monotonic() + 30
            while True:
                try:
                    value, meta = etcd.call(observer, lambda c: c.get("groupcache/127.0.0.1:7001"))
                    break
                except etcd.UNREACHABLE:
                    assert time.monotonic() < deadline, "etcd never answered again"
                    time.sleep(0.1)
            # Kept alive from now on: unrenewed, the lease would end within this.
            end = time.monotonic() + 3 * TTL
            while time.monotonic() < end:
                value, meta = etcd.call(observer, lambda c: c.get("groupcache/127.0.0.1:7001"))
                assert value is not None and meta.lease_id == lease, (value, meta and meta.lease_id, lease)
                time.sleep(0.2)
            assert reg.registrations == 1  # never registered again
        finally:
            etcd_cluster.signal(follower, signal.SIGCONT)
            etcd_cluster.signal(leader, signal.SIGCONT)
        print(f"\n[etcd failover] registration kept lease {lease:x} through {1.5 * TTL:g}s without quorum")
    finally:
        reg.deregister()
        observer.close()


async def test_the_controller_moves_off_a_stalled_member(etcd_cluster, tmp_path):
    settings = etcd_cluster.settings()
    async with cluster(2, CountingOrigin(), admin_dir=tmp_path) as nodes:
        sockets = [str(tmp_path / f"n{i}.sock") for i in range(2)]
        ctl = Controller(
            lambda: etcd.connect(settings.cluster, timeout=1.0), "groupcache", lambda: sockets, push_interval=0.5
        )
        thread = threading.Thread(target=ctl.run, daemon=True)
        thread.start()
        admin = etcd_cluster.client()
        try:
            lease = etcd.call(admin, lambda c: c.lease(60))
            etcd.call(admin, lambda c: c.put(etcd.member_key("groupcache", nodes[0].addr), nodes[0].addr, lease=lease))
            await until(lambda: all(list(n.peers.ring.nodes) == [nodes[0].addr] for n in nodes), 10)
            # Stall the member the controller's watch runs on, then change the ring.
            stalled = next(i for i, p in enumerate(etcd_cluster.client_ports) if _controller_port(ctl) == p)
            writer = etcd_cluster.client(without=stalled)  # the test's own write must not wait on it
            etcd_cluster.signal(stalled, signal.SIGSTOP)
            try:
                started = time.monotonic()
                etcd.call(
                    writer, lambda c: c.put(etcd.member_key("groupcache", nodes[1].addr), nodes[1].addr, lease=lease)
                )
                want = sorted(n.addr for n in nodes)
                await until(lambda: all(sorted(n.peers.ring.nodes) == want for n in nodes), 10)
                moved_s = time.monotonic() - started
            finally:
                etcd_cluster.signal(stalled, signal.SIGCONT)
                writer.close()
            print(f"\n[etcd failover] controller change after its member stalled (s): {against(moved_s, 2 * TTL)}")
            assert_within(moved_s, 2 * TTL, "controller change after its member stalled")
        finally:
            ctl.stop_event.set()
            await asyncio.to_thread(thread.join, 10)
            admin.close()


def _controller_port(ctl: Controller) -> int:
    client = ctl.etcd_client
    return int(client.endpoint_in_use.netloc.rpartition(":")[2])
