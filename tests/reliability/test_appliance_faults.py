"""Faults of a real appliance under load: planned stop, kill -9 of a worker,
etcd down for 10 s, controller killed.

One `appliance run` (supervisord, embedded etcd, 3 workers, controller) is
shared by the tests of this module; each test starts by bringing every
program back and waiting for the full ring. Values are checked against the
origin's truth: the demo `scores` rows and a `files` group whose files this
module writes.

Reproduce the figures: .venv/bin/python -m pytest -s -q tests/reliability/test_appliance_faults.py
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from appliance.origins.demo import DEMO_ROWS
from support.appliance import Appliance, wait_for
from support.faults import Load, Stopwatch, against, assert_within, frozen, get_all, report, write_origin_files

pytestmark = pytest.mark.integration

LEASE_TTL = 2
GROUPS = """
[groups.scores]
origin = "sqlite:///{{state_dir}}/scores.db"
query = "SELECT score FROM students WHERE name = :key"
demo_seed = true

[groups.files]
origin = "file://{origin}"
cache_bytes = "8MiB"
"""


def _appliance(tmp_path_factory, server: str):
    root = tmp_path_factory.mktemp(f"faults-{server}")
    truth = write_origin_files(root / "origin", 300)
    truth.update({("files", f"absent-{i}"): None for i in range(20)})
    truth.update({("scores", name): str(score).encode() for name, score in DEMO_ROWS})
    truth.update({("scores", f"nobody-{i}"): None for i in range(5)})
    app = Appliance(
        root, workers=3, lease_ttl=LEASE_TTL, drain="3s", groups=GROUPS.format(origin=root / "origin"), server=server
    )
    app.truth = truth
    return app


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The appliance on the default server backend (`auto`: the engine where
    it is built, else grpcio)."""
    app = _appliance(tmp_path_factory, "auto")
    try:
        yield app.start()
    finally:
        app.cleanup()


@pytest.fixture(scope="module")
def grpcio_app(tmp_path_factory):
    """A second appliance on the grpcio backend, for the data-plane tests
    that must hold on both (started only when such a test asks for it)."""
    app = _appliance(tmp_path_factory, "grpcio")
    try:
        yield app.start()
    finally:
        app.cleanup()


def _whole(app: Appliance) -> Appliance:
    """Every program running and all workers on the full ring."""
    sup = app.supervisor()
    for name, info in app.process_info().items():
        if info["statename"] not in ("RUNNING", "STARTING"):
            sup.startProcess(name, True)
    app.wait_ring(3, timeout=30)
    return app


@pytest.fixture
def whole(app):
    return _whole(app)


@pytest.fixture(params=["auto", "grpcio"])
def whole_each_backend(request):
    """`whole`, on the default backend (the engine where built) and on grpcio,
    the portable one (planned stop and kill -9 are data-plane figures)."""
    from appliance.config import Settings
    from appliance.fronts import choose

    fixture = {"auto": "app", "grpcio": "grpcio_app"}[request.param]
    app = _whole(request.getfixturevalue(fixture))
    backends = {app.admin_stats(i)["server"] for i in range(3)}
    assert backends == {choose(Settings(node={"server": request.param}))[0]}, backends
    return app


def ring_of(app: Appliance, index: int) -> tuple[int, tuple[str, ...]]:
    stats = app.admin_stats(index)
    return stats["revision"], tuple(sorted(stats["peers"]))


def hold(app: Appliance, indexes: list[int], members: list[str]) -> bool:
    """Workers `indexes` all hold one ring (same revision) of exactly `members`."""
    rings = {ring_of(app, i) for i in indexes}
    return len(rings) == 1 and next(iter(rings))[1] == tuple(sorted(members))


# 1 --------------------------------------------------------------------------


def test_planned_stop_under_load_loses_nothing(whole_each_backend):
    """Figure held: 0 failed and 0 wrong requests from clients on the other
    nodes while `appliance stop-node` stops a worker (and after it)."""
    app = whole_each_backend
    addrs = app.addresses()
    victim, others = addrs[2], addrs[:2]
    load = Load(others, app.truth, threads_per_target=2, max_seconds=60)
    with load:
        load.wait_requests(300)
        before = load.mark()
        watch = Stopwatch()
        out = app.cli("stop-node", victim)
        stop_s = watch()
        wait_for(lambda: hold(app, [0, 1], others), 10, interval=0.02, what="ring without the stopped worker")
        ring_s = watch()
        during = load.mark()
        load.wait_requests(300)
        after = load.mark()
    report(
        f"planned stop, {app.admin_stats(0)['server']}",
        before=before,
        during_stop=during,
        after=after,
        total=load.all,
        stop_node_s=f"{stop_s:.2f}",
        ring_without_it_s=f"{ring_s:.2f}",
    )
    assert out.returncode == 0, out.stderr
    assert load.all.failed == 0 and load.all.wrong == 0, load.all.samples
    assert app.process_info()["worker-2"]["statename"] == "STOPPED"
    assert f"groupcache/{victim}" not in app.registered()


# 2 --------------------------------------------------------------------------


def test_kill_9_worker_under_load(whole_each_backend):
    """Figures held: on the surviving nodes at most 1% of requests fail and
    none is wrong; the ring without the killed worker converges within
    lease_ttl + 1 s of the kill (measured with supervisord held, so that
    the worker is not restarted before its lease expires); the restarted
    worker is back in every ring afterwards. A second, plain kill -9 (fast
    restart by supervisord) is measured the same way."""
    app = whole_each_backend
    addrs = app.addresses()
    others = addrs[:2]
    sup = app.supervisor()
    supervisord = sup.getPID()
    load = Load(others, app.truth, threads_per_target=2, max_seconds=90)
    with load:
        load.wait_requests(300)
        load.mark()
        # A: the worker stays dead until its lease expires.
        pid = app.process_info()["worker-2"]["pid"]
        with frozen(supervisord):
            os.kill(pid, signal.SIGKILL)
            watch = Stopwatch()
            wait_for(lambda: hold(app, [0, 1], others), LEASE_TTL + 10, interval=0.02, what="ring without worker-2")
            converge_s = watch()
            load.wait_requests(200)
        watch = Stopwatch()  # supervisord runs again and restarts worker-2
        app.wait_ring(3, timeout=30)
        back_s = watch()
        held = load.mark()
        load.wait_requests(200)
        # B: plain kill -9; supervisord restarts it at once.
        load.mark()
        before_rev = ring_of(app, 0)[0]
        pid = app.process_info()["worker-2"]["pid"]
        os.kill(pid, signal.SIGKILL)
        watch = Stopwatch()
        left = []

        def back() -> bool:
            if hold(app, [0, 1], others):
                left.append(watch())
            rings = [ring_of(app, i) for i in range(3)]
            return len(set(rings)) == 1 and rings[0][1] == tuple(addrs) and rings[0][0] > before_rev

        wait_for(back, 30, interval=0.02, what="restarted worker-2 in every ring")
        plain_back_s = watch()
        load.wait_requests(200)
        plain = load.mark()
    total = load.all
    report(
        f"kill -9, {app.admin_stats(0)['server']}",
        held_supervisord=held,
        ring_without_it_s=against(converge_s, LEASE_TTL + 1),
        back_in_ring_after_restart_s=f"{back_s:.2f}",
        plain_kill=plain,
        plain_left_ring=f"{left[0]:.2f}s" if left else "never",
        plain_back_in_ring_s=f"{plain_back_s:.2f}",
        total=total,
    )
    if total.samples:
        print("[kill -9 samples]", total.samples)
    assert total.wrong == 0, total.samples
    assert total.failed <= 0.01 * total.total, total.samples
    assert_within(converge_s, LEASE_TTL + 1, "ring without the killed worker")
    assert app.process_info()["worker-2"]["pid"] != pid


# 3 --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_etcd_down_10s_under_load(whole, mode):
    """Figures held: with etcd down for 10 s (kill: SIGKILL, restarted by
    supervisord after 10 s; hang: SIGSTOP, then SIGCONT, so that every lease
    has expired by etcd's clock), 0 failed and 0 wrong requests for warm keys
    on every node, every cold key is loaded and right, the rings stay as they
    were during the outage; once etcd answers again, every worker is
    registered within lease_ttl + 2 s (kill: under the lease it had, which
    the restarted etcd renewed and the worker kept alive; hang: under a new
    one, since the resumed etcd expired them all), and no
    request fails after either. After a kill, no ring ever shrinks."""
    app = whole
    addrs = app.addresses()
    cold = write_origin_files(app.root / "origin", 60, prefix=f"cold-{mode}-")
    warm = {k: v for k, v in app.truth.items()}
    for addr in addrs:  # warm every key on its owner, and the path from every node
        assert get_all(addr, warm).failed == 0
    old_leases = {r["lease"] for r in app.registered().values()}
    rings_before = app.rings()
    sup = app.supervisor()
    supervisord = sup.getPID()
    etcd_pid = app.process_info()["etcd"]["pid"]
    cold_out = []
    shrunk = []  # ring sizes below 3 seen after etcd came back
    load = Load(addrs, warm, threads_per_target=1, max_seconds=90)
    with load:
        load.wait_requests(300)
        load.mark()
        # kill: hold supervisord so that it does not restart etcd at once.
        with frozen(supervisord if mode == "kill" else etcd_pid):
            if mode == "kill":
                os.kill(etcd_pid, signal.SIGKILL)
            watch = Stopwatch()
            items = sorted(cold.items())
            for i, addr in enumerate(addrs):  # cold keys, a third through each node
                cold_out.append(get_all(addr, dict(items[i::3])))
            while watch() < 10.0:  # the outage lasts 10 s; the rings must not move
                assert app.rings() == rings_before
                time.sleep(0.25)
            outage = load.mark()
        released = Stopwatch()  # etcd restarts (kill) or resumes (hang)
        wait_for(lambda: app.registered() is not None, 30, interval=0.05, what="etcd answering")
        answering_s = released()
        watch = Stopwatch()

        def registered_again() -> bool:
            shrunk.extend(n for n in (len(p) for _, p in app.rings()) if n < 3)
            reg = app.registered()
            leases = {r["lease"] for r in reg.values()}
            # kill: the restarted etcd renews the leases it restores, and the
            # workers keep them; hang: the resumed etcd expires them all.
            kept = leases == old_leases if mode == "kill" else not (leases & old_leases)
            return sorted(reg) == sorted(f"groupcache/{a}" for a in addrs) and kept

        wait_for(registered_again, 30, interval=0.05, what="every worker registered again")
        again_s, again_released_s = watch(), released()
        if mode == "kill":
            # Kept alive, not just restored: unrenewed, a lease of lease_ttl would end within this.
            kept_until = time.monotonic() + 3 * LEASE_TTL
            while time.monotonic() < kept_until:
                assert registered_again(), app.registered()
                time.sleep(0.25)
            ring_s = 0.0  # no membership change: the same ring, the same revision
            assert app.rings() == rings_before
        else:

            def new_ring() -> bool:
                shrunk.extend(n for n in (len(p) for _, p in app.rings()) if n < 3)
                return hold(app, [0, 1, 2], addrs) and ring_of(app, 0)[0] > rings_before[0][0]

            wait_for(new_ring, 30, what="a new ring revision")
            ring_s = watch()
        load.wait_requests(300)
        after = load.mark()
    cold_total = sum((o.ok for o in cold_out), 0), sum((o.failed + o.wrong for o in cold_out), 0)
    report(
        f"etcd down 10 s ({mode})",
        warm_during_outage=outage,
        cold_keys_ok=f"{cold_total[0]}/{len(cold)} ({cold_total[1]} failed or wrong)",
        after=after,
        etcd_answering_s=f"{answering_s:.2f} after release",
        registered_again_s=(
            f"{against(again_s, LEASE_TTL + 2)} after etcd answered, {again_released_s:.2f} after release"
        ),
        same_ring_new_revision_s=f"{ring_s:.2f}",
        smallest_ring_seen=min(shrunk) if shrunk else 3,
    )
    assert outage.total > 0 and outage.failed == 0 and outage.wrong == 0, outage.samples
    assert cold_total == (len(cold), 0), [o.samples for o in cold_out]
    assert after.failed == 0 and after.wrong == 0, after.samples
    assert_within(again_s, LEASE_TTL + 2, "registered again")
    if mode == "kill":
        # A restarted etcd renews the leases it restores: no worker drops out.
        # (A resumed one expires them all; the ring then shrinks for a moment,
        # which is reported above as smallest_ring_seen, not held.)
        assert not shrunk, shrunk


# 4 --------------------------------------------------------------------------


def test_controller_killed_resyncs_the_ring(whole):
    """Figures held: workers keep serving (0 failed, 0 wrong) while the
    controller is dead; a worker leaves, then joins, while it is down, and
    each time the controller that supervisord restarts after kill -9
    brings every running worker to the new ring."""
    app = whole
    addrs = app.addresses()
    others = addrs[:2]
    sup = app.supervisor()
    load = Load(others, app.truth, threads_per_target=2, max_seconds=90)
    figures = {}
    with load:
        load.wait_requests(300)
        load.mark()
        # Leave: worker-2 stops gracefully while the controller is frozen
        # (it drains for drain_timeout since no ring without it arrives).
        controller = app.process_info()["controller"]["pid"]
        with frozen(controller):
            sup.stopProcess("worker-2", True)
            assert f"groupcache/{addrs[2]}" not in app.registered()
            assert all(ring_of(app, i)[1] == tuple(addrs) for i in (0, 1))  # nobody told them yet
            os.kill(controller, signal.SIGKILL)
            watch = Stopwatch()
        wait_for(lambda: hold(app, [0, 1], others), 30, interval=0.02, what="ring without worker-2")
        figures["leave_resync_s"] = f"{watch():.2f}"
        figures["while_leaving"] = load.mark()
        # Join: worker-2 starts while the controller is frozen.
        controller = app.process_info()["controller"]["pid"]
        wait_for(lambda: app.process_info()["controller"]["statename"] == "RUNNING", 30, what="controller up")
        controller = app.process_info()["controller"]["pid"]
        with frozen(controller):
            sup.startProcess("worker-2", True)
            wait_for(lambda: f"groupcache/{addrs[2]}" in app.registered(), 30, what="worker-2 registered")
            assert ring_of(app, 2)[1] == ()  # no ring pushed to it yet
            os.kill(controller, signal.SIGKILL)
            watch = Stopwatch()
        wait_for(lambda: hold(app, [0, 1, 2], addrs), 30, interval=0.02, what="ring with worker-2")
        figures["join_resync_s"] = f"{watch():.2f}"
        load.wait_requests(200)
        figures["while_joining"] = load.mark()
    figures["total"] = load.all
    report("controller killed", **figures)
    assert load.all.failed == 0 and load.all.wrong == 0, load.all.samples
    assert app.process_info()["controller"]["pid"] != controller


# 5 --------------------------------------------------------------------------


def test_hung_worker_does_not_delay_the_ring_of_the_others(whole):
    """Figure held: with worker-0 hung (SIGSTOP: its admin socket accepts but
    never answers) and worker-2 killed at the same moment, worker-1 holds the
    ring of the survivors within lease_ttl + 1 s; after worker-0 resumes and
    worker-2 is restarted, all three are back in one ring."""
    app = whole
    addrs = app.addresses()
    sup = app.supervisor()
    supervisord = sup.getPID()
    hung, dead = app.process_info()["worker-0"]["pid"], app.process_info()["worker-2"]["pid"]
    load = Load([addrs[1]], app.truth, threads_per_target=2, max_seconds=60)
    with load:
        load.wait_requests(200)
        load.mark()
        with frozen(supervisord), frozen(hung):
            os.kill(dead, signal.SIGKILL)
            watch = Stopwatch()
            wait_for(
                lambda: hold(app, [1], [addrs[1]]), LEASE_TTL + 15, interval=0.02, what="worker-1 alone in its ring"
            )
            alone_s = watch()
            load.wait_requests(200)
        watch = Stopwatch()
        app.wait_ring(3, timeout=30)
        back_s = watch()
        load.wait_requests(200)
    report(
        "hung worker",
        survivor_ring_s=against(alone_s, LEASE_TTL + 1),
        all_back_s=f"{back_s:.2f}",
        load_on_worker_1=load.all,
    )
    assert_within(alone_s, LEASE_TTL + 1, "survivors' ring without the hung worker")
    assert load.all.failed <= 0.01 * load.all.total and load.all.wrong == 0, load.all.samples
