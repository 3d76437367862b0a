"""Benchmark 6: convergence. Time from a worker's death, a join and a
planned stop to every live worker holding the new ring, for N = 2, 4, 8.

Runs the real appliance (`appliance run`: supervisord, embedded etcd, the
controller, N workers) through tests/support/appliance.py's Appliance, and
reads every worker's ring (revision, peers) through its admin Stats on the
unix socket, polling every 10 ms over kept-open channels.

- death: the last worker is frozen (SIGSTOP, the moment it dies for the
  cluster: no more lease keepalives), told to stop by supervisord so it is
  not restarted, then SIGKILLed. Its etcd key goes when its lease expires,
  so lease_ttl bounds this one; the figure is also shown minus lease_ttl.
- join: supervisord starts the worker again; the time until every worker,
  the new one included, holds the full ring (and, inside it, the time until
  the new process first answers Stats).
- planned stop: `appliance stop-node ADDR` (the CLI, as an operator runs
  it); the time from running the command until the others hold the ring
  without it, and from the worker starting to drain.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fmt import num, opening, table
from goals import CONVERGENCE_SLACK_S, convergence_goal
from processes import OUT, PY, ROOT, log

LEASE_TTL = 2
POLL = 0.01
TIMEOUT = 30.0


class RingPoller:
    """Each worker's (revision, peers) over its admin socket, channels kept open."""

    def __init__(self, app) -> None:
        self.app = app
        self.channels: dict[int, Any] = {}  # worker index -> AdminClient

    def stats(self, i: int) -> dict | None:
        import grpc

        from appliance.admin_client import AdminClient

        sock = self.app.root / "run" / f"worker-{i}.sock"
        client = self.channels.get(i)
        if client is None:
            if not sock.exists():
                return None
            client = self.channels[i] = AdminClient(sock, timeout=0.5)
        try:
            return client.stats()
        except grpc.RpcError:
            self.drop(i)
            return None

    def drop(self, i: int) -> None:
        client = self.channels.pop(i, None)
        if client is not None:
            client.close()

    def close(self) -> None:
        for i in list(self.channels):
            self.drop(i)

    def wait(self, live: list[int], want: list[str], t0: float, *, extra=None) -> dict:
        """Poll until every worker in `live` holds exactly `want`; seconds from t0."""
        want_t = tuple(sorted(want))
        marks: dict[str, float] = {}
        deadline = t0 + TIMEOUT
        while True:
            now = time.monotonic()
            rings = []
            for i in live:
                s = self.stats(i)
                rings.append(None if s is None else (s["revision"], tuple(sorted(s["peers"]))))
                if extra is not None:
                    extra(i, s, now, marks)
            if all(r is not None and r[1] == want_t for r in rings) and len({r[0] for r in rings}) == 1:
                return {"seconds": now - t0, "revision": rings[0][0], "marks": {k: v - t0 for k, v in marks.items()}}
            if now > deadline:
                raise TimeoutError(f"ring {want_t} not reached in {TIMEOUT}s: {rings}")
            time.sleep(POLL)


def one_size(n: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from support.appliance import Appliance

    root = OUT / f"convergence-{n}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    app = Appliance(root, workers=n, lease_ttl=LEASE_TTL, drain="3s")
    poller = RingPoller(app)
    res: dict = {"workers": n, "lease_ttl": LEASE_TTL}
    try:
        t = time.monotonic()
        app.start()
        res["start_s"] = time.monotonic() - t
        addrs = app.addresses()
        all_idx = list(range(n))
        victim = n - 1
        name = f"worker-{victim}"
        others_idx, others = all_idx[:-1], addrs[:-1]
        poller.wait(all_idx, addrs, time.monotonic())
        sup = app.supervisor()

        # Death ------------------------------------------------------------
        pid = app.process_info()[name]["pid"]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        sup.stopProcess(name, False)  # supervisord will not restart it
        os.kill(pid, signal.SIGKILL)
        poller.drop(victim)
        r = poller.wait(others_idx, others, t0)
        res["death_s"] = r["seconds"]
        res["death_minus_ttl_s"] = r["seconds"] - LEASE_TTL
        log(f"  N={n}: death -> ring without it in {r['seconds']:.2f}s (lease_ttl {LEASE_TTL}s)")
        wait_for_state(sup, name, ("STOPPED", "EXITED"), 15)

        # Join -------------------------------------------------------------
        def up(i, s, now, marks):
            if i == victim and s is not None and "up" not in marks:
                marks["up"] = now

        t0 = time.monotonic()
        sup.startProcess(name, False)
        r = poller.wait(all_idx, addrs, t0, extra=up)
        res["join_s"] = r["seconds"]
        res["join_process_up_s"] = r["marks"].get("up")
        log(
            f"  N={n}: join -> full ring in {r['seconds']:.2f}s (process answering after "
            f"{r['marks'].get('up', float('nan')):.2f}s)"
        )

        # Planned stop -----------------------------------------------------
        def draining(i, s, now, marks):
            if i == victim and s is not None and s.get("draining") and "drain" not in marks:
                marks["drain"] = now

        t0 = time.monotonic()
        cli = subprocess.Popen(
            [str(Path(PY).parent / "appliance"), "stop-node", addrs[victim], "--config", str(app.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
        )
        try:
            r = _wait_stop(poller, others_idx, victim, others, t0, draining)
            out, _ = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                os.kill(cli.pid, signal.SIGKILL)
                cli.wait()
        res["stop_s"] = r["seconds"]
        drain = r["marks"].get("drain")
        res["stop_from_drain_s"] = None if drain is None else r["seconds"] - drain
        res["stop_cli_exit"] = cli.returncode
        res["stop_cli_output"] = out.decode(errors="replace").strip()[-300:]
        log(
            f"  N={n}: planned stop -> ring without it in {r['seconds']:.2f}s from the command"
            + ("" if drain is None else f", {r['seconds'] - drain:.2f}s from the worker draining")
        )
    finally:
        poller.close()
        app.cleanup()
    return res


def wait_for_state(supervisor, name: str, states: tuple[str, ...], timeout: float) -> str:
    """supervisord's state of `name` once it is one of `states`, or when `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        state = supervisor.getProcessInfo(name)["statename"]
        if state in states or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def _wait_stop(poller, others_idx, victim, others, t0, draining) -> dict:
    # The victim's own Stats is polled too (for the drain mark) but is not
    # required to hold the new ring: it leaves.
    want_t = tuple(sorted(others))
    marks: dict[str, float] = {}
    deadline = t0 + TIMEOUT
    while True:
        now = time.monotonic()
        draining(victim, poller.stats(victim), now, marks)
        rings = [poller.stats(i) for i in others_idx]
        rings = [None if s is None else (s["revision"], tuple(sorted(s["peers"]))) for s in rings]
        if all(r is not None and r[1] == want_t for r in rings) and len({r[0] for r in rings}) == 1:
            return {"seconds": now - t0, "marks": {k: v - t0 for k, v in marks.items()}}
        if now > deadline:
            raise TimeoutError(f"ring {want_t} not reached in {TIMEOUT}s: {rings}")
        time.sleep(POLL)


def run(cfg) -> dict:
    sizes = [int(x) for x in str(cfg.convergence_workers).split(",") if x]
    rows = []
    for n in sizes:
        log(f"convergence: N = {n} workers (real appliance, lease_ttl {LEASE_TTL}s)")
        rows.append(one_size(n))
    return {"rows": rows, "lease_ttl": LEASE_TTL}


def section(res: dict | None) -> list[str]:
    out, ran = opening("## 6. Convergence", res, "convergence")
    if not ran:
        return out
    out += [
        f"The real appliance (supervisord, embedded etcd, controller, N workers), lease_ttl = {res['lease_ttl']} s. "
        "Seconds until every live worker holds the same new ring (absolute; polled every 10 ms):",
        "",
    ]
    rows = []
    for r in res["rows"]:
        rows.append(
            [
                r["workers"],
                num(r["start_s"], 2),
                f"**{num(r['death_s'], 2)}**",
                num(r["death_minus_ttl_s"], 2),
                f"**{num(r['join_s'], 2)}**",
                num(r.get("join_process_up_s"), 2),
                f"**{num(r['stop_s'], 2)}**",
                r.get("stop_cli_exit"),
            ]
        )
    out += [
        table(
            [
                "N workers",
                "appliance start s",
                "death s",
                "death − lease_ttl s",
                "join s",
                "(new worker answering after s)",
                "planned stop s (from running stop-node)",
                "stop-node exit",
            ],
            rows,
        ),
        "",
        "![convergence](convergence.png)",
        "",
    ]
    return out


def plot(cv: dict, plt):
    if not cv.get("rows"):
        return None
    fig, a = plt.subplots(figsize=(6, 4))
    ns = [r["workers"] for r in cv["rows"]]
    w = 0.25
    kinds = (("death_s", "death (kill -9)"), ("join_s", "join"), ("stop_s", "planned stop (stop-node)"))
    for k, (key, label) in enumerate(kinds):
        a.bar([i + (k - 1) * w for i in range(len(ns))], [r.get(key) or 0 for r in cv["rows"]], w, label=label)
    bound = cv["lease_ttl"] + CONVERGENCE_SLACK_S
    a.axhline(cv["lease_ttl"], color="k", ls="--", alpha=0.5, label=f"lease_ttl ({cv['lease_ttl']} s)")
    a.axhline(bound, color="r", ls=":", alpha=0.5, label=f"lease_ttl + {CONVERGENCE_SLACK_S:g} s (design bound)")
    a.set_xticks(range(len(ns)), [f"N = {n}" for n in ns])
    a.set(ylabel="seconds until every live worker holds the new ring", title="Ring convergence (real appliance)")
    a.set_ylim(0, bound + 1)
    a.legend(fontsize=7, ncol=2, loc="upper right")
    return fig


FIGURES = {"convergence.png": plot}


def goal_rows(cv: dict) -> list[tuple[str, str, str, bool]]:
    if not cv.get("rows"):
        return []
    g = convergence_goal(cv["lease_ttl"])
    worst = max(max(r["death_s"], r["join_s"], r["stop_s"]) for r in cv["rows"])
    return [
        (
            "Convergence (death / join / planned stop)",
            f"≤ lease_ttl + {CONVERGENCE_SLACK_S:g} s = {g.threshold:g} s",
            "; ".join(
                f"N={r['workers']}: {r['death_s']:.2f} / {r['join_s']:.2f} / {r['stop_s']:.2f} s" for r in cv["rows"]
            ),
            g.met(worst),
        )
    ]
