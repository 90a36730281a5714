"""Before a Hydra multirun: expand the basic sweeper's jobs, reject bad ones, and train shared dense runs first.

Hydra's sweeper still launches the jobs; this only reads the same overrides the basic sweeper will expand, so a
typo in one job stops the sweep before anything runs, and the dense runs the baselines need exist before the
first baseline job starts (each job would otherwise find or train its own under a file lock).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from .config import RunConfig

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def expand_jobs(overrides: list[str], cfg: DictConfig) -> list[list[str]] | None:
    """The override list of every job the basic sweeper will launch, in its order; None for other sweepers."""
    sweeper = cfg.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def prepare(configs: list[RunConfig], progress_factory) -> list[Path]:
    """Train (or find) each distinct dense run the jobs need, before the sweep; returns their directories."""
    from .dense import resolve_dense

    done: dict[str, Path] = {}
    for config in configs:
        if config.needs_dense and not config.dense and config.dense_key() not in done:
            done[config.dense_key()] = resolve_dense(config, progress_factory("dense reference"))
    return list(done.values())


def job_dirs(returns: Any) -> list[Path]:
    """Every job's output directory, from Hydra's job returns."""
    return [Path(job.hydra_cfg.hydra.runtime.output_dir) for batch in returns or [] for job in batch]
