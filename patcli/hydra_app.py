"""Hydra inside Typer: compose, validate, then run or multirun through Hydra itself (DESIGN.md §5).

Composition errors become one-line ``UsageError``s naming the key and the allowed values. The task function is
module-level because joblib and submitit pickle it.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import multiprocessing
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from hydra.initialize import initialize_config_dir
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .config import TOP_LEVEL, ConfigError, RunConfig, parse_run_config
from .records import WriteError

if TYPE_CHECKING:
    from .sweeps import SweepResult

CONFIG_NAME = "config"
START_DIR_ENV = "PATCLI_START_DIR"  # set in every sweep job by Hydra (hydra.job.env_set): where the sweep started


PRUNING_GROUPS = ("scorer", "schedule", "allocation", "regrowth")


@functools.cache
def pruning_defaults() -> dict[str, dict[str, Any]]:
    """The options conf/config.yaml picks for the groups only pruning uses, with their parameters: what a dense run
    records for them (callers copy before changing them)."""
    picked: dict[str, str] = {}
    for entry in OmegaConf.load(conf_dir() / f"{CONFIG_NAME}.yaml").defaults:
        if isinstance(entry, DictConfig):
            picked.update(entry)
    return {group: OmegaConf.to_container(OmegaConf.load(conf_dir() / group / f"{picked[group]}.yaml"))
            for group in PRUNING_GROUPS}


def quoted(value: str) -> str:
    """A value as a quoted Hydra override string (paths may hold characters the override grammar reserves)."""
    escaped = value.replace("'", "\\'")
    trailing = len(escaped) - len(escaped.rstrip("\\"))  # a backslash before the closing quote would escape it
    return "'" + escaped + "\\" * trailing + "'"


class UsageError(Exception):
    """A user mistake, shown as one line and exit code 2."""


def conf_dir() -> Path:
    """conf/ shipped inside the package (wheel installs) or at the repository's top level (editable installs)."""
    packaged = Path(str(resources.files("patcli"))) / "conf"
    if (packaged / f"{CONFIG_NAME}.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "conf"


def experiments() -> list[str]:
    """The sweep presets in conf/experiment/."""
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def config_groups() -> dict[str, list[str]]:
    """Each config group and its options, read from conf/ (hydra's own groups excluded)."""
    root = conf_dir()
    groups = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
        groups[folder.name] = sorted(f.stem for f in folder.glob("*.yaml"))
    return groups


if not OmegaConf.has_resolver("uid"):
    # A short random token in run directory names: runs started in the same second never share a directory.
    OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True)


def _group_error(group: str, option: str) -> UsageError:
    if group.startswith("hydra/"):
        return _hydra_group_error(group, option)
    options = config_groups().get(group)
    if options is None:
        return UsageError(f"{group}: unknown config group; allowed: {', '.join(config_groups())}")
    return UsageError(f"{group}={option}: unknown option; allowed: {', '.join(options)}")


def _hydra_group_error(group: str, option: str) -> UsageError:
    """Hydra's own groups (launchers, sweepers) get their options from Hydra and its installed plugins."""
    from .plugins import missing_plugin

    hint = missing_plugin(group, option)
    if hint:
        return UsageError(hint)
    options = GlobalHydra.instance().hydra.config_loader.get_group_options(group)
    if not options:
        return UsageError(f"{group}: unknown config group")
    return UsageError(f"{group}={option}: unknown option; allowed: {', '.join(options)}")


def _unknown_key_error(key: str, overrides: list[str]) -> UsageError:
    """List the keys that exist under the same parent, in the config as the user's group choices compose it."""
    if key == "experiment":  # a preset is appended to the defaults, not chosen from them
        return UsageError(f"experiment: a preset is added with a plus; allowed: patcli sweep +experiment=NAME ({', '.join(experiments())})")
    parent, _, _ = key.rpartition(".")
    try:
        cfg = composed_choices(overrides)
        parts = key.split(".")  # the deepest group that exists: prunin.sparsity is unknown at prunin
        depth = len(parts) - 1
        while depth and not isinstance(OmegaConf.select(cfg, ".".join(parts[:depth])), DictConfig):
            depth -= 1
        parent, first_unknown = ".".join(parts[:depth]), ".".join(parts[: depth + 1])
        if first_unknown != key and OmegaConf.select(cfg, first_unknown) is not None:  # trainer.lr.x: lr is a value
            return UsageError(f"{key}: {first_unknown} takes a value, not keys; allowed: {first_unknown}=VALUE")
        holder = OmegaConf.select(cfg, key)
        if isinstance(holder, DictConfig):  # a dict given whole to a node of keys: new keys cannot merge into it
            keys = list(holder.keys())
            how = f"{key}.KEY=VALUE ({', '.join(keys)})" if keys else f"+{key}.KEY=VALUE"
            return UsageError(f"{key}: takes its keys one at a time; allowed: {how}")
        if holder is not None:  # the swept options have it; the sweep's own config is composed with the default's
            return UsageError(f"{key}: the sweep's config is composed with {parent}'s default option before each job "
                              f"chooses its own, and the default has no such key; allowed: ++{key}=VALUE (each job's "
                              "option must take it)")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        chosen = parent in config_groups()  # its name (pruning's mode) is chosen with GROUP=OPTION, never set
        selector = SELECTOR.get(parent, "name")
        allowed = [k for k in node.keys() if k != "hydra" and not (chosen and k == selector)]
        if chosen and not allowed:
            return UsageError(f"{key}: unknown key; {parent}={node.get(selector)} takes no settings")
        if key == "pruning.sparsity" and node.get("mode") == "none":
            return UsageError("pruning.sparsity: pruning=none trains the dense reference, which has no sparsity to set; "
                              "allowed: leave it out (a sweep over dense and pruned runs: +experiment=pat_vs_post, or "
                              "the sparsities of the pruned runs swept apart)")
    except Exception:
        parent, allowed = "", list(TOP_LEVEL)
    given = next((o.lstrip("+") for o in overrides if override_key(o) == key), f"{key}=VALUE")
    if parent and not allowed:  # a node of keys of one's own, empty so far (hydra.job.env_set)
        return UsageError(f"{key}: unknown key; {parent} has none yet, a new one is added with a plus: +{given}")
    hint = "; for a model of your own: model=custom model._target_=package.Class" if key == "model._target_" else ""
    if parent == "model" and allowed == ["_target_"]:  # model=custom: its arguments are keys of one's own
        hint = f"; an argument of your model's class is added with a plus: +{key}=VALUE"
    return UsageError(f"{key}: unknown key; allowed: {', '.join(f'{parent}.{a}' if parent else a for a in allowed)}{hint}")


def composed_choices(overrides: list[str]) -> DictConfig:
    """The config as the user's group choices compose it, for hints: a swept choice (scorer=a,b) counts as its first
    option, so the hint of a sweep's mistake names the keys its jobs have."""
    choices = [o.split(",", 1)[0] for o in overrides if re.fullmatch(r"[\w/]+=[\w,.-]+", o)]
    return GlobalHydra.instance().hydra.compose_config(CONFIG_NAME, choices, run_mode=RunMode.RUN)


def holds_a_list(key: str, overrides: list[str]) -> bool:
    try:
        return isinstance(OmegaConf.select(composed_choices(overrides), key.lstrip("+")), ListConfig)
    except Exception:  # a hint only
        return False


def unparsable_override(overrides: list[str]) -> str | None:
    """The first override Hydra's grammar refuses, which its own message does not name."""
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except (HydraException, ValueError):  # the grammar's error, or the value of a function like float(abc)
            return override
    return None


def translate_hydra_error(error: Exception, overrides: list[str]) -> UsageError:
    """Hydra's multi-line composition messages → one line with the key and what is allowed."""
    text = str(error)
    if (given := sweeper_params_given(overrides)) and ("hydra.sweeper.params" in text or "Hydra's configuration" in text):
        named = [o for o in overrides if f"'{override_key(o)}'" in text]  # the one Hydra's message names
        return sweeper_params_error(named[0] if named else given)  # a key the preset's space lacks, or one swept
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        return _group_error(missing.group(1), missing.group(2))
    missing_group = re.search(r"Could not find '([^'/]+)'", text)
    if missing_group:
        return _group_error(missing_group.group(1), "")
    override = re.search(r"Could not (?:override|append to) '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if override:
        return _unknown_key_error(override.group(1), overrides)
    ambiguous = re.search(r"Ambiguous value for argument '([^'=]+)=(.*)'$", (text.splitlines() or [""])[0])
    if ambiguous:  # a comma list given to train/prune-post (paths come back quoted by absolute_paths)
        key, value = ambiguous.group(1), ambiguous.group(2).replace("'", "")
        if key.lstrip("+") in PATH_KEYS:
            one = f"one path (a name with a comma quoted: {key}='{value}')"
        elif key.lstrip("+") in config_groups():
            one = "one option"
        else:
            one = f"one list, e.g. {key}=[a,b]" if holds_a_list(key, overrides) else "one value"
        return UsageError(f"{key}: {value} is several values; allowed: {one}, or several runs with patcli sweep {key}={value}")
    swept = re.search(r"Sweep parameters '([^'=]+)=(.*)' requires --multirun", text)
    if swept:  # range(), interval(), choice() or glob() given to train/prune-post
        key, value = swept.groups()
        return UsageError(f"{key}: {value} is a sweep; allowed: one value, or several runs with patcli sweep {key}={value}")
    merging = re.match(r"Error merging override ([^=]+)=(.*)", text)
    why = str(error.__cause__).splitlines() if error.__cause__ is not None else []
    if merging and why and why[0]:  # OmegaConf says why (a type) on the first line of the cause
        return UsageError(f"{merging.group(1)}: {why[0]}")
    if isinstance(error, OverrideParseException):
        why = " ".join(text.split())
        bad = unparsable_override(overrides)
        return UsageError(f"{override_key(bad)}: cannot parse {bad!r}: {why}" if bad else f"cannot parse override: {why}")
    return UsageError(text.splitlines()[0] if text else error.__class__.__name__)


def compose(overrides: list[str], run_mode: RunMode) -> DictConfig:
    try:
        return GlobalHydra.instance().hydra.compose_config(CONFIG_NAME, overrides, run_mode=run_mode)
    except (MissingConfigException, ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as error:
        raise translate_hydra_error(error, overrides) from error


def job_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config without Hydra's own section, resolved to plain containers."""
    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)  # the key whose interpolation failed
        where = f"{key}: cannot resolve its interpolation" if key else "cannot resolve config"
        raise UsageError(f"{where}: {str(error).splitlines()[0]}") from error


def validate(source: dict[str, Any], check: Callable[[RunConfig], None] | None = None) -> RunConfig:
    """Parse and plan a config; every mistake becomes a UsageError before any run directory exists."""
    from .runner import plan

    try:
        config = parse_run_config(source)
        if check:
            check(config)
        plan(config)
        return config
    except ConfigError as error:
        raise UsageError(str(error)) from error


def check_run_dir(overrides: list[str], cfg: DictConfig, multirun: bool) -> None:
    """The run (or sweep) directory Hydra will make can be made: else one line naming the key that placed it."""
    from .paths import unwritable_reason

    key = run_dir_key(overrides, multirun)
    try:
        value = cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir
    except OmegaConfBaseException as error:
        raise UsageError(f"{key}: {str(error).splitlines()[0]}") from error
    if value is None or not str(value).strip():
        raise UsageError(f"{key}: empty; allowed: a directory path")
    directory = Path(value)
    why = unwritable_reason(directory, want_dir=True) or holds_a_run(directory) or inside_a_sweep_or_run(directory)
    if why:
        raise UsageError(f"{key}: {why}")
    root = cfg.get("output_root")  # where shared dense runs go, whatever the run dir
    if root is not None and not str(root).strip():  # runs, dense runs and sweeps would go to the filesystem's root
        raise UsageError("output_root: empty; allowed: a directory path")
    baseline = OmegaConf.select(cfg, "baseline.name", default="none", throw_on_resolution_failure=False)
    dense = OmegaConf.select(cfg, "dense", throw_on_resolution_failure=False)  # validate says what fails to resolve
    needs_cache = multirun or (baseline != "none" and not dense)  # a sweep's jobs may choose a baseline of their own
    why = needs_cache and root is not None and unwritable_reason(Path(str(root)) / "dense", want_dir=True)
    if why:
        raise UsageError(f"output_root: {why}")


def run_dir_key(overrides: list[str], multirun: bool) -> str:
    """The option that placed the run (or sweep) directory, for errors about it."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    return key if any(o.lstrip("+").startswith(f"{key}=") for o in overrides) else "output_root"


@contextmanager
def claimed_run_dir(overrides: list[str], cfg: DictConfig) -> Iterator[list[str]]:
    """Take the run directory once the run is checked, and pin it for Hydra: yields the overrides to run with.

    Two runs started together into one hydra.run.dir both passed check_run_dir, and the second merged its metrics
    into the first's and replaced its files. Making the folder Hydra keeps the run's config in is atomic: one wins.
    A run that stops before it begins (Ctrl-C while Hydra sets it up, a disk too full for Hydra's own files) gives
    the claim back, so that a retry into the folder is not refused as a run's.
    """
    directory = Path(str(cfg.hydra.run.dir)).absolute()  # resolved once: ${now:} and ${uid:} would differ later
    made = not os.path.isdir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:  # Hydra's own config folder by default; with hydra.output_subdir elsewhere, an empty one as the claim
        (directory / ".hydra").mkdir()
    except FileExistsError:
        raise UsageError(f"{run_dir_key(overrides, False)}: {directory} was taken by another run started at the same "
                         "time; allowed: a directory no run uses") from None
    try:
        yield [*(o for o in overrides if not o.lstrip("+").startswith("hydra.run.dir=")), f"hydra.run.dir={quoted(str(directory))}"]
    except BaseException:
        log = directory / "run.log"
        unstarted = {".hydra", "run.log"} if os.path.isfile(log) and os.path.getsize(log) == 0 else {".hydra"}
        if set(os.listdir(directory)) <= unstarted:  # Hydra's own files alone: no record, no metrics, no log line
            shutil.rmtree(directory / ".hydra", ignore_errors=True)
            for name in unstarted - {".hydra"}:
                (directory / name).unlink(missing_ok=True)
            if made:
                directory.rmdir()
        raise


# Made in a sweep's folder, atomically, before its jobs start: one sweep per folder, and a folder known as a sweep's
# before its sweeper writes anything (an Optuna study writes no multirun.yaml, and its results file only at the end)
SWEEP_MARK = ".patcli-sweep"


@contextmanager
def claimed_sweep_dir(overrides: list[str], directory: Path) -> Iterator[None]:
    """Two sweeps started together into one hydra.sweep.dir both passed check_run_dir, then wrote their jobs over
    each other's folders and each printed a table of the other's runs: making the mark is atomic, one wins.

    A sweep that stops before its sweeper wrote anything (an Optuna storage that cannot be opened) leaves the folder
    as it found it, so that a retry into it is not refused as an earlier sweep's."""
    made = not os.path.isdir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        (directory / SWEEP_MARK).touch(exist_ok=False)
    except FileExistsError:
        raise UsageError(f"{run_dir_key(overrides, True)}: {directory} was taken by another sweep started at the same "
                         "time; allowed: a directory no sweep uses") from None
    try:
        yield
    except BaseException:
        if set(os.listdir(directory)) <= {SWEEP_MARK, "multirun.yaml"}:  # no job began (Ctrl-C while workers start)
            for name in (SWEEP_MARK, "multirun.yaml"):
                (directory / name).unlink(missing_ok=True)
            if made:
                directory.rmdir()
        raise


def inside_a_sweep_or_run(directory: Path) -> str | None:
    """Why ``directory`` must not hold a new run or sweep: it lies inside an earlier sweep's folder, whose table
    (``compare`` of that folder, an Optuna study's best trial) would then count it as one of its jobs, or inside a
    run's, where ``compare`` would read it as a repeat and ``patcli export`` replaces the export/ folder whole."""
    from .records import RESULT_FILE, RecordError, read_record

    def is_run(folder: Path) -> bool:  # a patcli record, not any file of that name (a project's own result.json)
        if not os.path.isfile(folder / RESULT_FILE):
            return False
        try:
            read_record(folder / RESULT_FILE)
        except RecordError:
            return False
        return True

    # where the folder really is: sweep/../x lies beside the sweep, a-link-into-it/../x inside it
    for parent in Path(os.path.realpath(directory)).parents:
        mark = next((m for m in ("multirun.yaml", SWEEP_MARK) if os.path.isfile(parent / m)), None)
        if mark:
            return f"{directory} lies inside the sweep {parent} ({mark}); allowed: a directory outside it"
        if is_run(parent):
            return f"{directory} lies inside the run {parent} (result.json); allowed: a directory outside it"
    return None


def holds_a_run(directory: Path) -> str | None:
    """Why ``directory`` must not be reused: a run or sweep is already there (either, whichever this command makes),
    and patcli never overwrites one."""
    if not os.path.isdir(directory):  # never raises, unlike pathlib (a name too long)
        return None
    # at any depth: a sweep folder given by hand may hold earlier sweeps under their date folders, whose records a
    # sweep's own table (and an Optuna study's) would then read as its own
    marks = {"multirun.yaml": "sweep", SWEEP_MARK: "sweep", "result.json": "run", ".hydra": "run",
             "*/**/multirun.yaml": "sweep", "*/**/result.json": "run"}
    held = next(((hit, kind) for pattern, kind in marks.items() for hit in directory.glob(pattern)), None)
    if held is None:
        return None
    return f"{directory} already holds a {held[1]} ({held[0].relative_to(directory)}); allowed: a directory that holds no run or sweep"


def check_device_here(config: RunConfig) -> None:
    """A device this machine lacks (trainer.device=cuda) fails before any run directory exists."""
    from .training import resolve_device

    try:
        resolve_device(config.trainer.device)
    except ConfigError as error:
        raise UsageError(str(error)) from error


_single_run_errors: list[Exception] = []  # a single run's error, handed from task back to launch


def task(cfg: DictConfig) -> float | None:
    """Hydra's task function: one run, in the directory Hydra made for it (in a worker process under joblib)."""
    from . import jobs
    from .plugins import job_threads

    hydra = HydraConfig.get()
    started_in = os.environ.get(START_DIR_ENV)
    if started_in and os.getcwd() != started_in and os.path.isdir(started_in):
        # a reused joblib worker may sit where an earlier sweep of this process started: relative paths in the
        # config (output_root, dense, dataset.path) mean the directory the sweep was started from
        os.chdir(started_in)
    source = job_config(cfg)
    keep_overrides(hydra, Path(hydra.runtime.output_dir))
    threads = job_threads(hydra.launcher)
    if threads and not source["trainer"].get("threads"):  # parallel jobs must not fight over the cores
        source["trainer"]["threads"] = threads
    if hydra.mode == RunMode.MULTIRUN:
        from .sweeps import BASIC_SWEEPER

        searching = hydra.sweeper.get("_target_") != BASIC_SWEEPER
        return jobs.run_job(source, Path(hydra.runtime.output_dir), hydra.mode, searching)
    try:
        return jobs.run_job(source, Path(hydra.runtime.output_dir), hydra.mode)
    except Exception as error:  # raised again by launch: Hydra would first print a line of its own to stderr
        _single_run_errors.append(error)
        return None


def keep_overrides(hydra: DictConfig, run_dir: Path) -> None:
    """Every run keeps its overrides in ``.hydra``, as Hydra does by default: a study finds its best trial's run by
    them. With hydra.output_subdir elsewhere or null, Hydra keeps them elsewhere or nowhere."""
    from .sweeps import OVERRIDES_FILE

    if hydra.output_subdir != ".hydra":
        path = run_dir / OVERRIDES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(hydra.overrides.task, path)


def override_key(override: str) -> str:
    """The key an override sets, without its +, ++ or ~ (``+trainer.lr=0.1`` → ``trainer.lr``)."""
    return override.lstrip("+~").split("=", 1)[0].strip()


def check_no_flags(overrides: list[str]) -> None:
    """``--sparsity 0.9`` reached Hydra's parser, whose message names neither the key nor the way to write it."""
    flag = next((o for o in overrides if o.startswith("-")), None)
    if flag:
        raise UsageError(f"{flag}: settings are Hydra overrides, key=value, not flags; allowed: e.g. pruning.sparsity=0.9 "
                         "trainer.epochs=3 (the command's --help lists the keys)")


def check_keys_given(overrides: list[str]) -> None:
    """``=0.9`` (a script's empty variable before it) ended in a ValueError traceback inside Hydra."""
    keyless = next((o for o in overrides if "=" in o and not override_key(o)), None)
    if keyless:
        raise UsageError(f"{keyless}: an override needs a key; allowed: KEY=VALUE, e.g. pruning.sparsity=0.9")


def check_no_chdir(cfg: DictConfig) -> None:
    """hydra.job.chdir=true moved a run into its own folder, where a relative output_root found no dense run and
    trained one inside the run's folder: patcli writes a run's files there itself. Read composed: Hydra takes yes,
    on and 1 for true."""
    if cfg.hydra.job.get("chdir"):
        raise UsageError("hydra.job.chdir: true is not allowed: a run works from the directory patcli started in "
                         "(relative output_root, dense, dataset.path and trainer.init_from mean that one) and writes its "
                         "files into its run folder itself; allowed: false (the default)")


def check_no_sweeper_params(overrides: list[str]) -> None:
    """hydra.sweeper.params given on the command line without a preset that sets it broke inside OmegaConf's merge
    (a traceback): on the command line, a search space is the searched keys' own overrides."""
    given = sweeper_params_given(overrides)
    preset = any(o.lstrip("+").startswith("experiment=") for o in overrides)  # a preset's params may be replaced
    if given and not preset:
        raise sweeper_params_error(given)


def sweeper_params_given(overrides: list[str]) -> str | None:
    return next((o for o in overrides if override_key(o).startswith("hydra.sweeper.params")), None)


def sweeper_params_error(given: str) -> UsageError:
    return UsageError(f"{override_key(given)}: the searched keys are given as overrides of their own on "
                      "the command line; allowed: e.g. 'pruning.sparsity=interval(0.5,0.9)' (hydra.sweeper.params is a "
                      "sweep preset's, in its YAML file, whose own keys it may set)")


def check_no_mode(overrides: list[str]) -> None:
    """``hydra.mode=MULTIRUN`` on train ended in an AssertionError inside Hydra: the command is what chooses."""
    if any(override_key(o) == "hydra.mode" for o in overrides):
        raise UsageError("hydra.mode: the command sets it (train and prune-post run one job, sweep a multirun); "
                         "allowed: leave it out")


SELECTOR = {"pruning": "mode"}  # the key that names a group's option in its YAML files ("name" elsewhere)


def check_group_overrides(overrides: list[str]) -> None:
    """What a group takes is one option name per run (a sweep: several), each refused in one line otherwise:

    - ``model.name=cnn`` would keep the MLP's keys under another name and fail on one of them, and
      ``pruning.mode=block`` would run blocks with none of their settings (``+model.name`` adds a key of one's own);
    - ``scorer=[a,b]`` would merge both options' files (the last one's name wins, keys of the first linger), and
      ``pruning=5`` fails inside Hydra;
    - ``~scorer`` or ``~pruning.sparsity`` would run on a default the run's record does not hold.
    """
    groups = config_groups()
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parsed = parser.parse_override(override)
        except HydraException:  # OverrideParseException among them
            continue  # compose says what it cannot parse
        key, value_text = parsed.key_or_group, override.partition("=")[2]
        group, _, field = key.partition(".")
        if group in groups and field == SELECTOR.get(group, "name") and not parsed.is_add():
            raise UsageError(f"{key}: an option is chosen with {group}={value_text}, not renamed; allowed: "
                             f"{group}=OPTION ({', '.join(groups[group])})")
        if parsed.is_delete() and not key.startswith("hydra"):
            what = f"{key}=OPTION ({', '.join(groups[key])})" if key in groups else f"{key}=VALUE"
            raise UsageError(f"~{key}: a setting cannot be removed; allowed: {what}")
        if key not in groups or parsed.package is not None or parsed.is_delete() or parsed.is_sweep_override():
            continue  # a, b or glob(): the sweep makes one job per option, each checked
        value = parsed.value()
        if not isinstance(value, str) or not value:
            raise UsageError(f"{key}={value_text}: not an option name; allowed: one of {', '.join(groups[key])} "
                             f"(several runs: patcli sweep {key}=a,b)")


PATH_KEYS = ("dataset.path", "dense", "trainer.init_from")
FOLDER_KEYS = ("output_root", "hydra.run.dir", "hydra.sweep.dir")  # written, not read: quoted, left relative


def _absolute(path: str) -> str:
    """``~`` expanded (a shell leaves it alone after ``key=``) and made absolute."""
    return str(Path(path).expanduser().absolute()) if path else path


def absolute_paths(overrides: list[str]) -> list[str]:
    """Relative paths given for files a run reads, made absolute: its saved config (which ``export`` and
    ``load_pruned`` rebuild the run from) must still find them from another directory. Plain values and a sweep's
    comma list of them are rewritten, and so is a single quoted path; interpolations (``$``) and sweep functions are
    left to Hydra. Output folders with a space or a non-ASCII letter are quoted."""
    rewritten = []
    for override in overrides:
        key, _, value = override.partition("=")
        # Hydra ignores spaces around a sweep's commas, and takes an escaped one (\,) as part of the value
        items = [item.strip().replace("\\,", ",") for item in re.split(r"(?<!\\),", value)]
        single = re.fullmatch(r"'([^'\\]*)'|\"([^\"\\]*)\"", value)  # one path the user quoted (spaces, commas)
        if key.lstrip("+") in PATH_KEYS and single and "$" not in value:  # an interpolation is Hydra's to resolve
            override = f"{key}={quoted(_absolute(single.group(1) or single.group(2) or ''))}"
        elif key.lstrip("+") in PATH_KEYS and re.fullmatch(r"[^'\"()\[\]{}$=]+", value) and all(items):
            paths = [p if p.lower() == "null" else quoted(_absolute(p)) for p in items]  # null: unset, not a file called null
            override = f"{key}={','.join(paths)}"
        elif key.lstrip("+") in FOLDER_KEYS and re.fullmatch(r"[^'\"()\[\]{}$=,]+", value) and not re.fullmatch(r"[\w./~@%+:-]+", value, re.ASCII):
            override = f"{key}={quoted(value)}"  # a space or a non-ASCII letter would end Hydra's plain value
        rewritten.append(override)
    return rewritten


def check_one_path_each(overrides: list[str]) -> None:
    """A comma in a single run's path is several values to Hydra: said here, before each is made absolute, so that
    the quoted form offered is the path as given."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") in PATH_KEYS and re.fullmatch(r"[^'\"()\[\]{}$=]+", value) and re.search(r"(?<!\\),", value):
            raise UsageError(f"{key}: {value} is several values; allowed: one path (a name with a comma quoted: "
                             f"{key}='{value}'), or several runs with patcli sweep {key}={value}")


def check_single_process() -> None:
    """Every process torchrun starts would run the whole job and write a record of its own: refuse up front."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise UsageError(f"patcli runs each job in one process, and WORLD_SIZE={world} (torchrun) would run it in every "
                         "process; allowed: run patcli without torchrun (for data-parallel training, the engine works in "
                         "your own DDP loop: README, In your own training loop)")


def launch(
    overrides: list[str],
    *,
    multirun: bool = False,
    show_config: bool = False,
    check: Callable[[RunConfig], None] | None = None,
) -> Any:
    """Compose + validate, then hand the run (or sweep) to Hydra. Returns Hydra's job return(s)."""
    check_single_process()
    check_no_flags(overrides)
    check_keys_given(overrides)
    check_no_mode(overrides)
    check_no_sweeper_params(overrides)
    if not multirun:
        check_one_path_each(overrides)
    overrides = absolute_paths(overrides)
    check_group_overrides(overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="patcli"):
        cfg = compose(overrides, RunMode.MULTIRUN if multirun else RunMode.RUN)
        check_no_chdir(cfg)
        preset = next((o for o in overrides if o.lstrip("+").startswith("experiment=")), None)
        if preset and not multirun:  # its settings are a sweep's: a single run would quietly ignore them
            raise UsageError(f"experiment: {preset} is a sweep preset; allowed: patcli sweep +{preset.lstrip('+')}")
        check_run_dir(overrides, cfg, multirun)
        # --cfg checks as the run would, but for the device: its config may be meant for another machine
        if multirun:
            jobs, composed, configs = checked_sweep(overrides, cfg, check, on_this_machine=not show_config)
            if show_config:
                return shown_sweep(cfg, jobs, composed)
            if jobs is not None:
                from .console import RichProgress
                from .sweeps import prepare

                prepare(configs, RichProgress)  # the dense runs the jobs share, trained once, first
        else:
            config = validate(job_config(cfg), check)
            if show_config:
                return as_yaml(cfg)
            check_device_here(config)
        try:
            if multirun:
                return multirun_sweep(overrides, cfg)
            with claimed_run_dir(overrides, cfg) as pinned:
                _single_run_errors.clear()
                try:
                    returned = GlobalHydra.instance().hydra.run(CONFIG_NAME, task, pinned)
                except OSError as error:  # Hydra's own files (its config snapshot) on a full disk: the job's go to its record
                    raise WriteError(error.filename or cfg.hydra.run.dir, error.strerror or str(error)) from error
                if _single_run_errors:
                    raise _single_run_errors.pop()
                return returned
        except (MissingConfigException, ConfigCompositionException, OverrideParseException) as error:
            raise translate_hydra_error(error, overrides) from error


def multirun_sweep(overrides: list[str], cfg: DictConfig) -> SweepResult:
    """Hand the sweep to Hydra's sweeper and launcher, in a sweep directory fixed beforehand.

    The directory is resolved here (its ``${now:}`` and ``${uid:}``) and passed on as an override, because not every
    sweeper returns its jobs (Optuna's returns nothing) and the summary still has to find them.
    """
    from .console import console
    from .plugins import OPTUNA_SWEEPER, resumed_study_seed, save_stored_best
    from .sweeps import SweepResult, job_dirs, record_unfinished

    directory = str(Path(cfg.hydra.sweep.dir).absolute())  # a joblib worker's own cwd may differ; check_run_dir resolved it
    pinned = [f"hydra.sweep.dir={quoted(directory)}", f"++hydra.job.env_set.{START_DIR_ENV}={quoted(os.getcwd())}"]
    others = [o for o in overrides if not o.startswith("hydra.sweep.dir=")]
    study = cfg.hydra.sweeper.get("_target_") == OPTUNA_SWEEPER
    if study and (resumed := resumed_study_seed(cfg.hydra.sweeper)):
        trials, seed = resumed
        others = [o for o in others if not o.lstrip("+~").startswith("hydra.sweeper.sampler.seed=")]
        pinned.append(f"hydra.sweeper.sampler.seed={seed}")
        console.print(f"resuming study {cfg.hydra.sweeper.study_name!r} after its {trials} trial{'s' * (trials != 1)}: its sampler draws "
                      f"with seed {seed} instead of {cfg.hydra.sweeper.sampler.seed}, so that it does not repeat them",
                      highlight=False, soft_wrap=True, markup=False)
    with claimed_sweep_dir(overrides, Path(directory)):
        try:  # Hydra's own CLI sets the mode; called directly, jobs would not know they are in a sweep
            returns = GlobalHydra.instance().hydra.multirun(CONFIG_NAME, task, [*others, *pinned, "hydra.mode=MULTIRUN"])
        except KeyboardInterrupt:  # a launcher's worker stopped with it leaves no record of its own
            record_unfinished(Path(directory))
            raise
        except ValueError as error:
            if not (study and "No trials are completed yet" in str(error)):
                raise
            returns = None  # every trial failed, so the study has no best trial; the records say why
        except (RuntimeError, TimeoutError, multiprocessing.TimeoutError) as error:
            what = launcher_stop(error)
            if what:  # the jobs the launcher held are recorded; the table shows what ran
                said = (str(error).splitlines() or [""])[0]
                why = f"{type(error).__name__}: {said}" if said else type(error).__name__
                record_unfinished(Path(directory), RuntimeError(f"{what} ({why})"), status="failed")
                return SweepResult(Path(directory), [], study=study, stopped=why)
            # the grid sampler stops the study when its last trial is told as failed, outside where Optuna allows it:
            if not (study and "Study.stop" in str(error)):  # every trial has run, the sweeper saved no best trial:
                raise  # the storage or, for a study in memory, the records tell it
            save_stored_best(cfg.hydra.sweeper, Path(directory))
            returns = None
        except OSError as error:  # Hydra's own multirun.yaml on a full disk: each job's errors go to its record
            raise WriteError(error.filename or directory, error.strerror or str(error)) from error
    return SweepResult(Path(directory), job_dirs(returns), study=study)


def launcher_stop(error: BaseException) -> str | None:
    """Why the launcher stopped the sweep, said on the records of the jobs it held: a worker that died (killed, out of
    memory) or a time limit (joblib's timeout, submitit's timeout_min); None for an error that is not the launcher's."""
    if isinstance(error, concurrent.futures.BrokenExecutor):
        return "the launcher's worker died"
    if isinstance(error, (TimeoutError, multiprocessing.TimeoutError)) or type(error).__name__ == "UncompletedJobError":
        return "the launcher's time limit ran out"
    return None


def checked_sweep(overrides: list[str], cfg: DictConfig, check: Callable[[RunConfig], None] | None,
                  on_this_machine: bool = True) -> tuple[list[list[str]] | None, list[DictConfig], list[RunConfig]]:
    """Every job the basic sweeper will launch, composed and validated, in folders of their own, with the dense runs
    they share outside the sweep's folder: (jobs, composed configs, run configs). A sweeper that picks its jobs as it
    goes (Optuna) has its shared config and the edges of its search space checked: (None, [], [])."""
    jobs = sweep_jobs(overrides, cfg)
    local = "submitit" not in str(cfg.hydra.launcher.get("_target_", ""))  # a cluster launcher runs jobs elsewhere
    if jobs is None:  # each trial checks itself when it starts
        config = checked_study(overrides, cfg, check)
        if local and on_this_machine:
            check_device_here(config)
        if local:
            check_trial_folders(overrides, cfg)
        check_dense_cache_outside(cfg, [config])
        return None, [], []
    composed, configs = [], []
    folders: dict[str, list[str]] = {}  # each job's subdir → the job
    for number, job in enumerate(jobs):
        job_cfg, config = checked_job(job, check, f"sweep job: {' '.join(job)}", on_this_machine=local and on_this_machine)
        composed.append(job_cfg)
        configs.append(config)
        folder = job_subdir(job_cfg, number) if local else None  # a cluster's node may resolve it otherwise
        if folder is not None and folder in folders:  # the later job would overwrite the earlier one's run
            subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir")
            earlier, later = (" ".join(o for o in a if o not in b) for a, b in ((folders[folder], job), (job, folders[folder])))
            raise UsageError(f"hydra.sweep.subdir: {subdir!r} is the same folder ({folder}) for the jobs {earlier!r} and "
                             f"{later!r}; allowed: a name that differs per job, e.g. ${{hydra.job.num}} (the default) or "
                             "one built from every swept key")
        folders[folder] = job
    check_dense_cache_outside(cfg, configs)
    return jobs, composed, configs


def check_trial_folders(overrides: list[str], cfg: DictConfig) -> None:
    """A study's trials are known only as they run: a hydra.sweep.subdir the same for two trial numbers gives every
    trial one folder, unless it reads a searched key (or the override_dirname of the trial's values), which differs
    where the trials do."""
    from .sweeps import parsed_overrides

    subdir = str(OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir"))
    searched = [o.get_key_element() for o in parsed_overrides(overrides, cfg) if o.is_sweep_override()]
    if "override_dirname" in subdir or any(key in subdir for key in searched):
        return
    folder = job_subdir(cfg, 0)
    if folder is not None and folder == job_subdir(cfg, 1):
        raise UsageError(f"hydra.sweep.subdir: {subdir!r} is the same folder ({folder}) for every trial, so each would "
                         "overwrite the one before; allowed: a name with the trial's number, e.g. ${hydra.job.num} "
                         "(the default)")


def sweep_jobs(overrides: list[str], cfg: DictConfig) -> list[list[str]] | None:
    """The override list of every job the basic sweeper will launch (None for a sweeper that picks its own), once
    the launcher, the sweep's functions and the sweeper's settings are checked."""
    from .plugins import check_launcher, check_optuna_settings
    from .sweeps import check_sweep_functions, expand_jobs

    try:
        check_launcher(cfg.hydra.launcher)
        check_sweep_functions(overrides, cfg)
        check_optuna_settings(cfg.hydra.sweeper)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    jobs = expand_jobs(overrides, cfg)
    if jobs == []:  # Hydra would launch nothing and leave an empty sweep folder
        swept = [o for o in overrides if "glob(" in o] or [o for o in overrides if "," in o or "(" in o]
        raise UsageError(f"{swept[0] if swept else 'sweep'}: the sweep makes no job; allowed: values that name at "
                         "least one option (a glob() that matches one)")
    return jobs


def checked_job(job: list[str], check: Callable[[RunConfig], None] | None, note: str,
                on_this_machine: bool = False) -> tuple[DictConfig, RunConfig]:
    """Compose and validate one job of a sweep; a mistake names the job it is in."""
    try:
        composed = compose(job, RunMode.RUN)
        config = validate(job_config(composed), check)
        if on_this_machine:
            check_device_here(config)
    except UsageError as error:
        raise UsageError(f"{error} ({note})") from error
    return composed, config


def checked_study(overrides: list[str], cfg: DictConfig, check: Callable[[RunConfig], None] | None) -> RunConfig:
    """What every trial of a study (a sweeper that picks its jobs as it goes) shares, checked, with the edges of its
    search space; each trial checks itself when it starts."""
    from .plugins import check_direction, check_storage
    from .sweeps import search_space_edges

    config = validate(job_config(cfg), check)
    try:
        check_direction(cfg.hydra.sweeper, config)
        check_storage(cfg.hydra.sweeper)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    for job in search_space_edges(overrides, cfg):
        checked_job(job, check, f"searched: {job[-1]}")
    return config


def shown_sweep(cfg: DictConfig, jobs: list[list[str]] | None, composed: list[DictConfig]) -> str:
    """A sweep's ``--cfg``: its first job's config and what each job sets; a study's, what its trials share."""
    if jobs is None:
        return as_yaml(cfg)
    listing = [" ".join(o for o in job if not all(o in other for other in jobs)) or " ".join(job) or "(no overrides)"
               for job in jobs]
    return "\n".join([f"{as_yaml(composed[0])}# the config of job 0 of {len(jobs)}, each checked; what each job sets:",
                      *(f"#   {number}: {line}" for number, line in enumerate(listing))])


def as_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


def check_dense_cache_outside(cfg: DictConfig, configs: list[RunConfig]) -> None:
    """The dense runs baselines start from are shared through output_root/dense: inside the sweep's own folder
    (hydra.sweep.dir=output_root, or .), the ones later sweeps train there would join this sweep's table."""
    needing = next((c for c in configs if c.needs_dense and not c.dense), None)
    if needing is None:
        return
    cache, folder = (Path(str(p)).resolve() for p in (Path(needing.output_root) / "dense", cfg.hydra.sweep.dir))
    if cache == folder or folder in cache.parents:
        raise UsageError(f"output_root: the dense runs its baselines start from go to {cache}, inside the sweep's folder "
                         f"{folder}, where later sweeps' dense runs would join this sweep's table; allowed: an "
                         "output_root outside hydra.sweep.dir, or dense=DIR")


def job_subdir(composed: DictConfig, number: int) -> str | None:
    """The folder a launcher gives a job: hydra.sweep.subdir with the job's own config and number, as Hydra's
    launchers resolve it (hydra.job.num set, the ${hydra:...} resolver reading this job); None where it can only be
    told when the job runs (an environment variable of the job's own)."""
    job = copy.deepcopy(composed)
    OmegaConf.set_readonly(job, False)
    with open_dict(job):
        job.hydra.job.num = number
        job.hydra.job.id = str(number)
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    try:
        hydra_config.set_config(job)
        return str(job.hydra.sweep.subdir)
    except OmegaConfBaseException:
        return None
    finally:
        hydra_config.cfg = before
