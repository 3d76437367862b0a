"""The report's figures: each benchmark module names its own in `FIGURES`
(file name -> a function of its results and matplotlib that returns a
Figure, or None when the benchmark has no rows); this draws and saves them."""

from __future__ import annotations

from pathlib import Path

import benches


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
    for name, module in benches.modules(benches.REPORT_ORDER):
        for file_name, draw in getattr(module, "FIGURES", {}).items():
            fig = draw(results.get(name) or {}, plt)
            if fig is None:
                continue
            fig.tight_layout()
            fig.savefig(out_dir / file_name, dpi=110)
            plt.close(fig)
            made.append(file_name)
    return made
