"""Benchmark 8: warm membership changes. Origin loads, as a share of the
warm keys, caused by each membership change of a real appliance, with the
handoff and the peeks turned off (before: `handoff_bytes = 0`,
`peek_window = 0s`) and on (after: the defaults); plus what a kill -9
costs, and what a handoff of 30,000 × 1 KiB adds to a planned stop.

Runs the real appliance (`appliance run`: supervisord, embedded etcd, the
controller, 3 workers) through tests/support/appliance.py's Appliance, one
per key count and mode. The group's origin is `python:` (tests/support/
origin_values.counted): 1 KiB values derived from the key, and one line
per load appended to a file, so loads are counted exactly across worker
restarts. Every read is checked against that truth.

Before each change every key is read once at its owner (not counted), so
that each starts from every key held by its owner. Reads are GetMany
calls of 100 (during a change) or 500 keys through the workers
registered in etcd (polled every 0.1 s: where a client following
etcd sends them), spread over all of them, so most keys go through a
worker that forwards them to the owner. Per run: warm every key, then each
change in turn, with one reader thread during the change and one full read
of every key after it (the ring converged); the loads from the change's
start to the end of that read are the change's cost:

- rolling restart: SIGHUP after a group setting change (cache_bytes), so
  each worker is stopped (handoff) and started again (peeks) in turn;
- scale-out 3 → 4: SIGHUP with workers = 4;
- planned stop: `appliance stop-node` of one worker of 3 (back to 3
  workers first: SIGHUP with workers = 3, its cost not counted);
- kill -9 of one worker of 3, restarted by supervisord at once (the ring
  keeps its address): no handoff; what is not loaded again was recovered
  by hot copies on the other workers and by peeks.

Stop time: 2 workers, 30,000 keys of 1 KiB owned by worker-1, warmed;
`appliance stop-node` of worker-1 with the handoff off and on; the
worker's own stop time is read from its log lines (stopping → stopped).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from datetime import datetime

from fmt import opening, pct, table
from goals import GOALS
from processes import OUT, ROOT, log

sys.path.insert(0, str(ROOT / "tests"))  # support.appliance, support.origin_values

LEASE_TTL = 2
VALUE = 1024
KEY_COUNTS = (3000, 30000)
CHUNK = 500  # keys per GetMany
GROUPS = """
[groups.warm]
origin = "python:support.origin_values:counted"
cache_bytes = "{cache}"
"""
BEFORE_ENV = {"APPLIANCE_NODE__HANDOFF_BYTES": "0", "APPLIANCE_NODE__PEEK_WINDOW": "0s"}
CHANGES = ("rolling restart", "scale-out 3→4", "planned stop", "kill -9")
GOAL_CHANGES = CHANGES[:3]  # the goal's; a kill -9 is reported


def keys_of(n: int) -> list[str]:
    return [f"{VALUE}-k{i}" for i in range(n)]


class Reader:
    """GetMany through workers, every value checked against the origin's
    truth. A call a worker refuses as a whole (it is down) is tried once on
    another worker, as the client library would; a key's own error counts
    as failed, a wrong value as wrong."""

    def __init__(self) -> None:
        import grpc

        self.grpc = grpc
        self.channels: dict[str, object] = {}
        self.failed = self.wrong = self.ok = 0
        self.samples: list = []
        self.lock = threading.Lock()

    def _stub(self, addr: str):
        from appliance.pb import cache_pb2_grpc

        ch = self.channels.get(addr)
        if ch is None:
            ch = self.channels[addr] = self.grpc.insecure_channel(
                addr, options=[("grpc.max_receive_message_length", 64 << 20)]
            )
        return cache_pb2_grpc.CacheStub(ch)

    def get_many(self, keys: list[str], addrs: list[str], first: int) -> None:
        from appliance.pb import cache_pb2
        from support.origin_values import sized

        reply = None
        for attempt in range(2):
            addr = addrs[(first + attempt) % len(addrs)]
            try:
                reply = self._stub(addr).GetMany(cache_pb2.GetManyRequest(group="warm", keys=keys), timeout=10)
                break
            except self.grpc.RpcError as err:
                self.channels.pop(addr, None)
                last = f"{addr}: {err.code().name} {err.details()}"
        with self.lock:
            if reply is None:
                self.failed += len(keys)
                self.samples.append(last)
                return
            for r in reply.results:
                if r.code:
                    self.failed += 1
                    if len(self.samples) < 5:
                        self.samples.append(f"{r.key}: code {r.code} {r.error}")
                elif r.value != sized(r.key):
                    self.wrong += 1
                else:
                    self.ok += 1

    def all(self, keys: list[str], addrs: list[str]) -> None:
        chunks = [keys[i : i + CHUNK] for i in range(0, len(keys), CHUNK)]

        def part(t: int) -> None:
            for i, chunk in enumerate(chunks[t::2]):
                self.get_many(chunk, addrs, t + 2 * i)

        threads = [threading.Thread(target=part, args=(t,)) for t in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    def at_owners(self, keys: list[str], addrs: list[str]) -> None:
        """Every key read at its owner: it then holds it (a read through
        another worker may be answered from a hot copy or a handed-off one)."""
        from appliance.cache.ring import HashRing

        ring = HashRing(addrs)
        by_owner: dict[str, list[str]] = {}
        for k in keys:
            by_owner.setdefault(ring.owner(k), []).append(k)
        for owner, mine in by_owner.items():
            for i in range(0, len(mine), CHUNK):
                self.get_many(mine[i : i + CHUNK], [owner], 0)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()


class Members:
    """The workers registered in etcd, polled: where a client following etcd
    (appliance.client) sends its calls."""

    def __init__(self, app) -> None:
        self.app = app
        self.addrs: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def refresh(self) -> list[str]:
        import json

        client = self.app.etcd()
        try:
            self.addrs = sorted(json.loads(v)["Addr"] for v, _ in client.get_prefix("groupcache/"))
        finally:
            client.close()
        return self.addrs

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                self.refresh()
            except Exception:  # etcd busy: keep the last list
                pass

    def __call__(self) -> list[str]:
        return self.addrs

    def __enter__(self):
        self.refresh()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


class Background:
    """One thread reading 100 random keys at a time through `addrs()` until stopped."""

    def __init__(self, reader: Reader, keys: list[str], addrs) -> None:
        self.reader, self.keys, self.addrs = reader, keys, addrs
        self.stop = threading.Event()
        self.calls = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rnd = random.Random(7)
        while not self.stop.is_set() and self.calls < 100_000:
            self.reader.get_many(rnd.sample(self.keys, 100), self.addrs(), self.calls)
            self.calls += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def loaded(app) -> list[str]:
    """Every key the origin loaded so far, in order (one line per load)."""
    path = app.root / "loads.log"
    return path.read_text().splitlines() if path.exists() else []


def loads(app) -> int:
    return len(loaded(app))


def worker_pids(app) -> dict[str, int]:
    return {n: p["pid"] for n, p in app.process_info().items() if n.startswith("worker-") and p["pid"]}


def new_appliance(name: str, n_keys: int, mode: str, workers: int = 3, cache: str = "64MiB"):
    from support.appliance import Appliance

    root = OUT / f"warm-{name}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = {"PYTHONPATH": str(ROOT / "tests"), "APPLIANCE_TEST_LOADS": str(root / "loads.log")}
    if mode == "before":
        env.update(BEFORE_ENV)
    return Appliance(root, workers=workers, lease_ttl=LEASE_TTL, drain="3s", groups=GROUPS.format(cache=cache), env=env)


def one_run(n_keys: int, mode: str) -> dict:
    from support.appliance import wait_for

    app = new_appliance(f"{n_keys}-{mode}", n_keys, mode)
    keys = keys_of(n_keys)
    reader = Reader()
    res: dict = {"keys": n_keys, "mode": mode, "changes": {}}
    last: dict = {}
    members = None
    try:
        app.start()
        members = Members(app).__enter__()
        t = time.monotonic()
        reader.all(keys, members())
        res["warm_s"] = round(time.monotonic() - t, 2)
        res["warm_loads"] = loads(app)

        def change(name: str, act, settle) -> None:
            # From a known state: every key held by its owner (not counted).
            prep = loads(app)
            reader.at_owners(keys, members.refresh())
            start, t0 = loads(app), time.monotonic()
            with Background(reader, keys, members):
                act()
                settle()
            changed_s = time.monotonic() - t0
            reader.all(keys, members.refresh())
            keys_loaded = loaded(app)[start:]
            got = len(keys_loaded)
            res["changes"][name] = {
                "loads": got,
                "share": got / n_keys,
                "seconds": round(changed_s, 2),
                "distinct": len(set(keys_loaded)),
                "prep_loads": start - prep,
            }
            last["keys"] = set(keys_loaded)
            log(f"  {n_keys} keys, {mode}: {name}: {got} origin loads ({got / n_keys:.2%}) in {changed_s:.1f}s")

        # Rolling restart after a group setting change.
        before = worker_pids(app)

        def sighup_cache():
            app.groups = GROUPS.format(cache="48MiB")
            app.write_config()
            app.proc.send_signal(signal.SIGHUP)

        def restarted():
            wait_for(
                lambda: len(worker_pids(app)) == 3 and all(p != before[n] for n, p in worker_pids(app).items()),
                120,
                interval=0.1,
                what="every worker restarted",
            )
            app.wait_ring(3, timeout=30)

        change("rolling restart", sighup_cache, restarted)

        # Scale-out 3 -> 4.
        def grow():
            app.write_config(workers=4)
            app.proc.send_signal(signal.SIGHUP)

        def grown():
            app.wait_ring(4, timeout=30)

        change("scale-out 3→4", grow, grown)

        # Back to 3 (not counted), then a planned stop of one of 3.
        app.write_config(workers=3)
        app.proc.send_signal(signal.SIGHUP)
        app.wait_ring(3, timeout=30)
        wait_for(lambda: "worker-3" not in app.process_info(), 30, what="worker-3 removed")
        reader.all(keys, members.refresh())
        victim = app.addresses(3)[2]

        def stop_node():
            out = app.cli("stop-node", victim)
            assert out.returncode == 0, out.stderr

        change("planned stop", stop_node, lambda: app.wait_ring(2, members=app.addresses(2), timeout=10))

        # Worker-2 back (not counted), then kill -9 of one of 3.
        app.supervisor().startProcess("worker-2", True)
        app.wait_ring(3, timeout=30)
        reader.all(keys, members.refresh())
        victim_keys = owned_by(app, keys, 0)
        res["kill_victim_keys"] = owned = len(victim_keys)

        def kill():
            pid = app.process_info()["worker-0"]["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: worker_pids(app).get("worker-0") not in (None, pid), 30, interval=0.05, what="restart")

        def back():
            wait_for(lambda: app.admin_stats(0)["addr"] in app.admin_stats(0)["peers"], 30, what="worker-0 in its ring")
            app.wait_ring(3, timeout=30)

        change("kill -9", kill, back)
        # Its keys not loaded again, though its cache is gone (a key whose
        # owner is down is loaded, uncached, by whoever asks: counted once).
        res["kill_recovered"] = 1 - len(last["keys"] & victim_keys) / owned if owned else None
        res["kill_loaded_others"] = len(last["keys"] - victim_keys)
        stats = [app.admin_stats(i)["groups"]["warm"] for i in range(3)]
        res["evictions"] = sum(g["main_evictions"] + g["hot_evictions"] for g in stats)
        res["main_items"] = [g["main_items"] for g in stats]
        res["hot_items"] = sum(app.admin_stats(i)["groups"]["warm"]["hot_items"] for i in range(3))
        res["handoff_lines"] = handoff_lines(app)
    finally:
        if members is not None:
            members.__exit__()
        reader.close()
        app.cleanup()
    res["failed"], res["wrong"], res["reads_ok"] = reader.failed, reader.wrong, reader.ok
    res["samples"] = reader.samples[:5]
    return res


def owned_by(app, keys: list[str], index: int) -> set[str]:
    """The keys worker `index` owns in the ring of 3."""
    from appliance.cache.ring import HashRing

    ring = HashRing(app.addresses(3))
    addr = app.addresses(3)[index]
    return {k for k in keys if ring.owner(k) == addr}


HANDOFF_COUNTS = ("sent", "accepted", "refused", "failed", "cut", "bytes")
_HANDOFF = re.compile(
    r"role=(worker-\d+).*msg=handoff .*?" + " ".join(f"{k}=(\\d+)" for k in HANDOFF_COUNTS) + r" seconds=([\d.]+)"
)


def handoff_lines(app) -> list[dict]:
    out = []
    for line in app.log.read_text(errors="replace").splitlines():
        m = _HANDOFF.search(line)
        if m:
            w, *nums, secs = m.groups()
            counts = dict(zip(HANDOFF_COUNTS, map(int, nums), strict=True))
            out.append({"worker": w, **counts, "seconds": float(secs)})
    return out


def _stamp(line: str) -> float:
    return datetime.fromisoformat(line.split("time=", 1)[1].split(" ", 1)[0]).timestamp()


def stop_time(mode: str, n_keys: int = 30000) -> dict:
    """A planned stop of a worker holding n_keys × 1 KiB."""
    from appliance.cache.ring import HashRing

    app = new_appliance(f"stop-{mode}", n_keys, mode, workers=2)
    reader = Reader()
    try:
        app.start()
        addrs = app.addresses()
        ring = HashRing(addrs)
        keys, i = [], 0
        while len(keys) < n_keys:
            k = f"{VALUE}-s{i}"
            i += 1
            if ring.owner(k) == addrs[1]:
                keys.append(k)
        reader.all(keys, [addrs[1]])
        held = app.admin_stats(1)["groups"]["warm"]["main_items"]
        t0 = time.monotonic()
        out = app.cli("stop-node", addrs[1])
        cli_s = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        lines = [ln for ln in app.log.read_text(errors="replace").splitlines() if "role=worker-1" in ln]
        stopping = next(ln for ln in lines if "stopping " in ln and "deregistering" in ln)
        stopped = next(ln for ln in reversed(lines) if ln.rstrip().endswith(' stopped"'))
        worker_s = _stamp(stopped) - _stamp(stopping)
        received = app.admin_stats(0)["groups"]["warm"]["handoff_in_accepted"]
        handoff = handoff_lines(app)
    finally:
        reader.close()
        app.cleanup()
    res = {
        "mode": mode,
        "held": held,
        "stop_node_s": round(cli_s, 3),
        "worker_stop_s": round(worker_s, 3),
        "received": received,
        "handoff": handoff[-1] if handoff else None,
    }
    log(
        f"  stop of a worker holding {held} × 1 KiB, {mode}: worker {worker_s:.3f}s, stop-node {cli_s:.2f}s"
        + (f", handoff {handoff[-1]['seconds']:.3f}s ({handoff[-1]['accepted']} accepted)" if handoff else "")
    )
    return res


def run(cfg) -> dict:
    rows = []
    for n in KEY_COUNTS:
        for mode in ("before", "after"):
            log(f"warm: {n} keys of {VALUE} B, handoff and peeks {'off' if mode == 'before' else 'on'}")
            rows.append(one_run(n, mode))
    stops = {mode: stop_time(mode) for mode in ("before", "after")}
    added = stops["after"]["worker_stop_s"] - stops["before"]["worker_stop_s"]
    return {"rows": rows, "stop": stops, "stop_added_s": round(added, 3), "lease_ttl": LEASE_TTL, "value": VALUE}


def section(res: dict | None) -> list[str]:
    out, ran = opening("## 8. Warm membership changes", res, "warm")
    if not ran:
        return out
    out += [
        f"The real appliance, 3 workers, lease_ttl = {res['lease_ttl']} s, values of {res['value']} B; origin loads "
        "counted exactly (one line per load), as a share of the warm keys, from the change's start to the end of one "
        "full read after it; a reader thread runs during each change. Before: `handoff_bytes = 0`, "
        "`peek_window = 0s`; after: the defaults. A kill -9's loads include those made, uncached, by the other "
        "workers while the victim was down (a key may count more than once); the next column counts each of the "
        "victim's keys once.",
        "",
    ]
    rows = []
    for r in res["rows"]:
        cells = [f"{r['keys']:,}", r["mode"]]
        for c in CHANGES:
            ch = r["changes"].get(c)
            cells.append("–" if ch is None else f"**{ch['share']:.2%}** ({ch['loads']:,})")
        victim = r.get("kill_victim_keys")
        cells += [
            pct(r.get("kill_recovered")) + (f" of {victim:,}" if victim else ""),
            f"{r['failed']} / {r['wrong']}",
            f"{r['reads_ok']:,}",
        ]
        rows.append(cells)
    out += [
        table(
            [
                "warm keys",
                "handoff + peeks",
                "SIGHUP rolling restart",
                "scale-out 3→4 (SIGHUP)",
                "`appliance stop-node` (3 → 2)",
                "kill -9 (supervisord restarts it)",
                "kill -9: victim's keys not reloaded",
                "failed / wrong reads",
                "reads checked",
            ],
            rows,
        ),
        "",
    ]
    stop = res.get("stop") or {}
    if stop:
        b, a = stop["before"], stop["after"]
        h = a.get("handoff") or {}
        out += [
            f"Planned stop of a worker holding {a['held']:,} entries of {res['value']} B (2 workers): the worker's own "
            f"stop (log: stopping → stopped) {b['worker_stop_s']:.3f} s without the handoff, "
            f"{a['worker_stop_s']:.3f} s with it: **{res['stop_added_s']:.2f} s added**; the handoff itself "
            f"{h.get('seconds', float('nan')):.3f} s, "
            f"{h.get('accepted', 0):,} accepted, {h.get('refused', 0):,} refused; `stop-node` took "
            f"{b['stop_node_s']:.2f} s / {a['stop_node_s']:.2f} s.",
            "",
            "![warm](warm.png)",
            "",
        ]
    return out


def plot(wm: dict, plt):
    if not wm.get("rows"):
        return None
    fig, a = plt.subplots(figsize=(7, 4))
    runs = [(r["keys"], r["mode"]) for r in wm["rows"]]
    w = 0.8 / len(runs)
    for k, r in enumerate(wm["rows"]):
        xs = [i + (k - (len(runs) - 1) / 2) * w for i in range(len(CHANGES))]
        ys = [100 * r["changes"].get(c, {}).get("share", 0) for c in CHANGES]
        a.bar(
            xs,
            ys,
            w,
            label=f"{r['keys']:,} keys, {'handoff + peeks' if r['mode'] == 'after' else 'off'}",
            color=("C0" if r["mode"] == "after" else "C7"),
            alpha=1.0 if r["keys"] == wm["rows"][0]["keys"] else 0.6,
        )
    a.axhline(1, color="r", ls="--", label="goal: ≤ 1 %")
    a.set_xticks(range(len(CHANGES)), list(CHANGES))
    a.set(ylabel="origin loads, % of warm keys", title="Origin loads per membership change (real appliance, 3 workers)")
    a.legend(fontsize=7)
    return fig


FIGURES = {"warm.png": plot}


def pct_fine(x: float) -> str:
    """A share to 0.01 %: what the goal of ≤ 1 % needs."""
    return f"{x:.2%}"


def goal_rows(wm: dict) -> list[tuple[str, str, str, bool]]:
    if not wm.get("rows"):
        return []
    g = GOALS["warm_origin_share"]
    after = [r for r in wm["rows"] if r["mode"] == "after"]
    shares = [r["changes"][c]["share"] for r in after for c in GOAL_CHANGES]
    bad = sum(r["failed"] + r["wrong"] for r in wm["rows"])
    rows = [
        (
            "Warm membership changes: origin loads / warm keys (rolling restart, scale-out, planned stop)",
            f"{g.op} {g.threshold:.0%}, 0 failed or wrong reads",
            "; ".join(
                f"{r['keys']:,} keys: "
                + " / ".join(pct_fine(r["changes"][c]["share"]) for c in GOAL_CHANGES)
                + " (before: "
                + " / ".join(pct_fine(b["changes"][c]["share"]) for c in GOAL_CHANGES)
                + ")"
                for r in after
                for b in [next(x for x in wm["rows"] if x["mode"] == "before" and x["keys"] == r["keys"])]
            )
            + f"; {bad} failed or wrong",
            g.met(*shares) and bad == 0,
        )
    ]
    g = GOALS["warm_stop_added_s"]
    rows.append(
        (
            "Handoff of 30,000 × 1 KiB: time added to a planned stop",
            g.target(),
            f"{wm['stop_added_s']:.2f} s (handoff itself {wm['stop']['after']['handoff']['seconds']:.2f} s)"
            if wm["stop"]["after"].get("handoff")
            else f"{wm['stop_added_s']:.2f} s",
            g.met(wm["stop_added_s"]),
        )
    )
    return rows


if __name__ == "__main__":  # python bench/warm.py: this bench alone, printed
    import json

    print(json.dumps(run(None), indent=1, default=str))
