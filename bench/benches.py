"""The benchmarks: one module each (bench/<name>.py), which owns its run, its
section of results.md, its figures and its rows of the Goals table.

A benchmark module has
    run(cfg) -> dict             what run.py calls; the dict is results[name] (res below)
    section(res) -> list[str]    its lines of results.md (res is None when never run)
and may have
    FIGURES = {"x.png": draw}    draw(res, plt) -> a matplotlib Figure, or None ({} when never run)
    goal_rows(res) -> list[(goal, target, measured, met)]
                                 met: True or False, or None for a figure only reported
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCHES = (  # the order `python bench/run.py` runs them in
    "hot_get",
    "forwarded",
    "getmany",
    "storm",
    "memory",
    "convergence",
    "warm",
    "scaling",
    "skew",
    "clients",
    "worker_limits",
    "profile",
)
# results.md keeps its numbered sections (and figures) in their order: scaling (7) before warm (8).
_WARM = BENCHES.index("warm")
REPORT_ORDER = (*BENCHES[:_WARM], "scaling", *(b for b in BENCHES[_WARM:] if b != "scaling"))
# The Goals table ends with scaling's row, a figure only reported.
GOALS_ORDER = (*(b for b in BENCHES if b != "scaling"), "scaling")


def modules(order: tuple[str, ...]) -> list[tuple[str, ModuleType]]:
    """(name, module) for each benchmark, in `order`; imported when asked
    for, so that a module may import goals.py, which asks for them. bench/
    must lead sys.path: profile.py has the name of a standard module."""
    return [(name, importlib.import_module(name)) for name in order]
