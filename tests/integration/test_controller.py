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


TOKEN = "controller-test-cluster-token-0123456789"


async def answering_without_proof():
    """A gRPC server whose Health/Check answers SERVING, with no proof: what
    any server an etcd writer points a key at can do. (server, address)"""
    import grpc
    from grpc_health.v1 import health_pb2

    async def check(request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_a_member_joins_the_ring_only_once_its_address_proves_it_is_a_worker_of_this_cluster(
    tmp_path, etcd_server
):
    """Whoever can write to etcd adds keys; only workers that prove the cluster
    token join the ring (cluster/vetting.py). A fake key's address (a server
    that answers without a proof, or nothing at all) stays out; a real worker
    whose key came before it listened joins once it does, in a later
    generation of the same etcd revision."""
    from appliance.cluster.vetting import HealthProver
    from appliance.node.serving import Node
    from support.nodes import settings
    from support.ports import free_port

    async with cluster(2, CountingOrigin(), admin_dir=tmp_path, token=TOKEN) as nodes:
        sockets = [str(tmp_path / f"n{i}.sock") for i in range(2)]
        impostor, impostor_addr = await answering_without_proof()
        silent_addr = f"127.0.0.1:{free_port()}"  # nothing listens there
        late_port = free_port()
        late_addr = f"127.0.0.1:{late_port}"
        ctl = Controller(
            etcd_server.client, "groupcache", lambda: sockets, push_interval=0.2, prover=HealthProver(TOKEN, None)
        )
        thread = threading.Thread(target=ctl.run, daemon=True)
        thread.start()
        admin = etcd_server.client()
        late = None
        try:
            lease = admin.lease(30)
            for addr in [n.addr for n in nodes] + [impostor_addr, silent_addr, late_addr]:
                admin.put(etcd.member_key("groupcache", addr), etcd.member_value(addr), lease=lease)
            real = sorted(n.addr for n in nodes)
            await until(lambda: all(sorted(n.peers.ring.nodes) == real for n in nodes), 5)
            await until(lambda: set(ctl.unproven()) == {impostor_addr, silent_addr, late_addr}, 10)
            assert all(sorted(n.peers.ring.nodes) == real for n in nodes)
            revision = nodes[0].peers.revision
            # The late worker starts listening: asked again, it proves itself.
            late = Node(settings(("g",)), {"g": CountingOrigin()}, port=late_port, token=TOKEN)
            await late.start()
            want = sorted([*real, late_addr])
            await until(lambda: all(sorted(n.peers.ring.nodes) == want for n in nodes), 15)
            assert all(n.peers.version > (revision, 0) and n.peers.revision == revision for n in nodes)
            assert set(ctl.unproven()) == {impostor_addr, silent_addr}
        finally:
            ctl.stop_event.set()
            await asyncio.to_thread(thread.join, 10)
            admin.close()
            await impostor.stop(0)
            if late is not None:
                await late.stop(0)


async def test_a_restarted_controller_keeps_the_workers_ring_and_outranks_its_predecessor(tmp_path, etcd_server):
    """A controller that (re)starts knows no member yet: it must not push an
    empty ring before its probes answer (workers would drop every peer), and
    its decisions must win over the last one's within one etcd revision."""
    from appliance.cluster.vetting import HealthProver

    async with cluster(2, CountingOrigin(), admin_dir=tmp_path, token=TOKEN) as nodes:
        sockets = [str(tmp_path / f"n{i}.sock") for i in range(2)]
        installed: list[tuple[tuple[int, int], tuple[str, ...]]] = []
        for n in nodes:
            original = n.peers.set_peers

            def recording(peers, revision, leases=None, generation=0, original=original):
                applied = original(peers, revision, leases, generation)
                if applied:
                    installed.append(((revision, generation), tuple(sorted(peers))))
                return applied

            n.peers.set_peers = recording
        admin = etcd_server.client()
        lease = admin.lease(30)
        for n in nodes:
            admin.put(etcd.member_key("groupcache", n.addr), etcd.member_value(n.addr), lease=lease)
        real = tuple(sorted(n.addr for n in nodes))
        versions = []
        try:
            for _ in range(2):  # a controller, then its successor
                ctl = Controller(
                    etcd_server.client,
                    "groupcache",
                    lambda: sockets,
                    push_interval=0.2,
                    prover=HealthProver(TOKEN, None),
                )
                thread = threading.Thread(target=ctl.run, daemon=True)
                thread.start()
                try:
                    await until(lambda ctl=ctl: ctl.ring_revision and ctl.peers == list(real), 10)
                    version = (ctl.ring_revision, ctl.generation)
                    await until(lambda v=version: all(n.peers.version >= v for n in nodes), 10)
                    versions.append(version)
                finally:
                    ctl.stop_event.set()
                    await asyncio.to_thread(thread.join, 10)
        finally:
            admin.close()
        assert versions[1] > versions[0], versions  # the successor's ring outranks
        assert installed and all(peers == real for _, peers in installed), installed  # never an empty or partial ring
