"""The report's figures, one function per PNG. Each takes the results and
an open matplotlib module and returns a Figure, or None when its benchmark
has no rows."""

from __future__ import annotations

from pathlib import Path

from fmt import size_label
from goals import CONVERGENCE_SLACK_S, GOALS

LABELS = {  # the servers drawn, in legend order; anything else in a row is ignored
    "seed": "seed's Go server",
    "memcached": "memcached (1 thread)",
    "echo": "bare grpc.aio echo",
    "engine": "worker, engine backend",
    "engine-tls": "worker, engine backend + TLS",
    "grpcio": "worker, grpcio backend",
}
STYLE = {
    "seed": ("D", "C2"),
    "memcached": ("P", "C5"),
    "echo": ("o", "C0"),
    "engine": ("s", "C1"),
    "engine-tls": ("^", "C4"),
    "grpcio": ("v", "C3"),
}


def _size_streams(hot: dict) -> int:
    sizes = [r for r in hot["rows"] if r["size"] != 100]
    return sizes[0]["streams"] if sizes else 8


def _sides(a, b, xs, rows) -> None:
    """Throughput on ``a``, Gets per server CPU-second on ``b``, per server
    measured at two x values or more (memcached has no 1 MiB point)."""
    for name, (marker, color) in STYLE.items():
        pts = [(x, r["servers"][name]) for x, r in zip(xs, rows, strict=True) if name in r["servers"]]
        if len(pts) < 2:
            continue
        px = [x for x, _ in pts]
        a.plot(px, [v["rps"] for _, v in pts], marker=marker, color=color, label=LABELS[name])
        b.plot(px, [v["gets_per_cpu_s"] for _, v in pts], marker=marker, color=color, label=LABELS[name])


def hot_get_concurrency(results: dict, plt):
    hot = results.get("hot_get") or {}
    if not hot.get("rows"):
        return None
    conc = [r for r in hot["rows"] if r["size"] == 100]
    xs = [r["streams"] for r in conc]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _sides(a, b, xs, conc)
    for ax, what in ((a, "Gets/s"), (b, "Gets per server CPU-second")):
        ax.set(
            xscale="log",
            xlabel="concurrent streams",
            ylabel=f"{what} (absolute, this box)",
            title=f"Hot Get, 100 B values: {what}",
        )
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(bottom=0)
    a.legend(fontsize=8)
    return fig


def hot_get_value_size(results: dict, plt):
    hot = results.get("hot_get") or {}
    if not hot.get("rows"):
        return None
    streams = _size_streams(hot)
    sizes = sorted({r["size"] for r in hot["rows"] if r["streams"] == streams})
    rows = [next(r for r in hot["rows"] if r["size"] == z and r["streams"] == streams) for z in sizes]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _sides(a, b, sizes, rows)
    for ax, what in ((a, "Gets/s"), (b, "Gets per server CPU-second")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [size_label(z) for z in sizes])
        ax.set(xlabel="value size", ylabel=f"{what} (absolute, this box)", title=f"Hot Get, {streams} streams: {what}")
    a.legend(fontsize=8)
    return fig


def getmany(results: dict, plt):
    gm = results.get("getmany") or {}
    if not gm.get("rows"):
        return None
    fig, a = plt.subplots(figsize=(6, 4))
    xs = [r["batch"] for r in gm["rows"]]
    a.plot(xs, [r["keys_per_s"] for r in gm["rows"]], "s-", label="worker GetMany (keys/s)")
    a.axhline(gm["memcached"]["gets_per_s"], color="C1", ls="--", label="memcached single-key gets/s")
    if gm["memcached"].get("multiget_keys_per_s"):
        a.axhline(
            gm["memcached"]["multiget_keys_per_s"],
            color="C2",
            ls=":",
            label=f"memcached multi-get of {gm['headline_batch']} (keys/s)",
        )
    a.set(
        xscale="log",
        yscale="log",
        xlabel="keys per GetMany call",
        ylabel="keys/s (absolute, this box)",
        title="GetMany on one worker vs memcached (1 thread)",
    )
    a.set_xticks(xs, [str(x) for x in xs])
    a.legend(fontsize=8)
    return fig


def storm(results: dict, plt):
    st = results.get("storm") or {}
    if not st.get("rows"):
        return None
    fig, a = plt.subplots(figsize=(6, 4))
    d = [r["delay_ms"] for r in st["rows"]]
    a.plot(d, [r["miss_p99_ms"] for r in st["rows"]], "s-", label="miss storm p99")
    a.plot(d, [r["miss_p50_ms"] for r in st["rows"]], "o-", alpha=0.6, label="miss storm p50")
    a.plot(d, [r["hit_p99_ms"] for r in st["rows"]], "^:", label="hit storm p99 (same 1,000 Gets, warm)")
    a.plot(d, d, "k--", alpha=0.5, label="origin delay")
    a.set(
        xscale="log",
        xlabel="origin delay, ms",
        ylabel="latency, ms",
        title=f"Miss storm: {st['gets']} Gets of {st['keys']} cold keys, {st['workers']} workers",
    )
    a.set_xticks(d, [str(x) for x in d])
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    return fig


def convergence(results: dict, plt):
    cv = results.get("convergence") or {}
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


def warm(results: dict, plt):
    wm = results.get("warm") or {}
    if not wm.get("rows"):
        return None
    changes = ("rolling restart", "scale-out 3→4", "planned stop", "kill -9")
    fig, a = plt.subplots(figsize=(7, 4))
    runs = [(r["keys"], r["mode"]) for r in wm["rows"]]
    w = 0.8 / len(runs)
    for k, r in enumerate(wm["rows"]):
        xs = [i + (k - (len(runs) - 1) / 2) * w for i in range(len(changes))]
        ys = [100 * r["changes"].get(c, {}).get("share", 0) for c in changes]
        a.bar(
            xs,
            ys,
            w,
            label=f"{r['keys']:,} keys, {'handoff + peeks' if r['mode'] == 'after' else 'off'}",
            color=("C0" if r["mode"] == "after" else "C7"),
            alpha=1.0 if r["keys"] == wm["rows"][0]["keys"] else 0.6,
        )
    a.axhline(1, color="r", ls="--", label="goal: ≤ 1 %")
    a.set_xticks(range(len(changes)), list(changes))
    a.set(ylabel="origin loads, % of warm keys", title="Origin loads per membership change (real appliance, 3 workers)")
    a.legend(fontsize=7)
    return fig


def memory(results: dict, plt):
    mem = results.get("memory") or {}
    if not mem.get("rows"):
        return None
    goal = GOALS["memory_1k"].threshold
    fig, a = plt.subplots(figsize=(6, 4))
    labels, vals, colors = [], [], []
    for r in mem["rows"]:
        labels.append(f"{'product' if r['store'] == 'product' else 'plain dict'}\n{size_label(r['value_size'])}")
        vals.append(r["rss_over_counted"])
        colors.append("C0" if r["store"] == "product" else "C7")
    a.bar(range(len(vals)), vals, color=colors)
    for i, v in enumerate(vals):
        a.text(i, v, f"{v:.2f}×", ha="center", va="bottom")
    a.axhline(goal, color="r", ls="--", label=f"goal at 1 KiB: ≤ {goal:g}×")
    a.set_xticks(range(len(vals)), labels)
    a.set(ylabel="RSS growth / counted bytes", title=f"Memory: group filled to {size_label(mem['cache_bytes'])}")
    a.legend(fontsize=8)
    return fig


def scaling(results: dict, plt):
    sc = results.get("scaling") or {}
    if not sc.get("rows"):
        return None
    fig, a = plt.subplots(figsize=(6, 4))
    ns = [r["workers"] for r in sc["rows"]]
    a.bar(range(len(ns)), [r["rps"] for r in sc["rows"]], color="C0")
    for i, r in enumerate(sc["rows"]):
        a.text(
            i,
            r["rps"],
            f"{r['speedup']:.2f}×\nclient {r['client_cpu_share']:.0%} of CPU",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    a.set_xticks(range(len(ns)), [f"N = {n}" for n in ns])
    a.set(
        ylabel="aggregate Gets/s (absolute, this box)",
        title=f"Scaling on {sc.get('cpus', '?')} cores (hot Gets, 100 B)",
    )
    a.set_ylim(top=max(r["rps"] for r in sc["rows"]) * 1.3)
    return fig


# File name -> the function that draws it.
FIGURES = {
    "hot_get_concurrency.png": hot_get_concurrency,
    "hot_get_value_size.png": hot_get_value_size,
    "getmany.png": getmany,
    "storm.png": storm,
    "convergence.png": convergence,
    "warm.png": warm,
    "memory.png": memory,
    "scaling.png": scaling,
}


def save_all(results: dict, out_dir: Path) -> list[str] | None:
    """Draw every figure that has data into ``out_dir``; the names written,
    or None without matplotlib (``make -C bench deps`` installs it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    made = []
    for name, draw in FIGURES.items():
        fig = draw(results, plt)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made
