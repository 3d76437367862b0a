"""Registration values in etcd (contract 2): what Go's naming/endpoints reads."""

import json

from appliance.cluster import etcd


def test_metadata_is_a_string_that_go_clients_can_hash():
    value = etcd.member_value("localhost:7001", {"admin": "unix:/run/w0.sock", "pid": 7})
    doc = json.loads(value)
    assert doc["Addr"] == "localhost:7001"
    # A JSON object here would reach grpc-go as a map: round-robin clients panic on it.
    assert isinstance(doc["Metadata"], str)
    assert etcd.parse_member("groupcache/localhost:7001", value) == (
        "localhost:7001", {"admin": "unix:/run/w0.sock", "pid": 7},
    )  # fmt: skip
    assert json.loads(etcd.member_value("localhost:7001"))["Metadata"] is None


def test_foreign_values_parse():
    # The seed's own registration, an object (older appliances), a bare clusters/ value.
    seed = '{"Op":0,"Addr":"localhost:9999","Metadata":"groupcache services"}'
    assert etcd.parse_member("groupcache/localhost:9999", seed) == ("localhost:9999", None)
    old = '{"Addr":"127.0.0.1:7","Metadata":{"pid":1}}'
    assert etcd.parse_member("groupcache/127.0.0.1:7", old) == ("127.0.0.1:7", {"pid": 1})
    assert etcd.parse_member("clusters/localhost:1", "localhost:1") == ("localhost:1", None)
