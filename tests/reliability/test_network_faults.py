"""Network faults between hosts: one host is cut off from its peers and etcd.

Three "hosts" on one machine (tests/support/netns.py): host 0 in the root
network namespace runs `appliance run` with the embedded etcd on a bridge
address; hosts 1 and 2 run `appliance run` in their own network namespaces,
joined to the bridge by veth pairs, on that etcd. Each host has one worker.
These nodes bind the bridge's private addresses (10.x), not 127.0.0.1: that
is the point of the test. Skipped where namespaces cannot be created.

Reproduce the figures: .venv/bin/python -m pytest -s -q tests/reliability/test_network_faults.py
"""

from __future__ import annotations

import secrets

import pytest

from support.appliance import wait_for
from support.faults import Load, Stopwatch, against, assert_within, get_all, write_origin_files
from support.netns import HostAppliance, Network, free_port_on, netns_unavailable

pytestmark = pytest.mark.integration

LEASE_TTL = 2
GROUPS = """
[groups.files]
origin = "file://{origin}"
cache_bytes = "8MiB"
"""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    root = tmp_path_factory.mktemp("net")
    truth = write_origin_files(root / "origin", 200)
    truth.update({("files", f"absent-{i}"): None for i in range(10)})
    net = Network(3)
    apps: list[HostAppliance] = []
    try:
        net.setup()
        etcd = f"{net.address(0)}:{free_port_on(net.address(0))}"
        groups = GROUPS.format(origin=root / "origin")
        token = root / "cluster.token"  # one for every host: peers prove it to each other
        token.write_text(secrets.token_hex(24))
        token.chmod(0o600)
        for i in range(3):
            port = free_port_on(net.address(0)) if i == 0 else 7100
            app = HostAppliance(
                root / f"h{i}",
                net,
                i,
                etcd,
                base_port=port,
                workers=1,
                lease_ttl=LEASE_TTL,
                groups=groups,
                auth=f'token_file = "{token}"',
            )
            apps.append(app.start())
        everyone = [a.addresses()[0] for a in apps]
        for app in apps:
            app.wait_ring(1, members=everyone, timeout=60)
        yield net, apps, truth
    finally:
        for app in apps:
            app.cleanup()
        net.close()


def ring(app) -> tuple[int, tuple[str, ...]]:
    stats = app.admin_stats(0)
    return stats["revision"], tuple(sorted(stats["peers"]))


def test_cut_off_host_is_routed_around_and_rejoins(hosts):
    """Figures held: while host 2 is cut off (link down: no etcd, no peers),
    clients of hosts 0 and 1 see 0 failed and 0 wrong requests; hosts 0 and
    1 hold a ring without it within lease_ttl + 1 s of the cut; once the
    link is back, host 2 registers again and all three hosts hold the same
    full ring, and host 2 serves right values."""
    net, apps, truth = hosts
    everyone = sorted(a.addresses()[0] for a in apps)
    survivors = [apps[0].addresses()[0], apps[1].addresses()[0]]
    load = Load(survivors, truth, threads_per_target=2, timeout=5.0, max_seconds=90)
    with load:
        load.wait_requests(300)
        before = load.mark()
        net.cut(2)
        try:
            watch = Stopwatch()

            def routed_around() -> bool:
                rings = {ring(apps[0]), ring(apps[1])}
                return len(rings) == 1 and next(iter(rings))[1] == tuple(sorted(survivors))

            wait_for(routed_around, LEASE_TTL + 15, interval=0.02, what="ring without host 2")
            around_s = watch()
            load.wait_requests(300)
            cut = load.mark()
        finally:
            net.mend(2)
        watch = Stopwatch()

        def rejoined() -> bool:
            rings = {ring(a) for a in apps}
            return len(rings) == 1 and next(iter(rings))[1] == tuple(everyone)

        wait_for(rejoined, 60, interval=0.05, what="host 2 back in every ring")
        rejoin_s = watch()
        load.wait_requests(300)
        after = load.mark()
    via_cut_host = get_all(apps[2].addresses()[0], truth)
    print(
        f"\n[network cut] before: {before}; while cut: {cut}; after rejoin: {after}; "
        f"ring without host 2 after (s) {against(around_s, LEASE_TTL + 1)}; "
        f"full ring again {rejoin_s:.2f}s after the link came back; through host 2 afterwards: {via_cut_host}"
    )
    assert load.all.failed == 0 and load.all.wrong == 0, load.all.samples
    assert_within(around_s, LEASE_TTL + 1, "ring without host 2")
    assert via_cut_host.failed == 0 and via_cut_host.wrong == 0, via_cut_host.samples
