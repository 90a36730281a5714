"""Hydra's optional sweep plugins as patcli uses them: which extra installs each, torch threads for parallel jobs,
and the direction an Optuna study must take on the validation metric.

The plugins themselves (launch, sample, tell) stay Hydra's; this only fills the gaps between them and a training job.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, RunConfig
from .paths import unwritable_reason

# Options of Hydra's own groups that come from a plugin, and the patcli extra that installs it.
PLUGIN_EXTRAS = {
    "hydra/launcher": {"joblib": "sweep", "submitit_slurm": "slurm", "submitit_local": "slurm"},
    "hydra/sweeper": {"optuna": "sweep"},
}

JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


def missing_plugin(group: str, option: str) -> str | None:
    """The one-line fix when ``group=option`` names a plugin that is not installed; None if it names none."""
    extra = PLUGIN_EXTRAS.get(group, {}).get(option)
    if extra is None:
        return None
    return f"{group}={option} needs a Hydra plugin that is not installed: pip install -c constraints.txt -e '.[{extra}]' in the patcli checkout"


def job_threads(launcher: DictConfig) -> int | None:
    """Torch threads for one job when the launcher runs jobs side by side on this machine: cores // parallel jobs.

    Two jobs of two threads each on two cores ran slower than one job at a time (DESIGN.md §5); one thread each
    ran ~1.7x faster. None for launchers that run one job at a time or on other machines.
    """
    if launcher.get("_target_") != JOBLIB_LAUNCHER:
        return None
    import joblib

    cores = joblib.cpu_count()
    n_jobs = int(launcher.get("n_jobs", -1))
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's meaning: -1 = all cores, -2 = all but one
    return max(1, cores // parallel)


def check_launcher(launcher: DictConfig) -> None:
    """What would fail inside a launcher once the sweep has started, said before: SLURM without its tools here, and
    joblib's n_jobs 0 (or below -cores), which launches nothing."""
    if str(launcher.get("_target_", "")).endswith("SlurmLauncher") and shutil.which("srun") is None:
        raise ConfigError("hydra/launcher", "submitit_slurm submits to SLURM, and this machine has no srun on PATH; "
                                            "allowed here: basic, joblib or submitit_local, or run from a SLURM login node")
    for key in ("timeout", "timeout_min"):  # joblib's seconds, submitit's minutes: 0 or below stopped every job at once
        limit = launcher.get(key)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
            unit = "minutes" if key == "timeout_min" else "seconds"
            raise ConfigError(f"hydra.launcher.{key}", f"{limit!r} is out of range; allowed: {unit} > 0"
                                                       f"{', or null (no limit)' if key == 'timeout' else ''}")
    if launcher.get("_target_") != JOBLIB_LAUNCHER:
        return
    if launcher.get("backend") not in (None, "loky"):  # the plugin runs loky whatever is asked, without a word
        raise ConfigError("hydra.launcher.backend", f"{launcher.backend!r} is not used: Hydra's joblib launcher always "
                                                    "runs its jobs in loky processes; allowed: loky, or null")
    import joblib

    cores, n_jobs = joblib.cpu_count(), launcher.get("n_jobs", -1)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -cores:
        raise ConfigError("hydra.launcher.n_jobs", f"{n_jobs!r} is out of range; allowed: jobs at a time >= 1, or -1 "
                                                   f"(one per core) to -{cores} (-k: one per core but k-1)")


def check_optuna_settings(sweeper: DictConfig) -> None:
    """The Optuna sweeper's own numbers, which it checks with an assert or a division only once the sweep folder is
    made: say which key, before."""
    if sweeper.get("_target_") != OPTUNA_SWEEPER:
        return
    for key, low in (("n_trials", 1), ("n_jobs", 1)):
        value = sweeper.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"hydra.sweeper.{key}", f"{value!r} is out of range; allowed: an integer >= {low}")
    rate = sweeper.get("max_failure_rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ConfigError("hydra.sweeper.max_failure_rate", f"{rate!r} is out of range; allowed: 0.0 <= value <= 1.0")
    seed = (sweeper.get("sampler") or {}).get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise ConfigError("hydra.sweeper.sampler.seed", f"{seed!r} is out of range; allowed: 0 <= seed < 2**32, or null")
    check_sampler(sweeper.sampler)


def check_sampler(sampler: DictConfig) -> None:
    """The sampler is made as the sweeper makes it (the grid one as a partial, its search space added later): a
    class or setting it cannot take failed inside the sweeper."""
    from hydra.utils import instantiate

    try:
        instantiate(sampler)
    except Exception as error:  # an import, a signature or the sampler's own check: whichever, one line
        why = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError("hydra.sweeper.sampler", f"Optuna's sampler cannot be made ({why}); allowed: "
                                                   "hydra/sweeper/sampler=tpe, random, cmaes, grid, nsgaii or motpe, with "
                                                   "their own settings") from error


def check_storage(sweeper: DictConfig) -> None:
    """An Optuna study kept in a SQLite file the sweep cannot write fails inside the sweeper: say so before."""
    storage = str(sweeper.get("storage") or "")
    if sweeper.get("_target_") != OPTUNA_SWEEPER or not storage:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(storage)
    except ArgumentError as error:  # a bare file name, or sqlite:/ with one slash
        raise ConfigError("hydra.sweeper.storage", f"{storage!r} is not a database URL; allowed: e.g. "
                                                   "sqlite:///study.db (a file beside the run), or null") from error
    try:  # the dialect and its driver, as the sweeper's engine would load them (nothing is connected to)
        dialect = url.get_dialect()
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # SQLAlchemy 2 names it import_dbapi
    except (NoSuchModuleError, ImportError) as error:
        raise ConfigError("hydra.sweeper.storage", f"{storage} cannot be opened here ({error}); allowed: sqlite:///FILE, "
                                                   "or a database whose driver is installed") from error
    path = sqlite_file(storage)
    if path is None:
        return
    why = unwritable_reason(path, want_dir=False)
    if not why and not path.absolute().parent.is_dir():  # SQLite makes the file, not its folder
        why = f"{path.absolute().parent} does not exist; allowed: a file in an existing, writable directory"
    if not why and path.is_file() and not is_sqlite_database(path):
        why = f"{path} is not an SQLite database; allowed: a study's database file, or a new file name"
    if why:
        raise ConfigError("hydra.sweeper.storage", why)


def resumed_study_seed(sweeper: DictConfig) -> tuple[int, int] | None:
    """(trials already in the study, the sampler seed to go on with) when a seeded study kept in storage is resumed;
    None when nothing is resumed. Seeded as before, the sampler would draw the earlier trials again (its first ones
    are random draws from the seed) and spend the new budget repeating them: the seed moves on by the trials there."""
    storage, sampler = str(sweeper.get("storage") or ""), sweeper.get("sampler") or {}
    name, seed = sweeper.get("study_name"), sampler.get("seed")
    if sweeper.get("_target_") != OPTUNA_SWEEPER or not storage or name is None or seed is None:
        return None  # without a name, Optuna starts a new study each time
    path = sqlite_file(storage)
    if path is not None and not path.is_file():
        return None  # a new study (and no database file made here)
    import optuna

    trials = next((s.n_trials for s in optuna.get_all_study_summaries(storage=storage) if s.study_name == name), 0)
    return (trials, (int(seed) + trials) % 2**32) if trials else None  # Optuna's seeds are 32-bit


def save_stored_best(sweeper: DictConfig, sweep_dir: Path) -> None:
    """Write the best trial of a study kept in storage (over every session) where the sweeper saved none, as it
    would have: a grid study whose last trial fails stops before saving it. An in-memory study is this sweep alone,
    whose records tell its best."""
    from .sweeps import OPTUNA_RESULTS

    storage, name = str(sweeper.get("storage") or ""), sweeper.get("study_name")
    if not storage or name is None:
        return
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        return
    best = study.best_trial
    OmegaConf.save({"name": "optuna", "best_params": best.params, "best_value": best.value}, sweep_dir / OPTUNA_RESULTS)


def sqlite_file(storage: str) -> Path | None:
    """The file an SQLite storage URL names (its query, e.g. ``?timeout=30``, left out); None for any other storage,
    or SQLite in memory. The URL must parse (check_storage)."""
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    database = url.database if url.get_backend_name() == "sqlite" else None
    return Path(database) if database and database != ":memory:" else None


SQLITE_HEADER = b"SQLite format 3\x00"


def is_sqlite_database(path: Path) -> bool:
    """Whether ``path`` is an SQLite database SQLite can read, without writing to it. An empty file is one (SQLite
    makes it one); any other file must begin with SQLite's header, as SQLite also takes a one-byte file for an empty
    database and would write over it."""
    import sqlite3

    with path.open("rb") as file:
        header = file.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as connection:
            connection.execute("PRAGMA schema_version")
        return True
    except sqlite3.DatabaseError:
        return False


def check_direction(sweeper: DictConfig, config: RunConfig) -> None:
    """An Optuna study optimises the job's validation primary metric: its direction must be that metric's."""
    if sweeper.get("_target_") != OPTUNA_SWEEPER:
        return
    from .data import load_dataset

    metric, higher = load_dataset(config.dataset).primary_metric
    wanted = "maximize" if higher else "minimize"
    direction = sweeper.get("direction")
    given = getattr(direction, "name", direction)  # an enum from the plugin's schema, or a list for multi-objective
    if given != wanted:
        better = "higher" if higher else "lower"
        raise ConfigError("hydra.sweeper.direction", f"{given} does not fit val {metric} ({better} is better); allowed: {wanted}")
