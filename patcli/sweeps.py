"""Around a Hydra multirun: before it, expand the basic sweeper's jobs, reject bad ones, and train shared dense runs
first; after it, find the jobs and the Optuna study's best trial for the summary.

Hydra's sweeper still launches the jobs; this only reads the same overrides the basic sweeper will expand, so a
typo in one job stops the sweep before anything runs, and the dense runs the baselines need exist before the
first baseline job starts (each job would otherwise find or train its own under a file lock).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, RangeSweep
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, RunConfig
from .records import RESULT_FILE

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA_RESULTS = "optimization_results.yaml"
OVERRIDES_FILE = ".hydra/overrides.yaml"


def parsed_overrides(overrides: list[str], cfg: DictConfig) -> list:
    """The sweeper's own params (a preset's) and the command line's overrides, parsed as Hydra parses them."""
    params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())  # glob() lists group options
    return parser.parse_overrides(params + list(overrides))


def check_sweep_functions(overrides: list[str], cfg: DictConfig) -> None:
    """Sweep functions the sweeper would fail on once started, as one line naming the key: a range() with step 0 or
    no value, an interval() with its ends reversed, or one given to the basic sweeper, which cannot sample it."""
    basic = cfg.hydra.sweeper.get("_target_") == BASIC_SWEEPER
    grid = str((cfg.hydra.sweeper.get("sampler") or {}).get("_target_", "")).endswith("GridSampler")
    for override in parsed_overrides(overrides, cfg):
        sweep, key = override.value(), override.get_key_element()
        if isinstance(sweep, RangeSweep):
            if sweep.step == 0 or not list(override.sweep_string_iterator()):
                raise ConfigError(key, f"range({sweep.start}, {sweep.stop}, {sweep.step}) holds no value; allowed: "
                                       "range(start, stop, step) with start < stop for a positive step (> for a negative one)")
        elif isinstance(sweep, IntervalSweep):
            if basic:
                raise ConfigError(key, "interval() is sampled by a searching sweeper; allowed: hydra/sweeper=optuna, or "
                                       "a list a,b,c or range() with the basic sweeper")
            if grid:
                raise ConfigError(key, "interval() is sampled, and the grid sampler only goes through listed values; "
                                       "allowed: choice() or range() with hydra/sweeper/sampler=grid, or another sampler")
            if sweep.start > sweep.end:
                raise ConfigError(key, f"interval({sweep.start}, {sweep.end}) has its ends reversed; allowed: interval(low, high) with low <= high")
        if not basic and override.is_sweep_override():
            check_optuna_distribution(override)


def check_optuna_distribution(override) -> None:
    """What the Optuna sweeper makes of a searched override once started (a log interval from 0 is no distribution)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    try:
        create_optuna_distribution_from_override(override)
    except (ValueError, AssertionError, NotImplementedError) as error:
        value = override.input_line.split("=", 1)[1]
        raise ConfigError(override.get_key_element(), f"Optuna cannot search {value} ({error}); allowed: interval(low, "
                                                      "high), tag(log, interval(low, high)) with low > 0, range() or "
                                                      "choice()") from error


def expand_jobs(overrides: list[str], cfg: DictConfig) -> list[list[str]] | None:
    """The override list of every job the basic sweeper will launch, in its order; None for other sweepers."""
    sweeper = cfg.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    return [job for batch in BasicSweeper.split_arguments(parsed_overrides(overrides, cfg), max_batch_size=None) for job in batch]


def search_space_edges(overrides: list[str], cfg: DictConfig) -> list[list[str]]:
    """For a sweeper that samples as it goes (Optuna): one job per edge of each searched setting — every choice,
    both ends of a range or interval — with the other searched settings at their defaults. A bound no job could
    take fails before the study, not in every trial."""
    parsed = parsed_overrides(overrides, cfg)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    presets = len(parsed) - len(overrides)  # parsed_overrides puts the preset's params first
    given = {o.get_key_element() for o in parsed[presets:]}  # on the command line
    jobs = []
    for number, searched in enumerate(parsed):
        if not searched.is_sweep_override() or (number < presets and searched.get_key_element() in given):
            continue  # a preset's search that the command line sets is not searched (Optuna drops it too)
        sweep = searched.value()
        if isinstance(sweep, IntervalSweep):
            edges = [sweep.start, sweep.end]
        elif isinstance(sweep, RangeSweep) and not sweep.shuffle:  # Optuna samples up to stop (its distributions' high),
            # as range() does not; a shuffled range is a list of its own values to it
            last = sweep.start + math.floor((sweep.stop - sweep.start) / sweep.step + 1e-9) * sweep.step
            edges = [sweep.start, round(last, 12) if isinstance(last, float) else last]
        else:
            edges = list(searched.sweep_string_iterator())
        jobs += [[*fixed, f"{searched.get_key_element()}={edge}"] for edge in edges]
    return jobs


def prepare(configs: list[RunConfig], progress_factory) -> list[Path]:
    """Train (or find) each distinct dense run the jobs need, before the sweep; returns their directories.

    A dense run that fails (diverges) does not stop the sweep: the jobs that need it fail with records of their own,
    the others run.
    """
    from .console import console
    from .dense import resolve_dense

    done: dict[str, Path] = {}
    failed: set[str] = set()
    for config in configs:
        key = config.dense_key()
        if config.needs_dense and not config.dense and key not in done and key not in failed:
            try:
                done[key] = resolve_dense(config, progress_factory("dense reference"))
            except ConfigError as error:  # under a cluster launcher the jobs' device was not checked here
                if error.key != "trainer.device":
                    raise
                raise ConfigError(error.key, f"{error.message}; the dense runs the sweep's "
                                  "baselines start from are trained on this machine before the jobs are submitted: train "
                                  "one where CUDA is and give it with dense=DIR") from error
            except FloatingPointError as error:  # the training diverged; anything else stops the sweep as before
                failed.add(key)
                console.print(f"[red]dense reference failed[/] ({error.__class__.__name__}: {error}): the jobs that "
                              "need it will fail", highlight=False)
    return list(done.values())


def record_unfinished(sweep_dir: Path, error: BaseException | None = None, status: str = "interrupted") -> None:
    """Jobs a stopped sweep left without a record (a launcher's worker killed with it, or dead): recorded with
    ``status`` and ``error`` (an interrupt by default)."""
    from .runner import failed_record

    for snapshot in sorted(sweep_dir.rglob(".hydra/config.yaml")) if sweep_dir.is_dir() else []:  # any subdir depth
        job = snapshot.parent.parent
        if not (job / RESULT_FILE).exists():
            try:
                loaded = OmegaConf.load(snapshot)
            except Exception:  # a snapshot cut short: nothing to record the job from
                continue
            try:  # Hydra saves interpolations (scorer.seed: ${seed}): the record holds what the job would have run
                source = OmegaConf.to_container(loaded, resolve=True)
            except Exception:  # one that cannot resolve outside the job (${hydra:...}): as written
                source = OmegaConf.to_container(loaded, resolve=False)
            failed_record(source if isinstance(source, dict) else {}, job, error or KeyboardInterrupt(), status=status)


def job_dirs(returns: Any) -> list[Path]:
    """Every job's output directory, from Hydra's job returns."""
    return [Path(job.hydra_cfg.hydra.runtime.output_dir) for batch in returns or [] for job in batch]


@dataclass
class SweepResult:
    """Where a sweep's jobs went: the sweep directory, and each job's directory when the sweeper returns them.

    ``study`` is an Optuna search: it returns no jobs, and saves its best trial in the sweep directory.
    """

    directory: Path
    job_dirs: list[Path]
    study: bool = False
    stopped: str | None = None  # why the launcher stopped before every job ran (a worker that died)

    @property
    def record_paths(self) -> list[Path]:
        """What the summary reads: this sweep's jobs, or its whole directory when the sweeper did not list them."""
        return self.job_dirs or [self.directory]

    def failed_jobs(self) -> int:
        """Jobs whose record is missing or does not say ok (they are in the table; the exit code tells scripts)."""
        from .records import RESULT_FILE, RecordError, read_record

        failed = 0
        for job_dir in self.job_dirs:
            try:
                failed += read_record(job_dir / RESULT_FILE).status != "ok"
            except RecordError:
                failed += 1
        return failed


@dataclass
class BestTrial:
    """The Optuna study's best trial: its parameters, validation value and run directory (if found)."""

    params: dict[str, Any]
    value: float
    run_dir: Path | None
    from_records: bool = False  # the sweeper saved no best trial: this is the best of the trials' records


def best_trial(sweep_dir: Path) -> BestTrial | None:
    """Read the best trial the Optuna sweeper saved (``optimization_results.yaml``), or find it in the trials' records
    where it saved none; None when no trial finished."""
    results = sweep_dir / OPTUNA_RESULTS
    if not results.is_file():
        return best_recorded_trial(sweep_dir)
    saved = OmegaConf.to_container(OmegaConf.load(results))
    if "best_params" not in saved:  # a multi-objective study has a Pareto front, not one best trial
        return None
    params = saved["best_params"]
    wanted = {f"{key}={value}" for key, value in params.items()}  # as the sweeper wrote them into each job's overrides
    run_dir = next((job for job in sorted(sweep_dir.glob(f"**/{OVERRIDES_FILE}"))  # any hydra.sweep.subdir depth
                    if wanted <= set(OmegaConf.load(job))), None)
    return BestTrial(params, float(saved["best_value"]), run_dir.parent.parent if run_dir else None)


def best_recorded_trial(sweep_dir: Path) -> BestTrial | None:
    """The best trial by the validation metric in the trials' own records, where the sweeper saved none: with the
    grid sampler, a last trial that fails stops the sweeper before it writes its results. Its parameters are the
    overrides that set it apart from the other trials."""
    from .records import read_record

    trials, finished = [], []
    for overrides in sorted(sweep_dir.glob(f"**/{OVERRIDES_FILE}")):
        trials.append(set(OmegaConf.load(overrides)))
        try:
            record = read_record(overrides.parent.parent / RESULT_FILE)
        except ValueError:  # no record, or a damaged one: not a finished trial
            continue
        if record.status == "ok" and record.primary_value("val") is not None:
            finished.append((record, overrides.parent.parent, trials[-1]))
    if not finished:
        return None
    choose = max if finished[0][0].higher_is_better else min
    record, run_dir, overrides = choose(finished, key=lambda trial: trial[0].primary_value("val"))
    shared = set.intersection(*trials)
    params = dict(o.split("=", 1) for o in sorted(overrides - shared))
    return BestTrial(params, record.primary_value("val"), run_dir, from_records=True)
