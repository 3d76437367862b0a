"""The controller against a real etcd and in-process nodes' admin sockets."""

import asyncio
import threading

import pytest

from appliance.cluster import etcd
from appliance.cluster.controller import Controller
from support.nodes import CountingOrigin, cluster

pytestmark = pytest.mark.integration


async def until(predicate, timeout):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("not converged before the deadline")
        await asyncio.sleep(0.02)


async def test_controller_pushes_membership_and_survives_etcd_restart(tmp_path, etcd_server):
    async with cluster(3, CountingOrigin(), admin_dir=tmp_path) as nodes:
        sockets = [str(tmp_path / f"n{i}.sock") for i in range(3)]
        # A long interval: only the watch itself can tell the controller
        # that etcd restarted (its periodic probe would not run in time).
        ctl = Controller(etcd_server.client, "groupcache", lambda: sockets, push_interval=30)
        thread = threading.Thread(target=ctl.run, daemon=True)
        thread.start()
        admin = etcd_server.client()
        try:
            lease = admin.lease(30)
            for n in nodes[:2]:
                admin.put(etcd.member_key("groupcache", n.addr), etcd.member_value(n.addr), lease=lease)
            want = sorted(n.addr for n in nodes[:2])
            await until(lambda: all(sorted(n.peers.ring.nodes) == want for n in nodes), 5)
            revision = nodes[0].peers.revision
            assert all(n.peers.revision == revision for n in nodes)
            # A bare host:port value (the seed's layout) is accepted too.
            admin.put(etcd.member_key("groupcache", nodes[2].addr), nodes[2].addr, lease=lease)
            await until(lambda: all(len(n.peers.ring) == 3 for n in nodes), 5)
            assert ctl.etcd_ok
            # Each node learns every peer's lease; a re-registration under a
            # new lease (a restarted process) reaches them as such.
            assert all(n.peers.lease(nodes[2].addr) == lease.id for n in nodes[:2])
            other = admin.lease(30)
            admin.put(etcd.member_key("groupcache", nodes[2].addr), nodes[2].addr, lease=other)
            await until(lambda: all(n.peers.lease(nodes[2].addr) == other.id for n in nodes[:2]), 5)

            # etcd restarts (same data): the old watch stream dies. A change
            # made afterwards must still reach every node.
            etcd_server.kill()
            admin.close()
            await until(lambda: not ctl.etcd_ok, 10)  # the box's groupcache_controller_etcd_up 0
            etcd_server.start()
            admin = etcd_server.client()
            admin.delete(etcd.member_key("groupcache", nodes[1].addr))
            want = sorted([nodes[0].addr, nodes[2].addr])
            await until(lambda: all(sorted(n.peers.ring.nodes) == want for n in nodes), 5)
            assert ctl.etcd_ok
            # Revisions only move forward.
            assert all(n.peers.revision > revision for n in nodes)
        finally:
            ctl.stop_event.set()
            await asyncio.to_thread(thread.join, 10)
            admin.close()
