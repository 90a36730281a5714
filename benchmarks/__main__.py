"""Run benchmark sections and write each into BENCHMARKS.md: ``python -m benchmarks --only overhead``."""

from __future__ import annotations

import argparse
import inspect
import time

from . import engine_speed, gpu, handwritten_step, main_job, quality, quality_gap, structured, sweep_launchers
from .common import write_section

SECTIONS = {**main_job.SECTIONS, **engine_speed.SECTIONS, **handwritten_step.SECTIONS, **gpu.SECTIONS, **quality.SECTIONS, **quality_gap.SECTIONS, **structured.SECTIONS, **sweep_launchers.SECTIONS}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="sections to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    parser.add_argument("--workers", type=int, help="parallel runs for the accuracy sections (default: 2, this machine's cores)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(sorted(SECTIONS)))
        return
    for name in args.only or list(SECTIONS):
        started = time.perf_counter()
        print(f"[{name}] running ...", flush=True)
        section = SECTIONS[name]
        workers = inspect.signature(section).parameters.get("workers")
        body = section(workers=args.workers) if args.workers and workers else section()
        parallel = (args.workers or workers.default) if workers else None
        command = f"python -m benchmarks --only {name}" + (f" --workers {args.workers}" if args.workers and workers else "")
        write_section(name, body, command=command, parallel_runs=parallel)
        print(f"[{name}] done in {time.perf_counter() - started:.0f} s → BENCHMARKS.md", flush=True)


if __name__ == "__main__":
    main()
