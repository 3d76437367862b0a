"""What another local user can do to a running appliance: run as that user
(`runuser -u nobody`) by tests/integration/test_local_trust.py.

It runs under Debian's /usr/bin/python3 with python3-grpcio, not the
project's virtualenv (whose interpreter lives under /root, which another
user cannot enter), so it imports nothing of the project: requests are
encoded by hand and the reply is one JSON line on stdout.

    other_user.py PLAN.json
"""

import json
import os
import subprocess
import sys

import grpc


def field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (lengths here stay under 128)."""
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


def call(addr: str, path: str, body: bytes, token: str | None) -> dict:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(addr) as channel:
        method = channel.unary_unary(path)
        try:
            reply = method(body, timeout=5, metadata=metadata)
        except grpc.RpcError as err:
            return {"code": err.code().name, "details": err.details()}
    return {"code": "OK", "reply": reply.hex()}


def etcd_put(etcdctl: str, endpoint: str, key: str, value: str) -> dict:
    out = subprocess.run(
        [etcdctl, "--endpoints", endpoint, "--dial-timeout", "2s", "--command-timeout", "3s", "put", key, value],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return {"endpoint": endpoint, "returncode": out.returncode, "output": (out.stdout + out.stderr)[-300:]}


def main() -> None:
    plan = json.load(open(sys.argv[1]))
    fake = plan["fake_peer"]
    value = json.dumps({"Addr": fake})
    out = {"uid": os.getuid()}
    out["etcd"] = [etcd_put(plan["etcdctl"], ep, f"groupcache/{fake}", value) for ep in plan["etcd_endpoints"]]
    # Why the unix socket refuses: its directory is not ours to enter.
    try:
        os.stat(plan["etcd_socket"])
        out["etcd_socket"] = "reached"
    except OSError as exc:
        out["etcd_socket"] = type(exc).__name__
    group, key = plan["group"].encode(), plan["key"].encode()
    get = field(1, group) + field(2, key)
    out["get"] = call(plan["addr"], "/groupcachepb.GroupCache/Get", get, None)
    poison = field(1, group) + field(2, key) + field(3, b"POISON")
    remove = field(1, group) + field(2, key)
    out["writes"] = {}
    for name, token in (("none", None), ("wrong", "w" * 32), ("reader", plan["reader_token"])):
        out["writes"][name] = {
            "set": call(plan["addr"], "/appliance.cache.Cache/Set", poison, token),
            "remove": call(plan["addr"], "/appliance.cache.Cache/Remove", remove, token),
        }
    out["get_after"] = call(plan["addr"], "/groupcachepb.GroupCache/Get", get, None)
    # The admin socket and the box's token are the service user's alone.
    out["admin"] = call(f"unix:{plan['admin_socket']}", "/appliance.admin.Admin/SetPeers", b"", None)
    try:
        open(plan["token_file"]).read()
        out["token_file"] = "read"
    except OSError as exc:
        out["token_file"] = type(exc).__name__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
