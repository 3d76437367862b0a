"""Registration values in etcd (contract 2): what Go's naming/endpoints reads."""

import json
from types import SimpleNamespace

from appliance.cluster import etcd


def test_metadata_is_a_string_that_go_clients_can_hash():
    value = etcd.member_value("localhost:7001", {"admin": "unix:/run/w0.sock", "pid": 7})
    doc = json.loads(value)
    assert doc["Addr"] == "localhost:7001"
    # A JSON object here would reach grpc-go as a map: round-robin clients panic on it.
    assert isinstance(doc["Metadata"], str)
    assert etcd.parse_member("groupcache/localhost:7001", value) == (
        "localhost:7001",
        {"admin": "unix:/run/w0.sock", "pid": 7},
    )
    assert json.loads(etcd.member_value("localhost:7001"))["Metadata"] is None


def test_foreign_values_parse():
    # The seed's own registration, an object (older appliances), a bare clusters/ value.
    seed = '{"Op":0,"Addr":"localhost:9999","Metadata":"groupcache services"}'
    assert etcd.parse_member("groupcache/localhost:9999", seed) == ("localhost:9999", None)
    old = '{"Addr":"127.0.0.1:7","Metadata":{"pid":1}}'
    assert etcd.parse_member("groupcache/127.0.0.1:7", old) == ("127.0.0.1:7", {"pid": 1})
    assert etcd.parse_member("clusters/localhost:1", "localhost:1") == ("localhost:1", None)


def test_watch_events_at_or_before_the_read_revision_are_skipped():
    def kv(key, addr, revision):
        return SimpleNamespace(key=key.encode(), value=etcd.member_value(addr).encode(), lease=0, mod_revision=revision)

    def event(kind, kv):
        return SimpleNamespace(type=kind, kv=kv, DELETE="DELETE")

    members = {"groupcache/a:1": etcd.Member("a:1", None)}
    response = SimpleNamespace(
        header=SimpleNamespace(revision=12),
        events=[
            event("PUT", kv("groupcache/b:1", "b:1", 9)),  # already in the read at 10
            event("DELETE", kv("groupcache/a:1", "", 11)),
            event("PUT", kv("groupcache/c:1", "c:1", 12)),
        ],
    )
    after, revision = etcd.apply_events(members, 10, response)
    assert (sorted(m.addr for m in after.values()), revision) == (["c:1"], 12)
    assert members == {"groupcache/a:1": etcd.Member("a:1", None)}  # not changed in place


def test_every_etcd_retry_loop_backs_off_the_same_way():
    """etcd.Backoff: 0.1 s, doubling to the cap (1 s, or a caller's slower
    cadence), back to 0.1 s once etcd answers."""
    from appliance.cluster.etcd import Backoff

    backoff = Backoff()
    assert [backoff.next() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.1
    slow = Backoff(cap=5.0)
    assert [slow.next() for _ in range(8)][-1] == 5.0
