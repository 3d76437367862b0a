"""Benchmark 5: memory. Fill a group to cache_bytes with 100 B and with
1 KiB values (a fresh process each) and report RSS growth against the
bytes the cache counts (key + value).

Each fill runs in its own process:

    memory.py fill --value-size 100 --cache-bytes 64MiB [--store product|dict]

`product` fills the product's Group (appliance.cache.group.Group, whose
main cache is appliance.cache.store.Store on cachetools' LRUCache, with the
framing a Node uses) through Group.set, which stores exactly what a load
stores. `dict` stores the same
keys and values in one plain dict: the floor for any design that keeps one
Python bytes object per value, to show what the per-entry objects cost.
RSS is read from /proc/self/statm after a gc, before and after the fill.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

from fmt import num, opening, ratio, size_label, table
from goals import GOALS

SIZES = (100, 1024)
CACHE_BYTES = "64MiB"


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(value_size: int, cache_bytes: int, store: str) -> dict:
    from appliance.cache.group import Group
    from appliance.cache.store import Entry

    async def loader(key: str) -> bytes:  # never called: the fill uses set
        raise KeyError(key)

    import inspect

    key_len = 11
    per = key_len + value_size
    n = cache_bytes // per
    kwargs = {}
    if "framing" in inspect.signature(Group).parameters:  # values kept in wire form, as a Node keeps them
        from appliance.protocol import framing as wire

        kwargs["framing"] = wire.FRAMING
    group = Group("bench", loader, cache_bytes=cache_bytes, policy="lru", **kwargs) if store == "product" else None
    plain: dict[str, bytes] = {}
    base = rss()
    t0 = time.perf_counter()
    if group is not None:
        put = getattr(group, "set", None) or (lambda k, v: group.main.set(k, v))
        for i in range(n):
            put(f"k{i:010d}", b"v" * value_size)  # a new bytes object per key, as an origin returns
        counted = group.main.bytes + group.hot.bytes
        items = len(group.main) + len(group.hot)
        evictions = group.main.evictions
    else:
        for i in range(n):
            plain[f"k{i:010d}"] = b"v" * value_size
        counted = sum(len(k) + len(v) for k, v in plain.items())
        items = len(plain)
        evictions = 0
    elapsed = time.perf_counter() - t0
    grown = rss() - base
    sample_key, sample_value = f"k{0:010d}", b"v" * value_size
    entry = Entry(sample_value, 0.0, per)
    return {
        "store": store,
        "value_size": value_size,
        "cache_bytes": cache_bytes,
        "items": items,
        "counted_bytes": counted,
        "fill_ratio": counted / cache_bytes,
        "evictions": evictions,
        "rss_growth_bytes": grown,
        "rss_over_counted": grown / max(1, counted),
        "overhead_per_entry": (grown - counted) / max(1, items),
        "fill_s": elapsed,
        "sizeof": {
            "key_str": sys.getsizeof(sample_key),
            "value_bytes_object": sys.getsizeof(sample_value),
            "entry_namedtuple": sys.getsizeof(entry),
            "entry_fields": list(Entry._fields),
            "size_int": sys.getsizeof(per) if per > 256 else 0,  # small ints are shared
        },
    }


def run(cfg) -> dict:
    # Here, not at the top: the fill process (main) imports no more than it needs.
    from processes import PY, Proc, log

    from appliance.units import parse_bytes

    cache_bytes = parse_bytes(CACHE_BYTES)
    rows = []
    for store in ("product", "dict"):
        for size in SIZES:
            log(f"memory: {store} store, {size} B values, fill to {CACHE_BYTES}")
            proc = Proc(
                [
                    PY,
                    __file__,
                    "fill",
                    "--value-size",
                    str(size),
                    "--cache-bytes",
                    str(cache_bytes),
                    "--store",
                    store,
                ],
                f"memory-{store}-{size}",
            )
            try:
                proc.popen.wait(180)
            finally:
                proc.kill()
            res = json.loads(proc.log_path.read_text().strip().splitlines()[-1])
            log(
                f"  {res['items']} entries, RSS +{res['rss_growth_bytes'] / 2**20:.1f} MiB for "
                f"{res['counted_bytes'] / 2**20:.1f} MiB counted: x{res['rss_over_counted']:.2f} "
                f"({res['overhead_per_entry']:.0f} B per entry beyond key+value)"
            )
            rows.append(res)
    return {"rows": rows, "cache_bytes": cache_bytes}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["fill"])
    p.add_argument("--value-size", type=int, required=True)
    p.add_argument("--cache-bytes", type=int, required=True)
    p.add_argument("--store", choices=["product", "dict"], default="product")
    a = p.parse_args()
    print(json.dumps(fill(a.value_size, a.cache_bytes, a.store)), flush=True)


def section(res: dict | None) -> list[str]:
    out, ran = opening("## 5. Memory", res, "memory")
    if not ran:
        return out
    out += [
        f"A fresh process per row fills a group to cache_bytes = {size_label(res['cache_bytes'])} with 11-byte "
        "keys. `product` is the product's Group/Store; `plain dict` keeps the same keys and values in one "
        "dict (the floor for one Python bytes object per value).",
        "",
    ]
    rows = []
    for r in res["rows"]:
        rows.append(
            [
                "product" if r["store"] == "product" else "plain dict",
                size_label(r["value_size"]),
                num(r["items"]),
                num(r["counted_bytes"] / 2**20, 1),
                num(r["rss_growth_bytes"] / 2**20, 1),
                f"**{ratio(r['rss_over_counted'])}**",
                num(r["overhead_per_entry"]),
            ]
        )
    out += [
        table(
            [
                "store",
                "value",
                "entries",
                "counted MiB",
                "RSS growth MiB",
                "RSS / counted",
                "bytes per entry beyond key + value",
            ],
            rows,
        ),
        "",
        "![memory](memory.png)",
        "",
    ]
    prod = {r["value_size"]: r for r in res["rows"] if r["store"] == "product"}
    if 100 in prod and prod[100].get("sizeof"):
        sz = prod[100]["sizeof"]
        fields = ", ".join(sz.get("entry_fields", ["value", "expires", "size"]))
        size_int = prod.get(1024, {}).get("sizeof", {}).get("size_int", 28)
        rows = [
            ["the key, a `str` (11 characters)", sz["key_str"]],
            ["the value, a `bytes` (100 bytes)", sz["value_bytes_object"]],
            [f"an `Entry` namedtuple ({fields})", sz["entry_namedtuple"]],
            ["the size, an `int` (only over 256, e.g. at 1 KiB)", size_int],
        ]
        out += [
            f"Objects per entry at 100 B (sys.getsizeof, bytes; the entry costs {num(prod[100]['overhead_per_entry'])} "
            "beyond key + value in all):",
            "",
            table(["object", "bytes"], rows),
            "",
        ]
    return out


def plot(mem: dict, plt):
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


FIGURES = {"memory.png": plot}


def goal_rows(mem: dict) -> list[tuple[str, str, str, bool]]:
    prod = {r["value_size"]: r for r in mem.get("rows", []) if r["store"] == "product"}
    if 1024 not in prod:
        return []
    g = GOALS["memory_1k"]
    return [
        (
            "Memory: RSS growth / counted bytes at 1 KiB",
            g.target(),
            ratio(prod[1024]["rss_over_counted"])
            + (
                f" (100 B: {ratio(prod[100]['rss_over_counted'])}, {num(prod[100]['overhead_per_entry'])} B/entry)"
                if 100 in prod
                else ""
            ),
            g.met(prod[1024]["rss_over_counted"]),
        )
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
