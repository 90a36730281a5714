"""The run record every command writes and ``compare`` reads (DESIGN.md §3).

A run directory holds ``.hydra/`` (Hydra's own snapshot), ``metrics.jsonl`` (one line per evaluation and per mask update),
``model.safetensors`` and ``result.json``. result.json is written last and atomically, so a record that exists
and parses describes a run that ended (with its ``status``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import typing
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"


@dataclass
class RunRecord:
    """The result of one run; fields not known for a method stay at their defaults."""

    method: str  # dense | pat | post:<baseline>
    recipe: str
    model: str
    dataset: str
    model_dataset_hash: str
    seed: int
    status: str = "ok"
    schema_version: int = SCHEMA_VERSION
    package_version: str = ""
    scorer: str | None = None
    schedule: str | None = None
    allocation: str | None = None
    pattern: str | None = None
    regrowth: str | None = None
    regularizer: str | None = None
    target_sparsity: float = 0.0
    achieved_sparsity: float = 0.0
    per_layer_sparsity: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # split → metric → value
    primary_metric: str = "accuracy"
    higher_is_better: bool = True
    dense_reference: dict[str, Any] | None = None  # {"run_dir", "metrics"} of the dense run this one relates to
    params_total: int = 0
    params_prunable: int = 0
    params_nonzero: int = 0
    bytes_on_disk: int = 0
    params_after: int | None = None  # after physical removal (structured) — None until exported
    bytes_before: int | None = None  # dense fp32 weights file
    bytes_after: int | None = None  # exported (smaller or compressed) weights file
    latency_ms: dict[str, float] = field(default_factory=dict)  # CPU inference, before/after export, per batch size
    engine_state_bytes: int = 0
    train_steps: int = 0
    total_train_steps: int = 0  # including the dense run a post-training baseline started from
    train_seconds: float = 0.0
    step_overhead: float | None = None
    mask_updates: int = 0
    error: str | None = None
    run_dir: str = ""
    run_id: str = ""  # set when first written; what records that cite this run (dense_reference) match on
    config: dict[str, Any] = field(default_factory=dict)  # the resolved job config (as in .hydra/config.yaml)
    extra: dict[str, Any] = field(default_factory=dict)

    def primary_value(self, split: str = "test", metric: str | None = None) -> float | None:
        return self.metrics.get(split, {}).get(metric or self.primary_metric)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        """A record from parsed JSON; a field of the wrong type (hand-edited, damaged) is a ConfigError naming it."""
        from .config import coerce

        hints = typing.get_type_hints(cls)
        return cls(**{k: coerce(v, hints[k], k) for k, v in data.items() if k in hints})


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import (setting it is process-wide)


def with_default_mode(path: Path | str) -> None:
    """Give a file (or folder) the permissions of any this user creates (temporary ones and safetensors' are 0600 or
    0700, which would hide records and weights from the rest of a team sharing an outputs folder)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_UMASK)


class WriteError(OSError):
    """A file of a run could not be written (a full disk, a quota, a folder made read-only): one line says which."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


def cannot_write(path: Path, error: Exception) -> WriteError:
    return WriteError(path, error.strerror if isinstance(error, OSError) and error.strerror else str(error))


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
        with_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise cannot_write(path, error) from error
        raise


def write_record(run_dir: Path, record: RunRecord) -> Path:
    record.run_dir = str(run_dir)
    record.run_id = record.run_id or uuid.uuid4().hex
    path = run_dir / RESULT_FILE
    write_atomic(path, record.to_json() + "\n")
    return path


def mask_update_row(update: Any, steps_before: int = 0, after_a_step: bool = True) -> dict[str, Any]:
    """A metrics.jsonl row for a mask update; its ``step`` counts the optimizer steps done, as eval rows do: the
    engine's index is 0 after the first step, and an update made outside training (one-shot) follows none."""
    return {"kind": "mask_update", **update.__dict__, "step": steps_before + (update.step + 1 if after_a_step else 0)}


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """One JSON line; a non-finite number (a diverged loss) is written as null, as JSON has no NaN that jq or a
    browser would read."""
    finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in row.items()}
    try:
        with open(run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(finite, sort_keys=True, allow_nan=False) + "\n")
    except OSError as error:  # a line cut short by a full disk is skipped by every reader
        raise cannot_write(run_dir / METRICS_FILE, error) from error


def logged_progress(run_dir: Path) -> tuple[int, float | None, int]:
    """How far a run got as its metrics.jsonl says: the steps done at its last row, the sparsity of its last mask
    update and how many it made (for the record of a run that did not finish, which would otherwise say 0 of each)."""
    try:
        lines = (Path(run_dir) / METRICS_FILE).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 0, None, 0
    steps, sparsity, updates = 0, None, 0
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line the interruption cut short
            continue
        if not isinstance(row, dict):
            continue
        if isinstance(row.get("step"), int) and not isinstance(row.get("step"), bool):
            steps = max(steps, row["step"])
        if row.get("kind") == "mask_update" and isinstance(row.get("sparsity"), (int, float)):
            sparsity = float(row["sparsity"])
            updates += 1
    return steps, sparsity, updates


def status_words(status: str) -> str:
    """A record's status as a message says it: "a finished", "an interrupted", "a failed"."""
    word = "finished" if status == "ok" else status
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


class RecordError(ValueError):
    """A result.json that cannot be read as a record."""


# What compare reads of a cited dense run, and of a config, beyond the record's own typed fields
REFERENCE_FIELDS = {"run_dir": str, "run_id": str, "metrics": dict[str, dict[str, float]], "train_steps": int | None}
SCALAR_SETTINGS = (("trainer", "init_from"), ("dataset", "val_fold"))  # keys of compare's tables: one value each


def check_nested(record: RunRecord) -> None:
    """The parts of a record that are free-form dicts, checked where compare relies on their shape (a hand-edited or
    damaged record is skipped with a warning, not a traceback)."""
    from .config import coerce

    reference = record.dense_reference
    if reference is not None:
        for key, hint in REFERENCE_FIELDS.items():
            if key in reference:
                coerce(reference[key], hint, f"dense_reference.{key}")
        bad = [f"{split}.{name}" for split, values in (reference.get("metrics") or {}).items()
               for name, value in values.items() if not math.isfinite(value)]
        if bad:
            raise ValueError(f"dense_reference.metrics.{bad[0]}: not a finite number")
    for group, key in SCALAR_SETTINGS:
        value = (record.config.get(group) or {}).get(key) if isinstance(record.config.get(group), dict) else None
        if value is not None and not isinstance(value, (str, int, float)):
            raise ValueError(f"config.{group}.{key}: expected a single value, got {value!r}")


def read_record(path: Path) -> RunRecord:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: not a readable record ({error.__class__.__name__}: {error})") from error
    if not isinstance(data, dict) or "method" not in data or "schema_version" not in data:
        raise RecordError(f"{path}: not a patcli run record (no method/schema_version)")
    try:
        record = RunRecord.from_dict(data)
        check_nested(record)
    except (TypeError, ValueError) as error:  # a missing field, or one of the wrong type (ConfigError names it)
        raise RecordError(f"{path}: {error}") from error
    if record.schema_version > SCHEMA_VERSION:
        raise RecordError(f"{path}: schema_version {record.schema_version} is newer than this patcli ({SCHEMA_VERSION})")
    for key in ("target_sparsity", "achieved_sparsity"):  # table columns and JSON output (which has no NaN)
        if not 0.0 <= getattr(record, key) <= 1.0:
            raise RecordError(f"{path}: {key} {getattr(record, key)!r} is not a fraction in 0..1")
    bad = [f"{split}.{name}" for split, values in record.metrics.items() for name, value in values.items()
           if isinstance(value, float) and not math.isfinite(value)]
    if record.status == "ok" and bad:  # a hand-edited record: a diverged run is recorded failed
        raise RecordError(f"{path}: a finished run whose {bad[0]} is not a finite number")
    if record.status == "ok" and record.primary_value("test") is None and record.primary_value("val") is None:
        raise RecordError(f"{path}: a finished run without its {record.primary_metric} metric")
    record.run_dir = str(Path(path).parent)
    return record


def find_record_files(paths: list[Path]) -> Iterator[Path]:
    """result.json files under each path (a file is taken as is), in a stable order."""
    for root in paths:
        root = Path(root)
        if os.path.isfile(root):  # never raises, unlike pathlib
            yield root
        elif os.path.isdir(root):
            yield from sorted(root.rglob(RESULT_FILE))
