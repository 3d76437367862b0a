"""Many boxes, no single point of failure: three boxes, each running
`appliance run` with 2 workers and one member of one embedded etcd cluster.

Each box is a network namespace joined to a bridge (tests/support/netns.py):
its workers and its etcd member bind its own address (10.x), and cutting its
link partitions it. The boxes are started in any order by the same config
but for node.host. The tests share one cluster and each leaves it whole.

Figures held (lease_ttl 2 s):
- a box killed (every process of it, SIGKILL), not the etcd leader's: the
  others keep quorum and drop its workers within lease_ttl + 1 s, with 0
  failed requests on warm keys; restarted on its old data, its workers are
  back in every ring within lease_ttl + 5 s;
- the etcd leader's box killed: the others drop its workers within
  lease_ttl + 1 s + etcd's election (ELECTION_S), 0 failed requests;
- one box partitioned: the majority drops it and serves on; the minority
  box answers from its last ring (loading locally where it must), and every
  ring converges after the link returns;
- quorum lost (2 of 3 boxes down): the last box serves its last ring, logs
  that etcd has no quorum, and recovers when a member returns;
- `appliance stop-node` of another box's worker, under load: 0 failed.

Reproduce: .venv/bin/python -m pytest -s -q tests/reliability/test_multibox.py
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys

import pytest

from appliance.cache.ring import HashRing
from appliance.cluster import etcd
from support.appliance import wait_for
from support.faults import Load, Stopwatch, against, assert_within, report, write_origin_files
from support.netns import Box, Network, netns_unavailable

pytestmark = pytest.mark.integration

LEASE_TTL = 2
ELECTION_S = 3.0  # etcd's leader election (election timeout 1 s, plus the pre-vote rounds) as seen here
BOXES = (1, 2, 3)
GROUPS = """
[groups.files]
origin = "file://{origin}"
cache_bytes = "8MiB"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    root = tmp_path_factory.mktemp("boxes")
    truth = write_origin_files(root / "origin", 200)
    net = Network(5)  # host 0: the bridge only; boxes 1..3, and 4 for the join test
    boxes: dict[int, Box] = {}
    try:
        net.setup()
        groups = GROUPS.format(origin=root / "origin")
        token = root / "cluster.token"  # one for every box, as the README says
        token.write_text(secrets.token_hex(24))
        token.chmod(0o600)
        auth = f'token_file = "{token}"'
        for i in (3, 1, 2):  # any order
            boxes[i] = Box(
                root / f"b{i}", net, i, list(BOXES), workers=2, lease_ttl=LEASE_TTL, groups=groups, auth=auth
            )
            boxes[i].start()
        c = Cluster(net, boxes, truth)
        c.root, c.groups, c.auth = root, groups, auth
        watch = Stopwatch()
        c.wait_whole(timeout=90)
        c.formed_s = watch()
        yield c
    finally:
        for box in boxes.values():
            box.cleanup()
        net.close()


class Cluster:
    def __init__(self, net: Network, boxes: dict[int, Box], truth) -> None:
        self.net, self.boxes, self.truth = net, boxes, truth

    def everyone(self, boxes=BOXES) -> list[str]:
        return sorted(a for i in boxes for a in self.boxes[i].addresses())

    def ring_of(self, box: int, worker: int) -> tuple[str, ...]:
        return tuple(sorted(self.boxes[box].admin_stats(worker)["peers"]))

    def hold(self, boxes, members) -> bool:
        """Every worker of `boxes` holds a ring of exactly `members`."""
        want = tuple(sorted(members))
        return all(self.ring_of(b, w) == want for b in boxes for w in range(2))

    def wait_whole(self, timeout: float = 60) -> None:
        for box in self.boxes.values():  # restart anything a test stopped
            if box.proc is None or box.proc.poll() is not None:
                box.start()
        wait_for(lambda: self.hold(BOXES, self.everyone()), timeout, interval=0.1, what="every ring of 6 workers")

    def leader_box(self) -> int:
        """The box whose etcd member leads now."""
        client = self.boxes[1].etcd()
        try:
            status = etcd.call(client, lambda c: c.status())
            members = {m.id: list(m.peer_urls) for m in etcd.call(client, lambda c: list(c.members))}
        finally:
            client.close()
        url = members[status.leader.id][0]
        return next(i for i in BOXES if f"//{self.net.address(i)}:" in url)

    def revive(self, box: int) -> None:
        """Start a box that was killed (its old data directory kept)."""
        self.boxes[box].proc = None
        self.boxes[box].start()


def test_boxes_form_one_cluster_and_see_each_other(cluster):
    b1, b2, b3 = (cluster.boxes[i] for i in BOXES)
    members = b1.cli("etcd", "members")
    assert members.returncode == 0, members.stderr
    rows = members.stdout.decode().strip().splitlines()[1:]
    assert len(rows) == 3 and all("healthy" in r for r in rows), rows
    assert sum("leader" in r for r in rows) == 1
    peers = b2.cli("peers")
    assert peers.returncode == 0, peers.stderr
    listed = dict(line.split("\t") for line in peers.stdout.decode().splitlines())
    assert sorted(listed) == cluster.everyone()
    assert {listed[a] for a in b3.addresses()} == {cluster.net.address(3)}
    stats = b3.cli("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    boxes = {addr: st["box"] for addr, st in json.loads(stats.stdout).items() if "error" not in st}
    assert sorted(boxes) == cluster.everyone() and set(boxes.values()) == {cluster.net.address(i) for i in BOXES}
    check = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(b1.config)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert "etcd cluster of 3 embedded members" in check.stdout
    assert "any etcd client can write the ring's member keys" in check.stdout  # no TLS here: it says so
    # Writes cross boxes with the shared cluster token: a Set on box 1 for a
    # key box 2 owns, read on box 3, removed from box 2, every worker confirming.
    ring = HashRing(cluster.everyone(), 50, "seed")
    key = next(
        k
        for (g, k) in sorted(cluster.truth)
        if g == "files" and cluster.truth[(g, k)] is not None and listed[ring.owner(k)] == cluster.net.address(2)
    )
    put = b1.cli("set", "files", key, "cross-box")
    assert put.returncode == 0 and b"6 peer(s) confirmed" in put.stdout, (put.stdout, put.stderr)
    assert b3.cli("get", "files", key).stdout == b"cross-box"
    removed = b2.cli("remove", "files", key)
    assert removed.returncode == 0 and b"6 peer(s) confirmed" in removed.stdout, (removed.stdout, removed.stderr)
    assert b3.cli("get", "files", key).stdout == cluster.truth[("files", key)]
    report("three boxes", every_ring_of_6_after_s=f"{cluster.formed_s:.2f}", members=len(rows))


def test_stop_node_of_another_box_under_load(cluster):
    cluster.wait_whole()
    victim = cluster.boxes[2].addresses()[1]
    others = [a for a in cluster.everyone() if a != victim]
    load = Load(cluster.boxes[1].addresses() + cluster.boxes[3].addresses(), cluster.truth, max_seconds=60)
    with load:
        load.wait_requests(300)
        watch = Stopwatch()
        out = cluster.boxes[1].cli("stop-node", victim)
        stop_s = watch()
        wait_for(lambda: cluster.hold((1, 3), others), 10, interval=0.05, what="rings without the stopped worker")
        ring_s = watch()
        load.wait_requests(300)
    report(
        "cross-box stop-node",
        total=load.all,
        cli_s=f"{stop_s:.2f}",
        ring_without_it_s=f"{ring_s:.2f}",
        output=out.stdout.decode().strip(),
    )
    assert out.returncode == 0, out.stderr
    assert b"left the ring" in out.stdout
    assert load.all.failed == 0 and load.all.wrong == 0, load.all.samples
    assert cluster.boxes[2].process_info()["worker-1"]["statename"] == "STOPPED"
    assert victim not in cluster.boxes[1].registered_addrs()
    # A worker that does not exist: a clear error, exit 2.
    missing = cluster.boxes[1].cli("stop-node", f"{cluster.net.address(2)}:1")
    assert missing.returncode == 2 and b"not a live worker of the cluster" in missing.stderr
    cluster.boxes[2].supervisor().startProcess("worker-1", True)
    cluster.wait_whole()


def _kill_under_load(cluster, victim: int, bound: float, name: str) -> None:
    survivors = [i for i in BOXES if i != victim]
    rest = cluster.everyone(survivors)
    load = Load([a for i in survivors for a in cluster.boxes[i].addresses()], cluster.truth, max_seconds=90)
    with load:
        load.wait_requests(300)
        watch = Stopwatch()
        killed = cluster.boxes[victim].kill()
        wait_for(lambda: cluster.hold(survivors, rest), bound + 10, interval=0.02, what=f"rings without box {victim}")
        gone_s = watch()
        during = load.mark()
        load.wait_requests(300)
        # Quorum held: the survivors' etcd takes writes, and the CLI skips the dead member.
        client = cluster.boxes[survivors[0]].etcd()
        try:
            etcd.call(client, lambda c: c.put("/probe", "x"))
        finally:
            client.close()
        for i in survivors:
            peers = cluster.boxes[i].cli("peers")
            assert peers.returncode == 0, peers.stderr
            assert sorted(line.split("\t")[0] for line in peers.stdout.decode().splitlines()) == rest
        watch = Stopwatch()
        cluster.revive(victim)
        wait_for(
            lambda: cluster.hold(BOXES, cluster.everyone()), LEASE_TTL + 15, interval=0.05, what="every ring again"
        )
        back_s = watch()
        load.wait_requests(200)
    report(
        name,
        processes_killed=len(killed),
        its_workers_gone_s=against(gone_s, bound),
        while_gone=during,
        back_in_every_ring_s=against(back_s, LEASE_TTL + 5),
        total=load.all,
    )
    assert len(killed) >= 5  # run, supervisord, etcd, controller, 2 workers
    assert load.all.failed == 0 and load.all.wrong == 0, load.all.samples
    assert_within(gone_s, bound, "its workers gone")
    assert_within(back_s, LEASE_TTL + 5, "back in every ring")


def test_kill_a_whole_box_then_restart_it(cluster):
    cluster.wait_whole()
    victim = next(i for i in BOXES if i != cluster.leader_box())
    _kill_under_load(cluster, victim, LEASE_TTL + 1, "kill a box (not the etcd leader's)")


def test_kill_the_etcd_leaders_box(cluster):
    cluster.wait_whole()
    _kill_under_load(cluster, cluster.leader_box(), LEASE_TTL + 1 + ELECTION_S, "kill the etcd leader's box")


def _get_inside(box: Box, keys: list[tuple[str, str]], truth) -> dict:
    """Gets to box's own workers, from inside its namespace (it is cut off)."""
    script = (
        "import grpc, json, sys\n"
        "from appliance.pb import groupcache_pb2, groupcache_pb2_grpc\n"
        "plan = json.loads(sys.argv[1]); out = {'ok': 0, 'failed': []}\n"
        "for addr in plan['addrs']:\n"
        "    with grpc.insecure_channel(addr) as ch:\n"
        "        stub = groupcache_pb2_grpc.GroupCacheStub(ch)\n"
        "        for group, key, want in plan['keys']:\n"
        "            try:\n"
        "                got = stub.Get(groupcache_pb2.GetRequest(group=group, key=key), timeout=8).value\n"
        "                if got.hex() == want:\n"
        "                    out['ok'] += 1\n"
        "                else:\n"
        "                    out['failed'].append([key, 'wrong'])\n"
        "            except grpc.RpcError as e:\n"
        "                out['failed'].append([key, e.code().name])\n"
        "print(json.dumps(out))\n"
    )
    plan = {"addrs": box.addresses(), "keys": [(g, k, truth[(g, k)].hex()) for g, k in keys]}
    out = subprocess.run(
        [*box.launcher, sys.executable, "-c", script, json.dumps(plan)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_partition_one_box(cluster):
    cluster.wait_whole()
    victim = next(i for i in BOXES if i != cluster.leader_box())
    majority = [i for i in BOXES if i != victim]
    rest = cluster.everyone(majority)
    keys = [k for k in sorted(cluster.truth) if cluster.truth[k] is not None][:40]
    log = cluster.boxes[victim].log
    seen = log.stat().st_size
    load = Load([a for i in majority for a in cluster.boxes[i].addresses()], cluster.truth, max_seconds=90)
    with load:
        load.wait_requests(300)
        watch = Stopwatch()
        cluster.net.cut(victim)
        try:
            wait_for(
                lambda: cluster.hold(majority, rest), LEASE_TTL + 10, interval=0.02, what="majority rings without it"
            )
            dropped_s = watch()
            # The cut-off box still answers its own clients, from its last ring.
            asked = Stopwatch()
            inside = _get_inside(cluster.boxes[victim], keys, cluster.truth)
            inside_s = asked()
            minority_ring = cluster.ring_of(victim, 0)
        finally:
            cluster.net.mend(victim)
        watch = Stopwatch()
        wait_for(
            lambda: cluster.hold(BOXES, cluster.everyone()), 30, interval=0.05, what="every ring after the link returns"
        )
        healed_s = watch()

        def reads_etcd_again() -> bool:
            # Its workers kept their ring throughout; its controller must see etcd again too.
            text = log.read_bytes()[seen:].decode(errors="replace")
            lost = text.rfind("etcd unreachable or without quorum")
            return lost < 0 or text.rfind("etcd answers again") > lost

        wait_for(reads_etcd_again, 30, what="the cut box's controller reading etcd again")
        controller_s = watch()
        load.wait_requests(200)
    report(
        "partition one box",
        majority_dropped_it_s=against(dropped_s, LEASE_TTL + 1 + ELECTION_S),
        majority_load=load.all,
        minority_answers=f"{inside['ok']} ok, {len(inside['failed'])} failed of {2 * len(keys)} in {inside_s:.2f}s",
        minority_ring_size=len(minority_ring),
        converged_after_mend_s=f"{healed_s:.2f}",
        its_controller_reads_etcd_again_s=f"{controller_s:.2f}",
    )
    assert load.all.failed == 0 and load.all.wrong == 0, load.all.samples
    assert_within(dropped_s, LEASE_TTL + 1 + ELECTION_S, "majority dropped it")
    assert inside["failed"] == [] and inside["ok"] == 2 * len(keys)


def test_lose_quorum_then_recover(cluster):
    cluster.wait_whole()
    last = 1
    keys = [k for k in sorted(cluster.truth) if cluster.truth[k] is not None][:60]
    ring_before = cluster.ring_of(last, 0)
    log = cluster.boxes[last].log
    seen = log.stat().st_size  # earlier tests may have logged it too
    for i in (2, 3):
        cluster.boxes[i].kill()
    watch = Stopwatch()

    def since() -> str:
        return log.read_bytes()[seen:].decode(errors="replace")

    try:
        wait_for(lambda: "etcd unreachable or without quorum" in since(), 20, what="the last box to log no quorum")
    except AssertionError as exc:
        lines = [line for line in since().splitlines() if "role=worker" not in line]
        raise AssertionError(
            f"{exc}; box {last} logged meanwhile (but its workers):\n" + "\n".join(lines[-40:])
        ) from None
    noticed_s = watch()
    # It serves on its last ring: keys of the dead boxes' workers are loaded locally.
    outcome = Load(cluster.boxes[last].addresses(), {k: cluster.truth[k] for k in keys}, max_requests=300)
    with outcome:
        outcome.wait_requests(300, timeout=60)
    ring_during = cluster.ring_of(last, 0)
    watch = Stopwatch()
    cluster.revive(2)  # a member returns: quorum again
    survivors = cluster.everyone((1, 2))
    wait_for(lambda: cluster.hold((1, 2), survivors), 60, interval=0.1, what="boxes 1 and 2 on one ring again")
    recovered_s = watch()
    cluster.revive(3)
    cluster.wait_whole(timeout=60)
    report(
        "lose quorum",
        no_quorum_logged_after_s=f"{noticed_s:.2f}",
        served_on_last_ring=outcome.all,
        ring_kept=ring_during == ring_before,
        recovered_with_a_member_back_s=f"{recovered_s:.2f}",
    )
    assert outcome.all.failed == 0 and outcome.all.wrong == 0, outcome.all.samples
    assert ring_during == ring_before


def test_replace_a_box_that_lost_its_disk(cluster):
    """A box whose etcd data is gone cannot rejoin by itself (it would split
    the cluster's history): its start says what to do, and after
    remove-member and add-member on a running box it joins and serves."""
    cluster.wait_whole()
    victim = next(i for i in BOXES if i != cluster.leader_box())
    helper = next(i for i in BOXES if i != victim)
    host = cluster.net.address(victim)
    box = cluster.boxes[victim]
    box.kill()
    shutil.rmtree(box.root / "state" / "etcd")
    from support.appliance import BIN

    refused = subprocess.run(
        [*box.launcher, str(BIN / "appliance"), "run", "--config", str(box.config)], capture_output=True, timeout=60
    )
    assert refused.returncode == 2, refused.stderr
    assert b"remove-member" in refused.stderr and b"Traceback" not in refused.stderr, refused.stderr
    watch = Stopwatch()
    removed = cluster.boxes[helper].cli("etcd", "remove-member", host)
    assert removed.returncode == 0, removed.stderr
    added = cluster.boxes[helper].cli("etcd", "add-member", host)
    assert added.returncode == 0, added.stderr
    again = cluster.boxes[helper].cli("etcd", "add-member", host)
    assert again.returncode == 2 and b"already a member" in again.stderr, again.stderr
    cluster.revive(victim)
    cluster.wait_whole(timeout=60)
    replaced_s = watch()
    rows = cluster.boxes[victim].cli("etcd", "members").stdout.decode().strip().splitlines()[1:]
    report("replace a box", back_in_every_ring_s=f"{replaced_s:.2f}", members=rows)
    assert len(rows) == 3 and all("healthy" in r for r in rows), rows


def test_join_a_fourth_box_then_retire_it(cluster):
    """Scale out by a box: add its member on a running box, start it (its
    config lists every endpoint, its own too), and its workers join every
    ring; retire it with a graceful stop and remove-member."""
    cluster.wait_whole()
    net, n = cluster.net, 4
    host = net.address(n)
    box = Box(
        cluster.root / f"b{n}",
        net,
        n,
        [*BOXES, n],
        workers=2,
        lease_ttl=LEASE_TTL,
        groups=cluster.groups,
        auth=cluster.auth,
    )
    from support.appliance import BIN

    refused = subprocess.run(
        [*box.launcher, str(BIN / "appliance"), "run", "--config", str(box.config)], capture_output=True, timeout=60
    )
    assert refused.returncode == 2, refused.stderr
    assert f"appliance etcd add-member {host}".encode() in refused.stderr, refused.stderr
    watch = Stopwatch()
    added = cluster.boxes[1].cli("etcd", "add-member", host)
    assert added.returncode == 0, added.stderr
    cluster.boxes[n] = box
    try:
        box.start()
        everyone = cluster.everyone((*BOXES, n))
        wait_for(lambda: cluster.hold((*BOXES, n), everyone), 60, interval=0.1, what="every ring of 8 workers")
        joined_s = watch()
        rows = box.cli("etcd", "members").stdout.decode().strip().splitlines()[1:]
        assert len(rows) == 4 and all("healthy" in r for r in rows), rows
        load = Load(cluster.everyone(), cluster.truth, max_seconds=60)
        with load:
            load.wait_requests(300)
            watch = Stopwatch()
            assert box.sigterm() == 0
            wait_for(lambda: cluster.hold(BOXES, cluster.everyone()), 20, interval=0.05, what="rings without box 4")
            left_s = watch()
            load.wait_requests(300)
        removed = cluster.boxes[1].cli("etcd", "remove-member", host)
        assert removed.returncode == 0, removed.stderr
        rows_after = cluster.boxes[2].cli("etcd", "members").stdout.decode().strip().splitlines()[1:]
    finally:
        del cluster.boxes[n]
        box.cleanup()
    report(
        "join a fourth box",
        in_every_ring_of_8_s=f"{joined_s:.2f}",
        retired_left_every_ring_s=f"{left_s:.2f}",
        load_while_it_left=load.all,
        members_after=len(rows_after),
    )
    assert load.all.failed == 0 and load.all.wrong == 0, load.all.samples
    assert len(rows_after) == 3
