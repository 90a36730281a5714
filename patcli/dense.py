"""The dense reference a post-training baseline starts from: given, found, or trained once.

A dense run matches a config when model, dataset, trainer settings and seed agree (``RunConfig.dense_key``).
Finding or training one holds a file lock per key, so parallel sweep jobs never train the same dense run twice.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml
from filelock import FileLock
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, RunConfig, parse_run_config
from .hydra_app import pruning_defaults
from .records import (MODEL_FILE, RESULT_FILE, RecordError, RunRecord, WriteError, find_record_files, read_record,
                      status_words)

log = logging.getLogger(__name__)
CONFIG_SNAPSHOT = Path(".hydra") / "config.yaml"


def dense_source(config: RunConfig) -> dict:
    """The config of the dense run that matches ``config``: same everything, nothing pruned, no baseline."""
    source = copy.deepcopy(config.source)
    pruning = source.get("pruning") or {}
    source["pruning"] = {"mode": "none", "include": pruning.get("include", ["*"]), "exclude": pruning.get("exclude", [])}
    source["baseline"] = {"name": "none"}
    source.update(copy.deepcopy(pruning_defaults()))  # nothing to score, schedule or regrow: a dense run's own
    source["regularizer"] = {"name": "none"}  # nor to shrink
    source["dense"] = None
    source.setdefault("trainer", {})["init_from"] = None
    return source


def check_dense_run(run_dir: Path, config: RunConfig) -> RunRecord:
    """A finished dense patcli run of ``config``'s fold, or a ConfigError naming ``dense``."""
    if not os.path.isdir(run_dir):  # never raises, unlike pathlib (a name too long, a folder it may not read)
        raise ConfigError("dense", f"{run_dir} is not a directory; allowed: a run directory (the folder of its {RESULT_FILE})")
    if not os.path.isfile(run_dir / RESULT_FILE):
        raise ConfigError("dense", f"{run_dir} is not a patcli run (it holds no {RESULT_FILE}); allowed: the folder of "
                          "a finished run of `patcli train pruning=none`")
    try:
        record = read_record(run_dir / RESULT_FILE)
    except RecordError as error:
        raise ConfigError("dense", f"{run_dir} is not a finished patcli run ({error})") from error
    if record.method != "dense" or record.status != "ok":
        raise ConfigError("dense", f"{run_dir} is {status_words(record.status)} {record.method!r} run; allowed: a finished run of "
                          "`patcli train pruning=none`")
    if not os.path.isfile(run_dir / CONFIG_SNAPSHOT):
        raise ConfigError("dense", f"{run_dir} has no {CONFIG_SNAPSHOT} to rebuild its model and data from")
    load_run_config(run_dir)  # readable, before anything runs
    mismatch = snapshot_mismatch(run_dir, record)
    if mismatch:
        raise ConfigError("dense", f"{run_dir}: {mismatch}; allowed: a dense run whose files are intact")
    if record.model_dataset_hash != config.model_dataset_hash():  # the baseline would prune another model than it records
        raise ConfigError("dense", f"{run_dir} was trained with another model/dataset config ({record.model} on "
                                   f"{record.dataset}; {config.model_dataset_changes(record.config)}); allowed: a dense "
                                   "run with this run's model and dataset settings")
    config.check_same_fold("dense", run_dir, record.config)
    return record


def dense_reference(run_dir: Path, record: RunRecord) -> dict:
    """What a record keeps of its dense run, so compare can show dense without reading it.

    Compare matches the dense run by ``run_id``: the directory may be moved or read from elsewhere.
    """
    return {"run_dir": str(run_dir.resolve()), "run_id": record.run_id, "metrics": record.metrics,
            "train_steps": record.total_train_steps}


def load_run_config(run_dir: Path, key: str = "dense") -> RunConfig:
    """A run's own saved config (its Hydra snapshot): it rebuilds the model and data exactly.

    A damaged or hand-broken snapshot is a ConfigError naming ``key`` and the file, not a YAML traceback: broken
    YAML, undecodable bytes, a list instead of a mapping, a bad interpolation or a value of the wrong type each fail
    in a different layer (yaml, OmegaConf, the config parser), hence the list.
    """
    try:
        return parse_run_config(OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_SNAPSHOT), resolve=True))
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError, OmegaConfBaseException) as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        why = f"{problem} at line {mark.line + 1}" if mark and problem else str(error)
        why = why if isinstance(error, (ConfigError, yaml.YAMLError)) else f"{error.__class__.__name__}: {why}"
        raise ConfigError(key, f"{run_dir / CONFIG_SNAPSHOT} is damaged or not a patcli config snapshot ({why})") from error


_passed_over: set[Path] = set()  # damaged dense runs already warned of


def find_dense(config: RunConfig) -> Path | None:
    """The newest finished dense run under ``output_root`` whose key matches (not one continued from another run)."""
    key, model_dataset = config.dense_key(), config.model_dataset_hash()
    matches = []
    for path in find_record_files([Path(config.output_root)]):
        try:
            record = read_record(path)
        except RecordError:  # not a run this could reuse
            continue
        continued = (record.config.get("trainer") or {}).get("init_from")  # more steps than its key says
        if record.method == "dense" and record.status == "ok" and not continued and key in keys_of(record, model_dataset):
            damage = _damage(path.parent, record)
            if not damage:
                matches.append(path.parent)
            elif path.parent.resolve() not in _passed_over:  # every baseline would fail on it, sweep after sweep
                _passed_over.add(path.parent.resolve())  # said once a process: a sweep looks for each job's dense run
                log.warning("the dense run %s cannot be reused (%s), so it is passed over", path.parent, damage)
    return max(matches, key=lambda p: (p / RESULT_FILE).stat().st_mtime) if matches else None


def keys_of(record: RunRecord, model_dataset: str) -> set:
    """The dense keys a dense run's record answers to: the one it stored and, for a run of the model and data asked
    for, the one this version computes from its config. A key written before a setting left the key (``eval_every``)
    holds that setting, and would leave the run unmatched."""
    keys = {record.extra.get("dense_key")}
    if record.model_dataset_hash == model_dataset:
        try:
            keys.add(parse_run_config(record.config).dense_key())
        except (ConfigError, OSError):  # a config older patcli took, or its text file gone: its stored key alone
            pass
    return keys


def _damage(run_dir: Path, record: RunRecord) -> str | None:
    """What a finished dense run lacks for a baseline to start from: its weights (readable) or a config snapshot
    that rebuilds what it trained."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(run_dir / CONFIG_SNAPSHOT):
        return f"no {CONFIG_SNAPSHOT}"
    try:
        with safe_open(str(run_dir / MODEL_FILE), framework="pt"):  # reads the header only
            pass
    except (SafetensorError, OSError) as error:
        return f"{MODEL_FILE} unreadable: {error}"
    return snapshot_mismatch(run_dir, record)


def snapshot_mismatch(run_dir: Path, record: RunRecord) -> str | None:
    """Why a run's config snapshot cannot rebuild what its record says it trained: unreadable, or naming another model,
    data or trainer (cut short by a full disk, edited by hand; a baseline rebuilds its dense run from it); None when
    it can."""
    try:
        snapshot = load_run_config(run_dir)
    except ConfigError as error:
        return error.message
    try:
        recorded = parse_run_config(record.config)
        same = snapshot.model_dataset_hash() == recorded.model_dataset_hash() and snapshot.dense_key() == recorded.dense_key()
    except (ConfigError, OSError):  # a record an older patcli wrote, or a text file gone: the checks after this say it
        return None
    return None if same else f"{CONFIG_SNAPSHOT} no longer matches its record (cut short or edited)"


def resolve_dense(config: RunConfig, progress=None) -> Path:
    """``config.dense`` if given, else a matching dense run found or trained (under a lock) in output_root/dense/."""
    if config.dense:
        run_dir = Path(config.dense)
        check_dense_run(run_dir, config)
        return run_dir
    from .training import resolve_device

    key = config.dense_key()
    if find_dense(config) is None:  # it will be trained here: a device this machine lacks is a config mistake
        resolve_device(config.trainer.device)
    cache = Path(config.output_root) / "dense"
    cache.mkdir(parents=True, exist_ok=True)
    with held_lock(cache / f"{key}.lock"):
        found = find_dense(config)
        if found is not None:
            return found
        diverged = _diverged(cache / key)
        if diverged:  # the same settings and seed train the same way: every job of a sweep would diverge again
            raise FloatingPointError(f"the dense reference in {cache / key} diverged with these settings ({diverged}); "
                                     "lower trainer.lr, or delete that folder to train it again")
        return train_dense(config, cache / key, progress)


@contextmanager
def held_lock(path: Path) -> Iterator[None]:
    """The file lock of one dense key; one that cannot be taken (a folder in its place) is a WriteError naming it."""
    lock = FileLock(str(path))
    try:
        lock.acquire()
    except OSError as error:
        raise WriteError(path, error.strerror or str(error)) from error
    try:
        yield
    finally:
        lock.release()


def _diverged(run_dir: Path) -> str | None:
    """The error of a dense reference that diverged in this folder, if one did."""
    try:
        record = read_record(run_dir / RESULT_FILE)
    except RecordError:
        return None
    diverged = record.status == "failed" and (record.error or "").startswith("FloatingPointError")
    return record.error if diverged else None


def train_dense(config: RunConfig, run_dir: Path, progress=None) -> Path:
    """Train the matching dense run with the same code as ``patcli train pruning=none``."""
    from .runner import execute

    if run_dir.is_symlink():  # a link put there by hand: train into a folder of our own, the link's target untouched
        run_dir.unlink()
    elif run_dir.is_dir():  # an attempt that never finished (interrupted, killed): its metrics would mix into this run's
        shutil.rmtree(run_dir)
    elif run_dir.exists():  # not an attempt of ours: left alone
        raise WriteError(run_dir, "a file is where the dense run's folder goes; allowed: move or delete it")
    log.info("training the dense reference into %s", run_dir)
    try:
        execute(parse_run_config(dense_source(config)), run_dir, progress, label="dense reference")
    except BaseException as error:  # its folder says what happened; a later attempt trains it afresh
        from .runner import failed_record

        failed_record(dense_source(config), run_dir, error, "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
        raise
    return run_dir
