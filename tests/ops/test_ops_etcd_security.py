"""etcd security from the config: user/password (`cluster.etcd_user`,
`etcd_password`, also from the environment) against an etcd with auth
enabled, and TLS with a client certificate (`etcd_ca`, `etcd_cert`,
`etcd_key`). Registration, reading members and watching work with the right
credentials and are refused without them. An embedded etcd cluster with
[tls] (three members on 127.0.0.1-3, as three boxes would run them) serves
over TLS with the boxes' certificates and refuses clients without one."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import etcd3
import grpc
import pytest

from appliance.cluster import etcd
from appliance.cluster.registry import Registration
from appliance.config import Layout, Settings, report
from appliance.supervision.conf import etcd_binary
from support.appliance import wait_for
from support.ports import free_port

pytestmark = pytest.mark.integration


def etcdctl() -> str:
    found = shutil.which("etcdctl") or shutil.which("etcdctl", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("no etcdctl")
    return found


@contextlib.contextmanager
def etcd_process(data_dir: Path, *, tls=None):
    """A private etcd; with `tls` (the test PKI) it serves https and wants client certs."""
    port, peer = free_port(), free_port()
    scheme = "https" if tls else "http"
    client_url, peer_url = f"{scheme}://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
    extra = []
    if tls:
        extra = [
            "--cert-file",
            str(tls.cert),
            "--key-file",
            str(tls.key),
            "--trusted-ca-file",
            str(tls.ca),
            "--client-cert-auth",
        ]
    proc = subprocess.Popen(
        [
            etcd_binary(),
            "--name",
            "ops",
            "--data-dir",
            str(data_dir),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"ops={peer_url}",
            "--log-level",
            "error",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield f"127.0.0.1:{port}", client_url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def auth_etcd(tmp_path):
    with etcd_process(tmp_path / "etcd") as (endpoint, client_url):

        def ctl(*args):
            return subprocess.run(
                [etcdctl(), f"--endpoints={client_url}", *args], capture_output=True, timeout=20, text=True
            )

        wait_for(lambda: ctl("endpoint", "health").returncode == 0, 20, what="etcd up")
        for args in (
            ("user", "add", "root", "--new-user-password=rootpw"),
            ("user", "grant-role", "root", "root"),
            ("role", "add", "groupcache"),
            ("role", "grant-permission", "groupcache", "readwrite", "groupcache/", "--prefix=true"),
            ("user", "add", "appliance", "--new-user-password=s3cret"),
            ("user", "grant-role", "appliance", "groupcache"),
            ("auth", "enable"),
        ):
            out = ctl(*args)
            assert out.returncode == 0, (args, out.stderr)
        yield endpoint


def cluster(endpoint: str, **creds):
    return Settings(cluster={"etcd": [endpoint], "embedded_etcd": False, **creds}).cluster


def test_user_password_register_read_and_watch(auth_etcd, monkeypatch):
    settings = cluster(auth_etcd, etcd_user="appliance", etcd_password="s3cret")
    # Without credentials, or with a wrong password: refused.
    anonymous = etcd.connect(cluster(auth_etcd))
    try:
        with pytest.raises(Exception, match="(?i)token|auth|permission|user name is empty"):
            anonymous.put("groupcache/127.0.0.1:1", "x")
    finally:
        anonymous.close()
    with pytest.raises(Exception, match="(?i)auth|password|credential"):
        etcd.connect(cluster(auth_etcd, etcd_user="appliance", etcd_password="wrong"))

    client = etcd.connect(settings)
    events: queue.Queue = queue.Queue()
    registration = Registration(lambda: etcd.connect(settings), "groupcache", "127.0.0.1:7001", ttl=2)
    cancel = None
    try:
        members, revision = etcd.read_members(client, "groupcache")
        assert members == {}
        cancel = etcd.watch_prefix(client, etcd.prefix("groupcache"), revision + 1, events.put)
        registration.start()
        assert registration.registered.wait(10)
        response = events.get(timeout=10)
        assert not isinstance(response, Exception), response
        assert [e.kv.key.decode() for e in response.events] == ["groupcache/127.0.0.1:7001"]
        assert etcd.peers_of(etcd.read_members(client, "groupcache")[0]) == ["127.0.0.1:7001"]
        # Env overrides work for the credentials too (they stay out of the file).
        monkeypatch.setenv("APPLIANCE_CLUSTER__ETCD_USER", "appliance")
        monkeypatch.setenv("APPLIANCE_CLUSTER__ETCD_PASSWORD", "s3cret")
        from_env = etcd.connect(Settings(cluster={"etcd": [auth_etcd], "embedded_etcd": False}).cluster)
        try:
            assert etcd.peers_of(etcd.read_members(from_env, "groupcache")[0]) == ["127.0.0.1:7001"]
        finally:
            from_env.close()
        # The role covers groupcache/ only.
        with pytest.raises(grpc.RpcError) as denied:
            client.put("elsewhere/x", "y")
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, denied.value
    finally:
        if cancel is not None:
            cancel()
        if registration.is_alive():
            assert registration.deregister()  # revoking a lease works with credentials too
        client.close()


def test_etcd_tls_with_a_client_certificate(tmp_path, pki):
    with etcd_process(tmp_path / "etcd", tls=pki) as (endpoint, _):
        good = cluster(endpoint, etcd_ca=str(pki.ca), etcd_cert=str(pki.cert), etcd_key=str(pki.key))

        def works():
            c = etcd.connect(good)
            try:
                c.put("groupcache/127.0.0.1:7002", etcd.member_value("127.0.0.1:7002"))
                return etcd.peers_of(etcd.read_members(c, "groupcache")[0])
            finally:
                c.close()

        assert wait_for(works, 20, what="etcd over TLS") == ["127.0.0.1:7002"]
        assert_refused_without_a_certificate(endpoint, pki)


def assert_refused_without_a_certificate(endpoint: str, pki) -> None:
    """The member at `endpoint` answers a client with a certificate; one
    with the CA but no certificate, or in plain text, is refused at the
    connection (no TLS session), not by some later error."""
    good = etcd.connect(cluster(endpoint, etcd_ca=str(pki.ca), etcd_cert=str(pki.cert), etcd_key=str(pki.key)))
    try:
        etcd.read_members(good, "groupcache")  # it runs, and takes certificates
    finally:
        good.close()
    # The CA alone: the member ends the handshake (it requires a client
    # certificate). Plain text: it closes the socket.
    for bad, why in ((cluster(endpoint, etcd_ca=str(pki.ca)), "handshake"), (cluster(endpoint), "closed")):
        c = etcd.connect(bad, timeout=2)
        try:
            with pytest.raises(etcd3.exceptions.ConnectionFailedError) as info:
                etcd.read_members(c, "groupcache")
            assert why in etcd.describe(info.value).lower(), etcd.describe(info.value)
        finally:
            c.close()


def test_an_embedded_etcd_cluster_with_tls_takes_only_clients_with_a_certificate(tmp_path, pki):
    from appliance.supervision.conf import etcd_flags
    from support.ports import _bindable

    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    ports = [free_port(h) for h in hosts]
    peer = next(p for p in (free_port() for _ in range(50)) if all(_bindable(h, p) for h in hosts))
    endpoints = [f"{h}:{p}" for h, p in zip(hosts, ports, strict=True)]
    boxes = [
        Settings(
            cluster={"etcd": endpoints, "etcd_peer_port": peer},
            node={"host": h, "state_dir": str(tmp_path / h), "runtime_dir": str(tmp_path / f"run-{h}")},
            tls={"cert": str(pki.cert), "key": str(pki.key), "ca": str(pki.ca), "client_auth": True},
        )
        for h in hosts
    ]
    procs = []
    try:
        for s in boxes:
            assert Layout(s).etcd_clustered() and report.etcd_warning(s) is None
            procs.append(
                subprocess.Popen(
                    [etcd_binary(), *etcd_flags(s)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

        def works():
            c = etcd.connect_to(boxes[1])
            try:
                c.put("groupcache/127.0.0.2:7003", etcd.member_value("127.0.0.2:7003"))
                return sorted(list(m.peer_urls)[0] for m in etcd.call(c, lambda c: list(c.members)))
            finally:
                c.close()

        urls = wait_for(works, 30, interval=0.2, what="the TLS etcd cluster")
        assert urls == [f"https://{h}:{peer}" for h in hosts]
        assert_refused_without_a_certificate(endpoints[2], pki)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
