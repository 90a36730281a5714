"""The main job: ``patcli sweep +experiment=pat_vs_post`` on the digits default, exactly as the README's quick start
runs it, and the table ``patcli compare`` prints for it (the figures README.md quotes)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path


def patcli(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "patcli.cli", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout


def pat_vs_post() -> str:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        started = time.perf_counter()
        patcli("sweep", "+experiment=pat_vs_post", "hydra.sweep.dir=sweep", cwd=root)
        seconds = time.perf_counter() - started
        markdown = patcli("compare", "sweep", "--format", "markdown", cwd=root)
        runs = len(list((root / "sweep").glob("*/result.json")))
    return (
        f"`patcli sweep +experiment=pat_vs_post` ({runs} runs besides the dense ones it trains first, {seconds / 60:.1f} "
        "min with torch's default threads) and its `patcli compare --format markdown`: MLP 64-256-256-10 on digits, "
        "test accuracy %, mean ± std over seeds 0–2, difference to dense in brackets. PAT here is the default recipe "
        "(AGP + magnitude + global, 60 epochs), not the tuned one of the quality section.\n\n"
        + markdown.strip()
    )


SECTIONS = {"pat_vs_post": pat_vs_post}
