"""Repeated measurements on a shared box: arms run in alternating rounds,
the medians of what they measured, and CPU per request of one run."""

from __future__ import annotations


def median(vals):
    vals = sorted(vals)
    n = len(vals)
    if not n:
        return float("nan")
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def interleave(arms: dict, rounds: int) -> dict[str, list[dict]]:
    """Run each arm (name -> callable returning a result dict) `rounds` times,
    alternating the order (ABBA…) so drift on a shared box hits both alike."""
    names = list(arms)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(arms[name]())
    return out


def summarize(
    runs: list[dict], keys=("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "client_cpu_share", "other_cpu_cores")
) -> dict:
    s = {k: median([r[k] for r in runs if k in r]) for k in keys}
    s["runs"] = len(runs)
    s["rps_all"] = [round(r["rps"], 1) for r in runs]
    return s


def per_request_cpu(res: dict) -> dict:
    res["cpu_us_per_req"] = res["server_cpu_s"] / max(1, res.get("succeeded", 0)) * 1e6
    return res
