"""Sweep launchers: one 4-job ``patcli sweep`` on Hydra's basic launcher (one job at a time, torch's default threads)
against ``hydra/launcher=joblib`` (jobs side by side, cores // jobs torch threads each), wall clock, interleaved.

Each job is the default PAT run with its epochs scaled so that it trains for at least ``job_seconds`` on the basic
launcher (measured by a short calibration run first), so start-up costs do not decide the race.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import interleaved, ratio_stats, table

JOBS = 4
CALIBRATION_EPOCHS = 3
TARGET_SPEEDUP = 1.7
LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=joblib"]}


def patcli(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "patcli.cli", *args], cwd=cwd, check=True, capture_output=True, text=True)


def records_under(directory: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*/result.json"))]


def epochs_for(job_seconds: float, root: Path) -> int:
    """Epochs that make one default job train for ``job_seconds`` at torch's default threads (10% margin)."""
    patcli("train", f"trainer.epochs={CALIBRATION_EPOCHS}", f"hydra.run.dir={root}/calibration", cwd=root)
    (record,) = records_under(root)
    per_epoch = record["train_seconds"] / CALIBRATION_EPOCHS
    return max(1, math.ceil(1.1 * job_seconds / per_epoch))


def sweep_launchers(job_seconds: float = 30.0, repeats: int = 3) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as folder:
        root = Path(folder)
        epochs = epochs_for(job_seconds, root)
        job = [f"trainer.epochs={epochs}", "seed=" + ",".join(str(s) for s in range(JOBS))]
        sweeps: dict[str, list[Path]] = {name: [] for name in LAUNCHERS}

        def variant(name: str):
            def run() -> float:
                sweep_dir = root / f"{name}-{len(sweeps[name])}"
                sweeps[name].append(sweep_dir)
                started = time.perf_counter()
                patcli("sweep", *job, *LAUNCHERS[name], f"hydra.sweep.dir={sweep_dir}", cwd=root)
                return time.perf_counter() - started
            return run

        times = interleaved({name: variant(name) for name in LAUNCHERS}, repeats)
        records = {name: [r for d in dirs for r in records_under(d)] for name, dirs in sweeps.items()}

    failed = [r.get("error") for rs in records.values() for r in rs if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"benchmark jobs failed: {failed}")
    speedup, low, high = ratio_stats(times["basic"], times["joblib"])
    rows = []
    for name in LAUNCHERS:
        threads = {r["config"]["trainer"]["threads"] for r in records[name]}
        train = [r["train_seconds"] for r in records[name]]
        rows.append([name, "default" if threads == {None} else ", ".join(map(str, sorted(threads))),
                     f"{statistics.median(times[name]):.1f} s", f"{min(train):.1f}–{max(train):.1f} s",
                     "1.00×" if name == "basic" else f"{speedup:.2f}× [{low:.2f}, {high:.2f}]"])
    verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    return (
        f"{JOBS} jobs (`patcli sweep trainer.epochs={epochs} seed=0,1,2,3`: the default PAT run, epochs chosen so one "
        f"job was calibrated to train about {job_seconds:g} s on the basic launcher; the table shows what it took), wall clock "
        f"of the whole sweep, median of {repeats} interleaved repeats; in brackets the lowest and highest of the bootstrap "
        f"medians, which with {repeats} repeats are the lowest and highest ratio measured, not a 95% interval.\n\n"
        + table(["launcher", "torch threads per job", "sweep wall clock", "train time per job", "speedup vs basic"], rows)
        + f"\n\njoblib vs basic: {speedup:.2f}× (target ≥ {TARGET_SPEEDUP}×: {verdict})."
    )


SECTIONS = {"sweep_launchers": sweep_launchers}
