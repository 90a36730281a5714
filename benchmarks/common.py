"""Shared pieces of the benchmarks: interleaved timing, ratio statistics, and writing one section of BENCHMARKS.md.

Each section replaces only its own block (between ``<!-- section: NAME -->`` markers), so sections run on their
own and their results sit beside the command that reproduces them.
"""

from __future__ import annotations

import platform
import random
import re
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = """# Benchmarks

Each section below is produced by one command (shown in it) and can be re-run on its own; speed figures are
ratios against a baseline measured in the same process, interleaved (except where a section says otherwise), so
machine load cancels out.
"""


def machine(parallel_runs: int | None = None) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    threads = (f"{parallel_runs} runs at a time in processes of 1 torch thread each" if parallel_runs
               else f"{torch.get_num_threads()} torch thread(s)")
    return f"{cpu}, {threads}, torch {torch.__version__}, Python {platform.python_version()}{gpu}"


def write_section(name: str, body: str, command: str | None = None, parallel_runs: int | None = None) -> None:
    """Replace (or append) section ``name`` of BENCHMARKS.md (``parallel_runs``: for sections of many runs)."""
    command = command or "python -m benchmarks " + " ".join(sys.argv[1:])
    block = (
        f"<!-- section: {name} -->\n"
        f"## {name}\n\n"
        f"Reproduce: `{command}` ({date.today().isoformat()}; {machine(parallel_runs)})\n\n"
        f"{body.strip()}\n"
        f"<!-- /section: {name} -->"
    )
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    pattern = re.compile(rf"<!-- section: {re.escape(name)} -->.*?<!-- /section: {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def interleaved(variants: dict[str, Callable[[], float]], blocks: int, seed: int = 0) -> dict[str, list[float]]:
    """Run every variant once per block, in a fresh random order each block; each call returns seconds per step."""
    order = list(variants)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(blocks):
        rng.shuffle(order)
        for name in order:
            times[name].append(variants[name]())
    return times


def ratio_stats(numerator: list[float], denominator: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median of per-block ratios and a bootstrap 95% interval of that median."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def percent(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_config(args: tuple[list[str], str]) -> dict:
    """One run from Hydra overrides, in this process, through the same code path as ``patcli train``/``prune-post``;
    returns its record as a dict (status failed with the error if it broke)."""
    import os
    import tempfile

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from patcli.config import parse_run_config
    from patcli.hydra_app import conf_dir
    from patcli.runner import execute

    overrides, output_root = args
    torch.set_num_threads(1)
    os.makedirs(os.path.join(output_root, "runs"), exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=os.path.join(output_root, "runs")))
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("config", [*overrides, f"output_root={output_root}"])
        source = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
        record = execute(parse_run_config(source), run_dir)
        return {**record.__dict__, "overrides": overrides}
    except Exception as error:  # a benchmark reports failures, it does not stop on them
        return {"status": "failed", "error": f"{error.__class__.__name__}: {error}", "overrides": overrides}


def run_configs(jobs: list[list[str]], output_root: Path, workers: int = 2) -> list[dict]:
    """Run many configs on ``workers`` processes of one torch thread each (the cores of this machine)."""
    import multiprocessing

    (output_root / "runs").mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(run_config, [(job, str(output_root)) for job in jobs], chunksize=1)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0] * 100:.1f}"
    return f"{statistics.fmean(values) * 100:.1f} ± {statistics.stdev(values) * 100:.1f}"
