"""Render bench/results.md and the PNG plots from bench/out/results.json.

benches.py     the benchmarks, each a module with its section, figures and goal rows
goals.py       the thresholds, the Goals table and its verdicts
plots.py       draws and saves each benchmark's figures
results_md.py  the markdown: this run's numbers only (prose: README.md)
"""

from __future__ import annotations

from pathlib import Path

import plots
from goals import headline_table
from processes import BENCH, log
from results_md import markdown


def render(results: dict, out_dir: Path = BENCH) -> None:
    """Write results.md and the plots into ``out_dir`` (bench/ by default)
    and print the Goals table."""
    made = plots.save_all(results, out_dir)
    if made is None:
        log("matplotlib is not installed: no plots (make -C bench deps)")
    target = out_dir / "results.md"
    target.write_text(markdown(results))
    log(f"wrote {target}" + (f" and {', '.join(made)}" if made else ""))
    print()
    print(headline_table(results))
