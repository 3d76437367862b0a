"""Run the benchmarks and write bench/results.md and the plots.

    python bench/run.py                  # everything (what `make bench` runs)
    python bench/run.py hot_get storm    # some of them; the others keep their last results
    python bench/run.py --report         # only re-render results.md and plots from bench/out/results.json

Raw numbers go to bench/out/results.json (git-ignored scratch), the
commit-worthy outputs to bench/results.md and bench/*.png.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
import traceback

from benches import BENCHES
from processes import OUT, kill_all, loadavg, log, need, quiet_box

RESULTS = OUT / "results.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benches", nargs="*", metavar="BENCH", help=f"any of {', '.join(BENCHES)} (default: all)")
    p.add_argument("--seconds", type=float, default=1.5, help="length of one measured h2load run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison")
    p.add_argument("--scaling-workers", default="1,2", help="worker counts for the scaling bench")
    p.add_argument("--worker-cpus", default=None, help="scaling: taskset CPU list for the workers (e.g. 0-7)")
    p.add_argument("--client-cpus", default=None, help="scaling: taskset CPU list for the h2load clients (e.g. 8-11)")
    p.add_argument("--convergence-workers", default="2,4,8", help="worker counts for the convergence bench")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="seconds to wait, before each bench, for the rest of the box to go under 0.5 cores",
    )
    p.add_argument("--report", action="store_true", help="only render results.md and plots")
    cfg = p.parse_args()
    unknown = [b for b in cfg.benches if b not in BENCHES]
    if unknown:
        p.error(f"unknown bench {', '.join(unknown)}; expected any of {', '.join(BENCHES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    failed = []
    if not cfg.report:
        need("h2load", "nghttp2-client")
        results["machine"] = machine()
        for name in cfg.benches or BENCHES:
            t0 = time.monotonic()
            others = quiet_box(cfg.quiet_wait)
            log(f"=== {name} (load average {loadavg()}; others use {others:.2f} cores)")
            load_before = loadavg()
            try:
                res = importlib.import_module(name).run(cfg)
            except Exception as exc:
                traceback.print_exc()
                res = {"error": f"{type(exc).__name__}: {exc}"}
                failed.append(name)
            finally:
                kill_all()
            res["elapsed_s"] = round(time.monotonic() - t0, 1)
            res["loadavg_before"] = load_before
            res["other_cores_before"] = round(others, 2)
            res["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
            results[name] = res
            RESULTS.write_text(json.dumps(results, indent=1, default=str))
            log(f"=== {name} done in {res['elapsed_s']}s")
    import report

    report.render(results)
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


def machine() -> dict:
    def version(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:
            return "?"

    import google.protobuf
    import grpc

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "h2load": version(["h2load", "--version"]),
        "memcached": version(["memcached", "-V"]),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    sys.exit(main())
