"""One cluster with the seed's own Go nodes (issue 12): every key is loaded
once, by its owner, whichever side owns it.

One private network namespace (only `lo` up: the seed's nodes listen on
every interface) holds our `appliance run` (embedded etcd on 127.0.0.1:12379,
2 workers as localhost:17000-17001, python: origin that logs each load) and
two real seed nodes built from the seed's source (localhost:17100-17101,
loader "v-"+key, one SEEDGO-LOAD stdout line per load). Both sides return
"v-"+key, so every value is checked, and every origin load is counted on
both sides and attributed to the node that made it. See tests/support/seed.py.

Skipped without root, network namespaces or a Go toolchain (SEEDGO_REQUIRED=1
turns the skip into a failure; .ci/run sets it when it runs as root).

    .venv/bin/python -m pytest -s -q tests/integration/test_seed_interop.py

prints the figures (loads per side per round, peer errors, error orders)
and writes them to <tmp>/seed*/figures.json.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter

import pytest

from appliance.cache.ring import HashRing
from support import seed
from support.appliance import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FIGURES: dict = {}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    reason = seed.unavailable()
    if reason:
        if seed.required():
            pytest.fail(f"SEEDGO_REQUIRED is set, but: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("seed")
    cluster = seed.MixedCluster(root)
    started = time.monotonic()
    try:
        cluster.start()
        FIGURES["setup_seconds"] = round(time.monotonic() - started, 1)
        yield cluster
    finally:
        leftovers = cluster.close()
        FIGURES["leftover_pids_killed"] = len(leftovers)
        (root / "figures.json").write_text(json.dumps(FIGURES, indent=1, ensure_ascii=False))
        print("\nseed interop figures:", json.dumps(FIGURES, indent=1, ensure_ascii=False))


def owned(members: list[str], prefix: str, want: dict[str, int]) -> dict[str, list[str]]:
    """Fresh keys `prefix-N`, `want[owner]` of them per owner on the ring of `members`."""
    ring = HashRing(members)
    out: dict[str, list[str]] = {o: [] for o in want}
    i = 0
    while any(len(out[o]) < n for o, n in want.items()):
        key, i = f"{prefix}-{i}", i + 1
        o = ring.owner(key)
        if o in out and len(out[o]) < want[o]:
            out[o].append(key)
    return out


def expected(keys_by_owner: dict[str, list[str]]) -> Counter:
    return Counter({(owner, k): 1 for owner, ks in keys_by_owner.items() for k in ks})


def assert_values(mixed, calls):
    results = mixed.agent.get(calls)
    wrong = [(c, r) for c, r in zip(calls, results, strict=True) if r != (b"v-" + c[2].encode(), None)]
    assert not wrong, f"{len(wrong)}/{len(calls)} wrong answers, e.g. {wrong[:3]}"


def peer_errors(mixed) -> list[int]:
    return [s["peer_errors"] for s in mixed.stats()]


def side_counts(delta: Counter, mixed) -> dict[str, int]:
    return {addr: sum(n for (who, _), n in delta.items() if who == addr) for addr in mixed.everyone()}


def test_rings_agree_with_the_seeds(mixed):
    """Ring agreement: `appliance locate --peers` (static list) and the live
    ring from etcd (`appliance locate` in the namespace) against the seed's
    own consistenthash (seedring) on 3,000 keys, non-ASCII included; the Go
    nodes' peer lists (read from clusters/) are our ring's members."""
    everyone = mixed.everyone()
    for node in mixed.go:
        assert sorted(node.peer_lists()[-1]) == everyone
    for i in range(len(mixed.workers)):
        assert sorted(mixed.app.admin_stats(i)["peers"]) == everyone
    keys = [f"k{i}" for i in range(1000)]
    keys += [f"学生{i}" for i in range(500)] + [f"ключ-{i}" for i in range(500)]
    keys += [f"🔑{i}·ü" for i in range(500)] + [f"user:{i}/a b" for i in range(498)] + ["scores张三", "李四"]
    go = seed.seedring(everyone, keys)
    assert len(go) == len(keys)
    r = mixed.appliance("locate", "--peers", ",".join(everyone), "--", *keys, inside=False)
    assert r.returncode == 0, r.stderr.decode()
    ours = dict(line.rsplit("\t", 1) for line in r.stdout.decode().splitlines())
    assert ours == go
    live = mixed.appliance("locate", "--", *keys[::6])
    assert live.returncode == 0, live.stderr.decode()
    assert dict(line.rsplit("\t", 1) for line in live.stdout.decode().splitlines()) == {k: go[k] for k in keys[::6]}
    FIGURES["ring_keys_agreeing"] = f"{sum(ours[k] == go[k] for k in keys)}/{len(keys)} (live ring: {len(keys[::6])})"


def test_fresh_connections_to_a_go_node_always_fall_back_to_plain_get(mixed):
    """The real reproducer of the error order: 30 times a new channel and a
    new PeerClient (nothing remembered) forward one Get to a seed node. Each
    answer comes from the Go owner by a plain Get, whatever the stream's
    errors said; none is loaded by our origin."""
    g0 = mixed.go[0].addr
    keys = owned(mixed.everyone(), "fresh", {g0: 30})[g0]
    before = mixed.loads()
    rows = mixed.agent.call("peer_client", addr=g0, group="scores", keys=keys)
    assert [r["error"] for r in rows] == [None] * len(keys)
    assert [base64.b64decode(r["value"]) for r in rows] == [b"v-" + k.encode() for k in keys]
    assert all(r["streaming"] is False for r in rows)
    assert mixed.loads() - before == expected({g0: keys})
    orders = Counter(f"first error {r['first_error']}, call ended {r['final_code']}" for r in rows)
    FIGURES["fresh_connections_error_orders"] = dict(orders)
    # The old rule (the first error must be UNIMPLEMENTED) would have loaded these locally:
    FIGURES["fresh_connections_old_rule_misses"] = (
        f"{sum(r['first_error'] != 'UNIMPLEMENTED' for r in rows)}/{len(rows)}"
    )


def test_python_to_go_across_join_leave_rounds(mixed):
    """Python -> Go: 5 rounds of a Go node leaving (SIGKILL; round 0 waits
    for its lease to expire, rounds 1-4 revoke it as a graceful leave would)
    and rejoining. Right after each rejoin, 72 Gets at once (each fresh key
    through both workers): every key is loaded exactly once, by its owner;
    0 keys owned by a Go node are loaded by our origin; peer_errors stays 0.
    Only while the killed node is still in the ring (round 0) does a Get
    for one of its keys count one peer error and load locally."""
    w0, w1 = mixed.workers
    g0, g1 = (n.addr for n in mixed.go)
    node = mixed.go[1]
    rounds = []
    for r in range(5):
        row: dict = {"round": r}
        node.kill()
        killed = time.monotonic()
        if r == 0:
            # Really down, still in the ring: the owner cannot answer, the value still comes.
            ring_before = mixed.app.admin_stats(0)["revision"]
            key = owned(mixed.everyone(), "down", {g1: 1})[g1][0]
            before, errs = mixed.loads(), peer_errors(mixed)
            assert_values(mixed, [(w0, "scores", key)])
            if mixed.app.admin_stats(0)["revision"] == ring_before:
                assert mixed.loads() - before == Counter({(w0, key): 1})
                assert [a - b for a, b in zip(peer_errors(mixed), errs, strict=True)] == [1, 0]
                row["down_owner_get"] = "1 peer error, loaded by our origin on w0"
            else:  # its lease ran out already (it cannot within 5 s of the kill)
                row["down_owner_get"] = "not checked: the ring changed first"
            row["leave"] = "kill, lease expiry"
        else:
            assert mixed.agent.call("revoke", key=f"groupcache/{g1}")
            row["leave"] = "kill, lease revoked"
        mixed.wait_ring(mixed.everyone(without=(g1,)))
        row["left_after_s"] = round(time.monotonic() - killed, 2)
        started = time.monotonic()
        node.start()
        mixed.wait_ring(mixed.everyone())
        row["in_ring_after_start_s"] = round(time.monotonic() - started, 2)

        keys = owned(mixed.everyone(), f"r{r}-ключ", {g0: 12, g1: 12, w0: 6, w1: 6})
        calls = [(w, "scores", k) for ks in keys.values() for k in ks for w in (w0, w1)]
        before, errs = mixed.loads(), peer_errors(mixed)
        assert_values(mixed, calls)
        delta = mixed.loads() - before
        row["gets"] = len(calls)
        row["loads"] = side_counts(delta, mixed)
        go_owned = set(keys[g0] + keys[g1])
        row["go_owned_loaded_by_python"] = sum(n for (who, k), n in delta.items() if who in (w0, w1) and k in go_owned)
        row["peer_errors_delta"] = [a - b for a, b in zip(peer_errors(mixed), errs, strict=True)]
        rounds.append(row)
        FIGURES["python_to_go_rounds"] = rounds
        owner = {k: o for o, ks in keys.items() for k in ks}
        extra = sorted((who, k, owner.get(k), n) for (who, k), n in (delta - expected(keys)).items())
        assert row["go_owned_loaded_by_python"] == 0, f"round {r}: {row}"
        missing = sorted(expected(keys) - delta)
        assert delta == expected(keys), (
            f"round {r}: {row}; extra loads (loader, key, owner, n): {extra}; missing {missing}"
        )
        assert row["peer_errors_delta"] == [0, 0]
    assert len(node.peer_lists()) == 6 and all(sorted(p) == mixed.everyone() for p in node.peer_lists())


def test_workers_serve_the_seed_on_the_engine(mixed):
    """With cluster.seed_interop too, server = "auto" picks the engine where
    it is built: it serves the Go clients' :authority "groupcache/<addr>"
    (tests/integration/test_transport_choice.py checks both backends)."""
    from appliance.fronts import engine_available

    want = "grpcio" if engine_available() else "engine"
    assert {mixed.app.admin_stats(i)["server"] for i in range(len(mixed.workers))} == {want}


def test_go_to_python(mixed):
    """Go -> Python (and Go -> Go): each seed node is asked for fresh keys
    owned by each of the four nodes; the seed's peer client fetches them from
    the owner (`etcd:///groupcache/<addr>`), which loads each exactly once."""
    everyone = mixed.everyone()
    for i, node in enumerate(mixed.go):
        keys = owned(everyone, f"go{i}-学生", {a: 4 for a in everyone})
        before, errs = mixed.loads(), peer_errors(mixed)
        assert_values(mixed, [(node.addr, "scores", k) for ks in keys.values() for k in ks])
        delta = mixed.loads() - before
        FIGURES.setdefault("go_to_python", []).append({"asked": node.addr, "loads": side_counts(delta, mixed)})
        assert delta == expected(keys)
        assert peer_errors(mixed) == errs


def test_seed_clients_against_our_workers(mixed):
    """The seed's peer client (seedclient get: a fresh etcd client, dial
    etcd:///groupcache/<addr>, Get) against each worker, for keys owned by
    that worker, the other worker and a Go node; the seed's round-robin
    client over etcd:///groupcache; etcd's own endpoints decoding."""
    everyone = mixed.everyone()
    w0, w1 = mixed.workers
    g0 = mixed.go[0].addr
    keys = owned(everyone, "client-ü", {w0: 2, w1: 2, g0: 2})
    before = mixed.loads()
    for worker in (w0, w1):
        for owner in (w0, w1, g0):
            key = keys[owner][0 if worker == w0 else 1]
            assert mixed.seedclient("get", "-addr", worker, "-key", key) == f'VALUE "v-{key}"'
    rr = owned(everyone, "rr", {a: 2 for a in everyone})
    for k in [k for ks in rr.values() for k in ks]:
        assert mixed.seedclient("rr", "-service", "groupcache", "-key", k) == f'VALUE "v-{k}"'
    assert mixed.loads() - before == expected(keys) + expected(rr)
    listed = mixed.run([str(seed.build() / "seedclient"), "list", "-etcd", mixed.ETCD, "-service", "groupcache"])
    rows = [line.split("\t") for line in listed.stdout.decode().splitlines() if line.count("\t") >= 2]
    assert sorted(addr for _, addr, _ in rows) == everyone
    FIGURES["seedclient"] = (
        f"get: 6/6 through our workers, rr: {sum(map(len, rr.values()))}/{sum(map(len, rr.values()))}"
    )


def test_clusters_prefix_lets_go_nodes_that_start_later_see_our_workers(mixed):
    """`seed_interop`: our workers' clusters/ entries are bare
    host:port values on their own registration leases; the Go nodes'
    entries are the operator's (no lease). Every Go node start (the second
    node started 6 times) read all four members."""
    entries = mixed.clusters()
    assert sorted(entries) == mixed.everyone()
    leases = {json.loads(v)["Addr"]: lease for v, lease in mixed.agent.etcd_prefix("groupcache/").values()}
    for worker in mixed.workers:
        assert entries[worker] != 0 and entries[worker] == leases[worker]
    for node in mixed.go:
        assert entries[node.addr] == 0
        assert all(sorted(p) == mixed.everyone() for p in node.peer_lists())
    # A worker that stops takes its entry with it; a restart puts it back.
    w1 = mixed.workers[1]
    r = mixed.appliance("stop-node", w1)
    assert r.returncode == 0, r.stderr.decode()
    wait_for(lambda: w1 not in mixed.clusters(), 15, what=f"clusters/{w1} gone")
    mixed.app.supervisor().startProcess("worker-1", True)
    wait_for(lambda: w1 in mixed.clusters(), 15, what=f"clusters/{w1} back")
    mixed.wait_ring(mixed.everyone())
    FIGURES["clusters_prefix"] = {
        a: ("worker lease" if lease else "operator, no lease") for a, lease in entries.items()
    }
