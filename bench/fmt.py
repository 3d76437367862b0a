"""How numbers appear in the report: one place for every table and label."""

from __future__ import annotations

import math


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


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def missing(res: dict | None, name: str) -> str | None:
    """The line a section shows instead of its figures, or None."""
    if not res:
        return f"_{name} has not been run yet (`python bench/run.py {name}`)._"
    if "error" in res:
        return f"_{name} failed in this run: `{res['error']}`_"
    if "skipped" in res:
        return f"_{name} skipped: {res['skipped']}_"
    return None


def opening(title: str, res: dict | None, name: str) -> tuple[list[str], bool]:
    """A section's first lines: its title, then when it ran (`conditions`),
    or why it has no figures; the bool says whether it ran."""
    if msg := missing(res, name):
        return [title, "", msg, ""], False
    assert res is not None  # missing() says so otherwise
    return [title, "", conditions(res), ""], True


def conditions(res: dict) -> str:
    """The line under a section's title: when it ran, and how busy the box was."""
    return (
        f"_Run {res.get('when', '?')}, {res.get('elapsed_s', '?')} s; load average before "
        f"{res.get('loadavg_before', '?')}, other processes on {res.get('other_cores_before', '?')} cores._"
    )
