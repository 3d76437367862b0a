"""`[cluster] seed_interop`: each worker also keeps the seed's
peer-list entry `clusters/<host:port>` = `host:port`, under its own lease.

The seed's Go nodes read that prefix once, at start (main.go's
services.GetPeers("clusters")); tests/integration/test_seed_interop.py starts
real ones against it."""

from __future__ import annotations

import pytest

from appliance.cluster import etcd
from appliance.cluster.registry import Registration
from appliance.config import Settings
from support.appliance import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server(etcd_server):
    return etcd_server


def entries(client, prefix: str) -> dict[str, tuple[str, int]]:
    return {m.key.decode(): (v.decode(), m.lease_id) for v, m in client.get_prefix(prefix)}


def test_entry_shares_the_registration_lease(server):
    settings = Settings(
        cluster={"etcd": [server.endpoint], "embedded_etcd": False, "seed_interop": True}, node={"host": "localhost"}
    )
    assert settings.cluster.seed_interop is True
    client = server.client()
    reg = Registration(
        lambda: etcd.connect(settings.cluster),
        "groupcache",
        "localhost:7001",
        ttl=2,
        seed_clusters=settings.cluster.seed_interop,
    )
    try:
        reg.start()
        assert reg.registered.wait(10)
        ours = entries(client, "groupcache/")["groupcache/localhost:7001"]
        seed = entries(client, "clusters/")
        # A bare host:port, as the seed's GetPeers reads it, on the same lease.
        assert seed == {"clusters/localhost:7001": ("localhost:7001", ours[1])} and ours[1] != 0
        # Our own readers take the bare value too (contract 2).
        assert etcd.parse_member(b"clusters/localhost:7001", b"localhost:7001") == ("localhost:7001", None)
        assert reg.deregister()
        assert entries(client, "clusters/") == {} and entries(client, "groupcache/") == {}
    finally:
        reg.deregister()
        client.close()


def test_entry_expires_with_the_lease_and_is_off_by_default(server):
    client = server.client()
    off = Settings(cluster={"etcd": [server.endpoint], "embedded_etcd": False}).cluster
    assert off.seed_interop is False
    plain = Registration(lambda: etcd.connect(off), "groupcache", "localhost:7002", ttl=1)
    mirrored = Registration(lambda: etcd.connect(off), "groupcache", "localhost:7003", ttl=1, seed_clusters=True)
    try:
        for r in (plain, mirrored):
            r.start()
            assert r.registered.wait(10)
        assert set(entries(client, "clusters/")) == {"clusters/localhost:7003"}
        # A worker that dies (no revoke): its keepalive stops, the entry goes with the lease.
        mirrored._stopping.set()
        mirrored.join(5)
        wait_for(lambda: entries(client, "clusters/") == {}, 10, what="clusters/ entry expired")
        assert "groupcache/localhost:7002" in entries(client, "groupcache/")
    finally:
        plain.deregister()
        client.close()
