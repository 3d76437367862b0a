"""Render bench/results.md and the PNG plots from bench/out/results.json."""

from __future__ import annotations

import math

import lib

BENCH = lib.BENCH
RESULTS_MD = BENCH / "results.md"


# Formatting ------------------------------------------------------------------


def num(x, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def ratio(x, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}×"


def pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def size_label(n: int) -> str:
    if n >= 1 << 20:
        return f"{n >> 20} MiB"
    if n >= 1024:
        return f"{n >> 10} KiB"
    return f"{n} B"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def ok(flag) -> str:
    return "met" if flag else "**not met**"


def missing(res: dict | None, name: str) -> str | None:
    if not res:
        return f"_{name} has not been run yet (`python bench/run.py {name}`)._"
    if "error" in res:
        return f"_{name} failed in this run: `{res['error']}`_"
    if "skipped" in res:
        return f"_{name} skipped: {res['skipped']}_"
    return None


# Plots -----------------------------------------------------------------------


def plots(results: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lib.log("matplotlib is not installed: no plots (make -C bench deps)")
        return []
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(BENCH / name, dpi=110)
        plt.close(fig)
        made.append(name)

    hot = results.get("hot_get") or {}
    if hot.get("rows"):
        conc = [r for r in hot["rows"] if r["size"] == 100]
        xs = [r["streams"] for r in conc]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name, marker, color in (("echo", "o", "C0"), ("worker", "s", "C1")):
            a.plot(xs, [r[name]["rps"] for r in conc], marker=marker, color=color, label=_label(name))
            b.plot(xs, [r[name]["p50_ms"] for r in conc], marker=marker, color=color, label=f"{_label(name)} p50")
            b.plot(xs, [r[name]["p99_ms"] for r in conc], marker=marker, color=color, ls="--", alpha=0.5,
                   label=f"{_label(name)} p99")
        a.set(xscale="log", xlabel="concurrent streams", ylabel="Gets/s (absolute, this box)",
              title="Hot Get, 100 B values: throughput")
        a.set_xticks(xs, [str(x) for x in xs])
        a.set_ylim(bottom=0)
        b.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="latency, ms",
              title="Hot Get, 100 B values: latency")
        b.set_xticks(xs, [str(x) for x in xs])
        a.legend()
        b.legend(fontsize=8)
        save(fig, "hot_get_concurrency.png")

        sizes = sorted({r["size"] for r in hot["rows"] if r["streams"] == _size_streams(hot)})
        rows = [next(r for r in hot["rows"] if r["size"] == z and r["streams"] == _size_streams(hot)) for z in sizes]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name, marker, color in (("echo", "o", "C0"), ("worker", "s", "C1")):
            if not all(name in r for r in rows):
                continue
            a.plot(sizes, [r[name]["rps"] for r in rows], marker=marker, color=color, label=_label(name))
            b.plot(sizes, [r[name]["p50_ms"] for r in rows], marker=marker, color=color, label=f"{_label(name)} p50")
            b.plot(sizes, [r[name]["p99_ms"] for r in rows], marker=marker, color=color, ls="--", alpha=0.5,
                   label=f"{_label(name)} p99")
        for ax in (a, b):
            ax.set_xscale("log")
            ax.set_xticks(sizes, [size_label(z) for z in sizes])
            ax.set_xlabel("value size")
        a.set(ylabel="Gets/s (absolute, this box)", title=f"Hot Get, {_size_streams(hot)} streams: throughput")
        a.set_ylim(bottom=0)
        b.set(yscale="log", ylabel="latency, ms", title=f"Hot Get, {_size_streams(hot)} streams: latency")
        a.legend(fontsize=8)
        b.legend(fontsize=7)
        save(fig, "hot_get_value_size.png")

    gm = results.get("getmany") or {}
    if gm.get("rows"):
        fig, a = plt.subplots(figsize=(6, 4))
        xs = [r["batch"] for r in gm["rows"]]
        a.plot(xs, [r["keys_per_s"] for r in gm["rows"]], "s-", label="worker GetMany (keys/s)")
        a.axhline(gm["memcached"]["gets_per_s"], color="C1", ls="--", label="memcached single-key gets/s")
        if gm["memcached"].get("multiget_keys_per_s"):
            a.axhline(gm["memcached"]["multiget_keys_per_s"], color="C2", ls=":",
                      label=f"memcached multi-get of {gm['headline_batch']} (keys/s)")
        a.set(xscale="log", yscale="log", xlabel="keys per GetMany call", ylabel="keys/s (absolute, this box)",
              title="GetMany on one worker vs memcached (1 thread)")
        a.set_xticks(xs, [str(x) for x in xs])
        a.legend(fontsize=8)
        save(fig, "getmany.png")

    st = results.get("storm") or {}
    if st.get("rows"):
        fig, a = plt.subplots(figsize=(6, 4))
        d = [r["delay_ms"] for r in st["rows"]]
        a.plot(d, [r["miss_p99_ms"] for r in st["rows"]], "s-", label="miss storm p99")
        a.plot(d, [r["miss_p50_ms"] for r in st["rows"]], "o-", alpha=0.6, label="miss storm p50")
        a.plot(d, [r["hit_p99_ms"] for r in st["rows"]], "^:", label="hit storm p99 (same 1,000 Gets, warm)")
        a.plot(d, d, "k--", alpha=0.5, label="origin delay")
        a.set(xscale="log", xlabel="origin delay, ms", ylabel="latency, ms",
              title=f"Miss storm: {st['gets']} Gets of {st['keys']} cold keys, 3 workers")
        a.set_xticks(d, [str(x) for x in d])
        a.set_ylim(bottom=0)
        a.legend(fontsize=8)
        save(fig, "storm.png")

    cv = results.get("convergence") or {}
    if cv.get("rows"):
        fig, a = plt.subplots(figsize=(6, 4))
        ns = [r["workers"] for r in cv["rows"]]
        w = 0.25
        for k, (key, label) in enumerate((("death_s", "death (kill -9)"), ("join_s", "join"),
                                          ("stop_s", "planned stop (stop-node)"))):
            a.bar([i + (k - 1) * w for i in range(len(ns))], [r.get(key) or 0 for r in cv["rows"]], w, label=label)
        a.axhline(cv["lease_ttl"], color="k", ls="--", alpha=0.5, label=f"lease_ttl ({cv['lease_ttl']} s)")
        a.axhline(cv["lease_ttl"] + 1, color="r", ls=":", alpha=0.5, label="lease_ttl + 1 s (design bound)")
        a.set_xticks(range(len(ns)), [f"N = {n}" for n in ns])
        a.set(ylabel="seconds until every live worker holds the new ring", title="Ring convergence (real appliance)")
        a.set_ylim(0, cv["lease_ttl"] + 2)
        a.legend(fontsize=7, ncol=2, loc="upper right")
        save(fig, "convergence.png")

    mem = results.get("memory") or {}
    if mem.get("rows"):
        fig, a = plt.subplots(figsize=(6, 4))
        labels, vals, colors = [], [], []
        for r in mem["rows"]:
            labels.append(f"{'product' if r['store'] == 'product' else 'plain dict'}\n{size_label(r['value_size'])}")
            vals.append(r["rss_over_counted"])
            colors.append("C0" if r["store"] == "product" else "C7")
        a.bar(range(len(vals)), vals, color=colors)
        for i, v in enumerate(vals):
            a.text(i, v, f"{v:.2f}×", ha="center", va="bottom")
        a.axhline(mem["goal_1k"], color="r", ls="--", label=f"goal at 1 KiB: ≤ {mem['goal_1k']}×")
        a.set_xticks(range(len(vals)), labels)
        a.set(ylabel="RSS growth / counted bytes", title=f"Memory: group filled to {size_label(mem['cache_bytes'])}")
        a.legend(fontsize=8)
        save(fig, "memory.png")

    sc = results.get("scaling") or {}
    if sc.get("rows"):
        fig, a = plt.subplots(figsize=(6, 4))
        ns = [r["workers"] for r in sc["rows"]]
        a.bar(range(len(ns)), [r["rps"] for r in sc["rows"]], color="C0")
        for i, r in enumerate(sc["rows"]):
            a.text(i, r["rps"], f"{r['speedup']:.2f}×\nclient {r['client_cpu_share']:.0%} of CPU", ha="center",
                   va="bottom", fontsize=8)
        a.set_xticks(range(len(ns)), [f"N = {n}" for n in ns])
        a.set(ylabel="aggregate Gets/s (absolute, this box)",
              title=f"Scaling on {sc.get('cpus', '?')} cores (hot Gets, 100 B)")
        a.set_ylim(top=max(r["rps"] for r in sc["rows"]) * 1.3)
        save(fig, "scaling.png")
    return made


def _label(name: str) -> str:
    return {"echo": "bare grpc.aio echo", "worker": "worker (product)"}.get(name, name)


def _size_streams(hot: dict) -> int:
    sizes = [r for r in hot["rows"] if r["size"] != 100]
    return sizes[0]["streams"] if sizes else 8


# Markdown --------------------------------------------------------------------


def render(results: dict) -> None:
    made = plots(results)
    RESULTS_MD.write_text(markdown(results, made))
    lib.log(f"wrote {RESULTS_MD.relative_to(lib.ROOT)}" + (f" and {', '.join(made)}" if made else ""))
    print()
    print(headline_table(results))


def headline(results: dict) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) rows."""
    rows = []
    hot = results.get("hot_get") or {}
    if hot.get("rows"):
        conc = [r for r in hot["rows"] if r["size"] == 100]
        med = lib.median([r["rps_ratio"] for r in conc])
        cpu = lib.median([1 / r["cpu_ratio"] for r in conc])
        rows.append(("Hot Get vs bare grpc.aio echo (100 B)", "≥ 0.9×",
                     f"throughput {ratio(med)} (median over 1–128 streams; "
                     f"{', '.join(ratio(r['rps_ratio']) for r in conc)}); CPU efficiency {ratio(cpu)}",
                     ok(med >= 0.9)))
        big = [r for r in hot["rows"] if r["size"] >= 65536]
        if big:
            rows.append(("Hot Get vs echo, large values", "≥ 0.9×",
                         "; ".join(f"{size_label(r['size'])}: {ratio(r['rps_ratio'])}" for r in big),
                         ok(all(r["rps_ratio"] >= 0.9 for r in big))))
    fw = results.get("forwarded") or {}
    if fw.get("rows"):
        r1 = fw["rows"][0]
        worst = max(r1["throughput_cost"], r1["p50_cost"])
        rows.append(("Forwarded Get vs local hit (cost)", "≤ 2.2×",
                     f"{r1['streams']} stream: throughput {ratio(r1['throughput_cost'])}, p50 {ratio(r1['p50_cost'])}, "
                     f"CPU/Get {ratio(r1['cpu_cost'])}"
                     + (f"; seen from a grpc.aio client: p50 {ratio(fw['peer_call']['python_client_p50_cost'])}"
                        if fw.get("peer_call", {}).get("python_client_p50_cost") else "")
                     + "".join(f"; {r['streams']} streams: {ratio(r['throughput_cost'])} "
                               f"({r['forwards_per_get']:.2f} calls to the owner per Get)" for r in fw["rows"][1:]),
                     ok(worst <= 2.2)))
    gm = results.get("getmany") or {}
    if gm.get("rows"):
        head = next(r for r in gm["rows"] if r["batch"] == gm["headline_batch"])
        rows.append((f"GetMany keys/s (batches of {gm['headline_batch']}) vs memcached single-key gets/s", "≥ 1×",
                     f"{ratio(gm['ratio'])} ({num(head['keys_per_s'])} vs {num(gm['memcached']['gets_per_s'])}/s; "
                     f"vs memcached's own multi-get: {ratio(head.get('ratio_vs_memcached_multiget'))})",
                     ok(gm["ratio"] >= 1)))
    st = results.get("storm") or {}
    if st.get("rows"):
        loads_ok = all(all(x == st["keys"] for x in r["origin_loads"]) for r in st["rows"])
        rows.append((f"Miss storm: origin loads for {st['gets']} Gets of {st['keys']} cold keys", f"exactly {st['keys']}",
                     ", ".join(f"{r['origin_loads']}" for r in st["rows"]) + " (per storm)", ok(loads_ok)))
        rows.append(("Miss storm p99 vs origin delay", "report",
                     "; ".join(f"{r['delay_ms']} ms: p99 {num(r['miss_p99_ms'], 0)} ms ({ratio(r['p99_over_delay'])}; "
                               f"warm floor {num(r['hit_p99_ms'], 0)} ms)" for r in st["rows"]), "reported"))
    mem = results.get("memory") or {}
    if mem.get("rows"):
        prod = {r["value_size"]: r for r in mem["rows"] if r["store"] == "product"}
        if 1024 in prod:
            rows.append(("Memory: RSS growth / counted bytes at 1 KiB", f"≤ {mem['goal_1k']}×",
                         ratio(prod[1024]["rss_over_counted"]) + (f" (100 B: {ratio(prod[100]['rss_over_counted'])}, "
                                                                   f"{num(prod[100]['overhead_per_entry'])} B/entry)"
                                                                   if 100 in prod else ""),
                         ok(prod[1024]["rss_over_counted"] <= mem["goal_1k"])))
    cv = results.get("convergence") or {}
    if cv.get("rows"):
        bound = cv["lease_ttl"] + 1
        worst = max(max(r["death_s"], r["join_s"], r["stop_s"]) for r in cv["rows"])
        rows.append(("Convergence (death / join / planned stop)", f"≤ lease_ttl + 1 s = {bound} s",
                     "; ".join(f"N={r['workers']}: {r['death_s']:.2f} / {r['join_s']:.2f} / {r['stop_s']:.2f} s"
                               for r in cv["rows"]), ok(worst <= bound)))
    sc = results.get("scaling") or {}
    if sc.get("rows") and len(sc["rows"]) > 1:
        last = sc["rows"][-1]
        rows.append((f"Scaling N = {sc['rows'][0]['workers']} → {last['workers']} on {sc.get('cpus')} cores", "report",
                     f"{ratio(last['speedup'])} aggregate; client CPU share "
                     + ", ".join(pct(r["client_cpu_share"]) for r in sc["rows"]), "reported"))
    return rows


def headline_table(results: dict) -> str:
    return table(["goal", "target", "measured (this run)", "verdict"], [list(r) for r in headline(results)])


def markdown(results: dict, made: list[str]) -> str:
    m = results.get("machine", {})
    parts = [
        "# Benchmark results",
        "",
        "Generated by `make bench` (`bench/run.py`, then `bench/report.py`) from `bench/out/results.json`; "
        "do not edit by hand. How each figure is measured: [README.md](README.md).",
        "",
        f"Machine: {m.get('cpus', '?')} cores ({m.get('cpu', '?')}), Linux {m.get('kernel', '?')}, "
        f"Python {m.get('python', '?')}, grpcio {m.get('grpcio', '?')}, protobuf {m.get('protobuf', '?')}, "
        f"{m.get('h2load', '?')}, {m.get('memcached', '?')}; run on {m.get('date', '?')}.",
        "",
        "Every figure is either a ratio against a baseline measured in the same run (runs of the two sides "
        "alternate, and the ratio is the median of per-round ratios) or is marked **absolute** (true of this "
        "machine only). This box is shared: the `others` columns give the CPU (in cores) the rest of the box used "
        "during the runs, and the load average before each benchmark is listed at its section.",
        "",
        "## Goals",
        "",
        headline_table(results),
        "",
    ]
    parts += section_hot(results.get("hot_get"))
    parts += section_forwarded(results.get("forwarded"))
    parts += section_getmany(results.get("getmany"))
    parts += section_storm(results.get("storm"))
    parts += section_memory(results.get("memory"))
    parts += section_convergence(results.get("convergence"))
    parts += section_scaling(results.get("scaling"))
    parts += section_profile(results.get("profile"), results.get("hot_get"))
    return "\n".join(parts) + "\n"


def _conditions(res: dict) -> str:
    return (f"_Run {res.get('when', '?')}, {res.get('elapsed_s', '?')} s; load average before "
            f"{res.get('loadavg_before', '?')}, other processes on {res.get('other_cores_before', '?')} cores._")


def section_hot(res) -> list[str]:
    out = ["## 1. Hot Get: one worker vs a bare grpc.aio echo server", ""]
    if (msg := missing(res, "hot_get")):
        return out + [msg, ""]
    out += [_conditions(res), ""]
    rows = []
    for r in res["rows"]:
        rows.append([size_label(r["size"]), r["streams"], num(r["echo"]["rps"]), num(r["worker"]["rps"]),
                     f"**{ratio(r['rps_ratio'])}**", f"{num(r['echo']['p50_ms'], 2)} / {num(r['worker']['p50_ms'], 2)}",
                     ratio(r["p50_ratio"]), f"{num(r['echo']['p99_ms'], 2)} / {num(r['worker']['p99_ms'], 2)}",
                     ratio(r["p99_ratio"]), f"{num(r['echo']['cpu_us_per_req'])} / {num(r['worker']['cpu_us_per_req'])}",
                     ratio(r["cpu_ratio"]), pct(r["worker"]["client_cpu_share"]), num(r["worker"].get("other_cpu_cores"), 2)])
    out += [table(["value", "streams", "echo Gets/s (abs.)", "worker Gets/s (abs.)", "worker/echo",
                   "p50 ms echo / worker (abs.)", "p50 ratio", "p99 ms echo / worker (abs.)", "p99 ratio",
                   "server CPU µs per Get echo / worker (abs.)", "CPU ratio", "h2load CPU share", "others"], rows), ""]
    out += ["![hot Get against concurrency](hot_get_concurrency.png)", "",
            "![hot Get against value size](hot_get_value_size.png)", ""]
    c = res.get("check", {})
    out += [f"Check: the worker counted {num(c.get('worker_main_hits'))} main-cache hits for "
            f"{num(c.get('worker_requests'))} Gets that h2load completed, and {c.get('loads_during_runs')} loads "
            "during the runs (every measured Get was a hit).", ""]
    return out


def section_forwarded(res) -> list[str]:
    out = ["## 2. Forwarded Get vs local hit", ""]
    if (msg := missing(res, "forwarded")):
        return out + [msg, ""]
    out += [_conditions(res), "",
            "Two workers, `hot_cache_mirror = 0`. Local: the key sent to its owner. Forwarded: the same key sent to "
            "the other worker, which calls the owner. Cost = forwarded / local.", ""]
    rows = []
    for r in res["rows"]:
        rows.append([r["streams"], num(r["local"]["rps"]), num(r["forwarded"]["rps"]), f"**{ratio(r['throughput_cost'])}**",
                     f"{num(r['local']['p50_ms'], 3)} / {num(r['forwarded']['p50_ms'], 3)}", f"**{ratio(r['p50_cost'])}**",
                     ratio(r["p99_cost"]),
                     f"{num(r['local']['cpu_us_per_req'])} / {num(r.get('forwarder_cpu_us_per_req'))} + "
                     f"{num(r.get('owner_cpu_us_per_req'))}", ratio(r["cpu_cost"]), f"{r['forwards_per_get']:.2f}",
                     num(r["forwarded"].get("other_cpu_cores"), 2)])
    out += [table(["streams", "local Gets/s (abs.)", "forwarded Gets/s (abs.)", "throughput cost",
                   "p50 ms local / fwd (abs.)", "p50 cost", "p99 cost",
                   "CPU µs per Get: local / forwarder + owner (abs.)", "CPU cost", "owner calls per Get", "others"],
                  rows), ""]
    pc = res.get("peer_call")
    if pc:
        local1 = res["rows"][0]["local"]["p50_ms"]
        fwd1 = res["rows"][0]["forwarded"]["p50_ms"]
        out += [f"**Where the forwarded time goes (1 stream).** A grpc.aio client making the forwarder's call "
                f"(deadline, forwarded metadata, trailers) to the owner sees p50 {num(pc['pyclient_p50_ms'], 3)} ms, "
                f"{ratio(pc['pyclient_vs_h2load'])} what h2load sees on the same owner ({num(pc['h2load_p50_ms'], 3)} ms): "
                "the client side of a grpc.aio call costs more than the server side. The local hit's p50 "
                f"({num(local1, 3)} ms) plus that peer call ({num(pc['pyclient_p50_ms'], 3)} ms) is "
                f"{num(local1 + pc['pyclient_p50_ms'], 3)} ms, against {num(fwd1, 3)} ms measured forwarded: the "
                "forwarder adds little beyond the one extra call, but that call, made from Python, is dearer than "
                "the h2load-driven local hit it is compared with. Seen from a Python application (the same "
                f"grpc.aio client on both sides), forwarded / local p50 is **{ratio(pc['python_client_p50_cost'])}** "
                f"({num(pc['pyclient_forwarded_p50_ms'], 3)} vs {num(pc.get('pyclient_local_p50_ms'), 3)} ms).", ""]
    out += ["With one stream every Get costs the forwarder one call to the owner. With many streams the "
            "forwarder's singleflight joins concurrent misses of the one hot key into fewer calls (the "
            "`owner calls per Get` column), so that row understates the cost of distinct keys.", ""]
    return out


def section_getmany(res) -> list[str]:
    out = ["## 3. GetMany batching vs memcached", ""]
    if (msg := missing(res, "getmany")):
        return out + [msg, ""]
    mc = res["memcached"]
    out += [_conditions(res), "",
            f"memcached (1 thread) under memcaslap (1 thread, 16 connections, gets only, 100 B values, all hits): "
            f"**{num(mc['gets_per_s'])} gets/s** (absolute; rounds {mc['gets_per_s_all']}, {mc['get_misses']} misses), "
            f"{num(mc['cpu_us_per_key'], 2)} µs of memcached CPU per get. Its own multi-get of "
            f"{res['headline_batch']} keys: {num(mc.get('multiget_keys_per_s'))} keys/s.", ""]
    rows = []
    for r in res["rows"]:
        rows.append([r["batch"], num(r["rps"]), num(r["keys_per_s"]),
                     f"**{ratio(r['ratio_vs_memcached'])}**" if "ratio_vs_memcached" in r else
                     ratio(r["keys_per_s"] / mc["gets_per_s"]),
                     num(r["p50_ms"], 2), num(r["p99_ms"], 2), num(r["cpu_us_per_key"], 2), pct(r["client_cpu_share"])])
    out += [table(["keys per call", "calls/s (abs.)", "keys/s (abs.)", "vs memcached gets/s", "p50 ms (abs.)",
                   "p99 ms (abs.)", "worker CPU µs per key (abs.)", "h2load CPU share"], rows), "",
            "The ratio in bold is measured in alternating rounds with memcached; the other rows are compared with "
            "the median memcached figure. ![GetMany](getmany.png)", ""]
    c = res.get("check", {})
    out += [f"Check: {num(c.get('keys_sent'))} keys requested, {num(c.get('main_hits'))} main-cache hits, "
            f"{c.get('loads')} loads.", ""]
    return out


def section_storm(res) -> list[str]:
    out = ["## 4. Miss storm", ""]
    if (msg := missing(res, "storm")):
        return out + [msg, ""]
    out += [_conditions(res), "",
            f"{res['gets']} concurrent Gets of {res['keys']} cold keys over {res['workers']} workers (10 h2load "
            "processes × 100 streams, released together), then the same Gets again on the warm keys (the floor: "
            "queueing of 1,000 simultaneous Gets on these workers). Medians of the storms.", ""]
    rows = []
    for r in res["rows"]:
        rows.append([r["delay_ms"], r["origin_loads"], r["failed"], num(r["miss_p50_ms"], 1), f"**{num(r['miss_p99_ms'], 1)}**",
                     ratio(r["p99_over_delay"]), num(r["p99_minus_delay_ms"], 1), num(r["hit_p99_ms"], 1),
                     num(r["start_spread_ms"], 1)])
    out += [table(["origin delay ms", "origin loads per storm", "failed Gets", "miss p50 ms (abs.)",
                   "miss p99 ms (abs.)", "p99 / delay", "p99 − delay ms", "warm-storm p99 ms (abs.)",
                   "start spread ms"], rows), "", "![miss storm](storm.png)", ""]
    return out


def section_memory(res) -> list[str]:
    out = ["## 5. Memory", ""]
    if (msg := missing(res, "memory")):
        return out + [msg, ""]
    out += [_conditions(res), "",
            f"A fresh process per row fills a group to cache_bytes = {size_label(res['cache_bytes'])} with 11-byte "
            "keys. `product` is the product's Group/Store; `plain dict` keeps the same keys and values in one "
            "dict (the floor for one Python bytes object per value).", ""]
    rows = []
    for r in res["rows"]:
        rows.append(["product" if r["store"] == "product" else "plain dict", size_label(r["value_size"]), num(r["items"]),
                     num(r["counted_bytes"] / 2**20, 1), num(r["rss_growth_bytes"] / 2**20, 1),
                     f"**{ratio(r['rss_over_counted'])}**", num(r["overhead_per_entry"])])
    out += [table(["store", "value", "entries", "counted MiB", "RSS growth MiB", "RSS / counted",
                   "bytes per entry beyond key + value"], rows), "", "![memory](memory.png)", ""]
    prod = {r["value_size"]: r for r in res["rows"] if r["store"] == "product"}
    plain = {r["value_size"]: r for r in res["rows"] if r["store"] == "dict"}
    if 100 in prod:
        s = prod[100]["sizeof"]
        over = prod[100]["overhead_per_entry"]
        floor = plain.get(100, {}).get("overhead_per_entry")
        out += [
            f"**Why 100 B values cost {ratio(prod[100]['rss_over_counted'])}.** Each entry costs about {num(over)} bytes "
            "on top of its key and value, and at 100 B that is three times the data. Per entry the product keeps:",
            "",
            f"- the key as a `str` object: {s['key_str']} bytes for 11 characters (49 bytes of header);",
            f"- the value as a `bytes` object: {s['value_bytes_object']} bytes for 100 (33 bytes of header);",
            f"- an `Entry` namedtuple ({', '.join(s.get('entry_fields', ['value', 'expires', 'size']))}): "
            f"{s['entry_namedtuple']} bytes;",
            "- a slot in cachetools' data dict, another in its separate size dict (`Cache.__size`), and for LRU "
            "a third in the `OrderedDict` that keeps the order, plus that OrderedDict's linked-list node: "
            "roughly 35 bytes per dict slot at the usual load factor, and about 50 for the node;",
            f"- the size as an `int` object when it is over 256 (at 1 KiB: {prod.get(1024, {}).get('sizeof', {}).get('size_int', 28)} bytes).",
            "",
            f"The plain dict pays only the key, the bytes header and one slot: {num(floor)} bytes per entry. What "
            "would cut it, in order of gain: (1) one dict per store instead of cachetools' three: a plain dict "
            "keeps insertion order, so LRU is `d[k] = d.pop(k)` on a hit and `next(iter(d))` to evict, and the "
            "size is `len(key) + len(value)` (computed, not stored; non-ASCII keys are rare and can keep a side "
            "table); (2) store the value itself, not an `Entry`, when the group has no TTL (expiries in a side "
            "dict only for entries that have one); together these take the product to the plain-dict row. "
            "(3) Below that, per-entry Python objects have to go: values packed in a slab (`bytearray` arenas "
            "per size class, memcached-style) indexed by an open-addressing table, which needs a C extension or "
            "a compact-dict library to beat the ~120 bytes of the str key and dict slot.",
            "",
        ]
    return out


def section_convergence(res) -> list[str]:
    out = ["## 6. Convergence", ""]
    if (msg := missing(res, "convergence")):
        return out + [msg, ""]
    out += [_conditions(res), "",
            f"The real appliance (supervisord, embedded etcd, controller, N workers), lease_ttl = {res['lease_ttl']} s. "
            "Seconds until every live worker holds the same new ring (absolute; polled every 10 ms):", ""]
    rows = []
    for r in res["rows"]:
        rows.append([r["workers"], num(r["start_s"], 2), f"**{num(r['death_s'], 2)}**", num(r["death_minus_ttl_s"], 2),
                     f"**{num(r['join_s'], 2)}**", num(r.get("join_process_up_s"), 2), f"**{num(r['stop_s'], 2)}**",
                     r.get("stop_cli_exit")])
    out += [table(["N workers", "appliance start s", "death s", "death − lease_ttl s", "join s",
                   "(new worker answering after s)", "planned stop s (from running stop-node)", "stop-node exit"],
                  rows), "", "![convergence](convergence.png)", "",
            "Death is bounded by the lease: the dead worker's etcd key goes when its lease expires, lease_ttl after "
            "its last keepalive (sent every lease_ttl / 3, so between lease_ttl − lease_ttl/3 and lease_ttl after "
            "the death), then the controller's watch pushes the new ring. Join and planned stop do not wait "
            "for a lease: the new worker registers, or the stopping one revokes its lease, and the controller's "
            "watch pushes at once. The planned-stop time includes starting the `appliance stop-node` CLI.", ""]
    return out


def section_scaling(res) -> list[str]:
    out = ["## 7. Scaling", ""]
    if (msg := missing(res, "scaling")):
        return out + [msg, ""]
    out += [_conditions(res), "",
            f"One h2load process (1 thread, {res['streams_per_worker']} streams) per worker, each worker sent a key it "
            "owns; runs for the different N alternate.", ""]
    rows = []
    for r in res["rows"]:
        rows.append([r["workers"], num(r["rps"]), f"**{ratio(r['speedup'])}**", str(r["rps_all"]), num(r["rps_best"]),
                     num(r["p50_ms"], 2), num(r["p99_ms"], 2), pct(r["client_cpu_share"]), num(r["box_cpu_used"], 2),
                     num(r["worker_cpu_us_per_req"]), num(r["other_cpu_cores"], 2)])
    out += [table(["N", "aggregate Gets/s (abs.)", "vs N=1", "rounds", "best round", "p50 ms", "p99 ms (worst worker)",
                   "client CPU share", "cores used by bench", "worker CPU µs per Get", "others"], rows), "",
            "![scaling](scaling.png)", "",
            f"On this {res.get('cpus')}-core box one worker alone already uses "
            f"{num(res['rows'][0].get('worker_cores'), 2)} cores (grpc.aio runs its completion-queue poller in a "
            "second thread next to the event loop), so N = 2 puts two workers and two clients on two cores: the "
            "aggregate cannot double here, and the CPU per Get rises as they contend"
            + (f" (pinned: workers on CPUs {res['worker_cpus']}, clients on {res['client_cpus']})"
               if res.get("worker_cpus") else "") + ".",
            "",
            "**Repeating it on a larger box.** Use a box with at least 2 cores per worker plus cores for the clients, "
            "nothing else running, and pin the two sides apart, e.g. on 12 cores: "
            "`make -C bench deps && .venv/bin/python bench/run.py scaling --scaling-workers 1,2,4 "
            "--worker-cpus 0-7 --client-cpus 8-11` (each worker gets its own h2load process; the workers "
            "share the listed CPUs, the clients theirs). Read the `vs N=1` column, which should approach N while "
            "cores last, and check that `client CPU share` stays low, `others` stays near 0 and `worker CPU µs per "
            "Get` stays flat (it rises when workers contend for cores). For more than one box, run one appliance per "
            "box against a shared etcd and drive each worker with its own h2load from a separate client box.", ""]
    return out


def section_profile(res, hot) -> list[str]:
    out = ["## Profile of the hot path", ""]
    if (msg := missing(res, "profile")):
        return out + [msg, ""]
    out += [_conditions(res), "",
            "py-spy (native frames included) sampled each process at 200 Hz while h2load drove it; samples of parked "
            "threads (epoll_wait, futex) are left out, the rest are split by what the innermost frame is. A "
            "Python-only flame graph of the hot-Get worker is written to `bench/out/profile-worker.svg`.", ""]
    targets = [(k, res.get(k)) for k in ("hot_get_worker", "forwarding_node") if res.get(k)]
    cats = []
    for _, t in targets:
        for c in t["categories"]:
            if c not in cats and not c.startswith("waiting"):
                cats.append(c)
    if targets:
        rows = []
        for c in cats:
            rows.append([c] + [pct((t["categories"].get(c) or {}).get("share_of_busy") or 0) for _, t in targets])
        rows.append(["*under a product frame (inclusive)*"] + [pct(t.get("product_inclusive_share")) for _, t in targets])
        rows.append(["*busy samples*"] + [num(t["busy_samples"]) for _, t in targets])
        out += [table(["share of busy samples", *(_target_label(k) for k, _ in targets)], rows), ""]
    ht = res.get("handler_time")
    if ht:
        out += ["Time inside the product's Get handler per hit (measured in the worker with `servers.py --timing`; "
                "a hit never suspends, so this is CPU time, plus any preemption that lands inside it), against the "
                "worker's whole CPU per Get (8 streams):", "",
                table(["value", "handler µs", "worker CPU µs per Get (abs.)", "handler share"],
                      [[size_label(int(z)), num(h["handler_us"], 1), num(h["cpu_us_per_get"]),
                        pct(h["handler_us"] / h["cpu_us_per_get"])] for z, h in ht.items()]), ""]
    se, sw = res.get("syscalls_echo"), res.get("syscalls_worker")
    if se and sw:
        names = [n for n in sw["per_get"] if sw["per_get"][n] >= 0.05 or se["per_get"].get(n, 0) >= 0.05]
        out += ["System calls per Get (strace -c over 3,000 Gets at 32 streams; counts only):", "",
                table(["", *names, "total"],
                      [["echo", *(num(se["per_get"].get(n, 0), 1) for n in names), f"**{num(se['total_per_get'], 1)}**"],
                       ["worker", *(num(sw["per_get"].get(n, 0), 1) for n in names), f"**{num(sw['total_per_get'], 1)}**"]]),
                ""]
    for k, t in targets:
        out += [f"Top leaves, {_target_label(k)}: "
                + "; ".join(f"`{name}` {share:.1%}" for name, share in t["top_leaves"][:8]), ""]
        if t["top_product_frames"]:
            out += [f"Top product frames, {_target_label(k)}: "
                    + "; ".join(f"`{name}` {share:.1%}" for name, share in t["top_product_frames"][:6]), ""]
    out += reading(res)
    return out


def _target_label(key: str) -> str:
    return {"hot_get_worker": "hot-Get worker (100 B hits)", "forwarding_node": "forwarding node (1 stream)"}.get(key, key)


def _at(path: str, text: str) -> str:
    """`path:line` of the first line containing text in the product's source (as of this run)."""
    try:
        for i, line in enumerate((lib.ROOT / path).read_text().splitlines(), 1):
            if text in line:
                return f"`{path}:{i}`"
    except OSError:
        pass
    return f"`{path}`"


def reading(res: dict) -> list[str]:
    w = res.get("hot_get_worker") or {}
    f = res.get("forwarding_node") or {}
    sw, se = res.get("syscalls_worker") or {}, res.get("syscalls_echo") or {}
    ht = res.get("handler_time") or {}
    own = lambda t: (t.get("categories", {}).get("product code (appliance/, own frames)") or {}).get("share_of_busy") or 0  # noqa: E731
    small, big = ht.get("100", {}), ht.get(str(1 << 20), {})
    return [
        "### Reading",
        "",
        f"- **A hot Get is gRPC's cost, not the cache's.** The worker makes {num(sw.get('total_per_get'), 1)} system "
        f"calls per Get and the bare echo server {num(se.get('total_per_get'), 1)}: grpc.aio's completion-queue poller "
        "thread and the asyncio loop hand every call over through an eventfd and futexes "
        "(write/read/recvfrom/futex/epoll_wait), around one recvmsg/sendmsg on the socket. Those system calls, grpc's "
        f"C core and the event loop take most of the busy samples; the product's own frames take {pct(own(w))} "
        f"({pct(w.get('product_inclusive_share'))} with what they call). The handler itself spends "
        f"{num(small.get('handler_us'), 1)} µs of the {num(small.get('cpu_us_per_get'))} µs of CPU a 100 B Get costs "
        "(validate, the metadata and deadline reads, `Group.get`, `Store.get`).",
        f"- **Large values are sent as stored.** Since commit 0ad5341 a node keeps each value in the wire form of "
        "a GetResponse and hands grpc those bytes: a hit builds no message and copies nothing of the value's "
        f"size in Python (at 1 MiB the handler takes {num(big.get('handler_us'), 1)} µs of a "
        f"{num(big.get('cpu_us_per_get'))} µs Get). The echo baseline still serializes its prebuilt message on "
        "every Get, which is why the worker can beat it at 1 MiB.",
        "- **A forwarded Get costs the forwarder a server call and a client call.** On the forwarding node "
        f"the product's own frames are {pct(own(f))} of the busy samples ({pct(f.get('product_inclusive_share'))} "
        "with the grpc client calls they make); the rest is grpc (C core, its Python client layer) and the system "
        "calls of two calls instead of one. Section 2 shows the forwarded latency is the local one plus one "
        "grpc.aio client call.",
        "",
        "### Hot-path changes, measured with local experiments",
        "",
        "`servers.py worker --experiment NAME` patches the product in the bench process only; these were measured "
        "while writing the bench (quiet box, A/B rounds alternating with the echo server, 100 B, 32 streams) and "
        "are not part of `make bench`:",
        "",
        "| change | result |",
        "|---|---|",
        "| pre-encoded GetResponse (the value kept in wire form, grpc handed bytes) | 1 MiB: 577 → 2,102 Gets/s (3.64×), "
        "CPU per Get 1,804 → 529 µs; 64 KiB: 1.18×; 100 B and 1 KiB: within noise. **Adopted** in commit "
        "0ad5341 (`appliance/node/wire.py`); the tables above measure it. |",
        "| `lean-handler`: a hit served without reading `invocation_metadata()` or `time_remaining()`, `validate` "
        "without encoding short strings | no gain: 0.953× echo against 0.961× for the product (7 rounds); not worth "
        "the loss of `server_requests` counting on hits |",
        "| `registered`: the services also registered with `add_registered_method_handlers` (as grpc's generated "
        "code does) | no gain: 0.913× against 0.961× |",
        "| `bypass`: the node's server with a handler that returns a prebuilt reply (no product logic) | 0.991× "
        "echo: the ceiling for any change to the handler is the ~3-4% between this and the product |",
        "| `peer-opts`: peer channels with `grpc.enable_retries = 0` and/or `grpc.http2.bdp_probe = 0` | forwarded "
        "p50 0.96–1.06 ms against 1.07 ms, within noise |",
        "",
        "What is left for the product:",
        "",
        "1. Small values: nothing measurable in the product's code. The rest of a Get is grpc.aio (the ~35 system "
        "calls of the poller-thread hand-off); going past it means fewer RPCs (GetMany, see section 3) or a "
        "different RPC stack, not a leaner handler.",
        "2. Forwarding: the product's own frames are a few percent of the forwarder's time, so nothing in "
        f"`Group._route_load` / `SingleFlight.do` / {_at('appliance/node/peers.py', 'async def get(')} "
        "can bring the cost to 2×; the extra cost is the grpc.aio client call. What cuts it is making fewer "
        "calls: the hot cache (`hot_cache_mirror`, off in this bench) keeps popular keys local, `GetMany` "
        "batches keys per owner, and `appliance.client.Client` sends each key straight to its owner so that an "
        "application's Get is not forwarded at all.",
        f"3. Memory, {_at('appliance/cache/store.py', 'class Store')}: see section 5 (one dict per store instead "
        "of cachetools' three, no `Entry` tuple for entries without a TTL); the plain-dict rows there are the "
        "measured bound of that change.",
        "",
    ]
