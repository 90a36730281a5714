"""Typed run configuration built from the composed Hydra config, with the user-facing validation errors.

Every group becomes a dataclass; engine parts (scorer, schedule, allocation, pattern) are their own dataclasses,
found by ``name`` in the engine's registries, so their YAML keys are checked against their constructor fields.
Errors carry the dotted key and the allowed values so the CLI can print them on one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .engine.allocation import ALLOCATIONS, Allocation
from .engine.combinations import CombinationError
from .engine.combinations import check_combination as engine_check_combination
from .engine.patterns import PATTERNS, Pattern
from .engine.regrowth import REGROWTHS, Regrowth
from .engine.regularizers import REGULARIZERS, Regularizer
from .engine.registry import SEED_LIMIT, ParamError, Registry
from .engine.schedules import SCHEDULES, Schedule
from .engine.scorers import SCORERS, Scorer


class ConfigError(ValueError):
    """A user mistake in the configuration: ``key`` is the dotted config path."""

    def __init__(self, key: str, message: str) -> None:
        self.message = " ".join(message.split())  # one line, whatever a wrapped error held
        super().__init__(f"{key}: {self.message}")
        self.key = key


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting only where lossless (int → float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if int in options and float in options and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {' or '.join(_describe(o) for o in options)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        item = (typing.get_args(hint) or (str, Any))[1]
        return {k: coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def parse(cls: type, data: Mapping[str, Any], prefix: str, beside: tuple[str, ...] = (), chosen: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``: unknown keys and wrong types raise ConfigError naming the key.

    ``beside``: keys of the same group that another class takes (listed as allowed too); ``chosen``: the option, for
    saying that it takes no settings."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = [*beside, *sorted(fields)]
        said = f"allowed: {', '.join(f'{prefix}.{name}' for name in allowed)}" if allowed else f"{chosen or prefix} takes no settings"
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown key; {said}")
    kwargs = {name: coerce(value, hints[name], f"{prefix}.{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except ParamError as error:
        raise ConfigError(f"{prefix}.{error.field}", error.message) from error
    check = getattr(obj, "validate", None)
    if callable(check):
        check(prefix)
    return obj


def parse_named(registry: Registry, data: Mapping[str, Any], prefix: str) -> Any:
    """A registry entry chosen by ``name`` with the rest of ``data`` as its fields."""
    data = dict(data)
    name = data.pop("name", None)
    if name not in registry:
        raise ConfigError(f"{prefix}.name", f"unknown {registry.kind} {name!r}; allowed: {', '.join(registry.names())}")
    return parse(registry.get(name), data, prefix, chosen=f"{prefix}={name}")


def in_range(key: str, value: float, low: float, high: float, *, high_inclusive: bool = False) -> None:
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        raise ConfigError(key, f"{value} is out of range; allowed: {low} <= value {'<=' if high_inclusive else '<'} {high}")


def one_of(key: str, value: str, allowed: list[str] | tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not allowed; allowed: {', '.join(allowed)}")


OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
MASKINGS = ("inplace", "dense_shadow")


MAX_THREADS = 1024  # a cap, not this machine's cores: a cluster's jobs are checked on the machine that submits them


@dataclass
class TrainerConfig:
    """How long and how to train; the same loop serves dense, PAT and fine-tuning runs."""

    epochs: int = 60
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = None
    eval_every: int = 1
    device: str = "auto"
    threads: int | None = None
    init_from: str | None = None

    def validate(self, prefix: str) -> None:
        if self.epochs < 1:
            raise ConfigError(f"{prefix}.epochs", f"{self.epochs} is out of range; allowed: >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{prefix}.max_steps", f"{self.max_steps} is out of range; allowed: >= 1 or null")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size", f"{self.batch_size} is out of range; allowed: >= 1")
        if not 0 < self.lr < math.inf:  # also refuses nan
            raise ConfigError(f"{prefix}.lr", f"{self.lr} is out of range; allowed: a finite number > 0")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"{prefix}.weight_decay", f"{self.weight_decay} is out of range; allowed: a finite number >= 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{prefix}.momentum", f"{self.momentum} is out of range; allowed: 0 <= value < 1")
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:  # a negative clip flips the gradient
            raise ConfigError(f"{prefix}.grad_clip", f"{self.grad_clip} is out of range; allowed: a finite number > 0, or null (no clipping)")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps", f"{self.warmup_steps} is out of range; allowed: >= 0")
        if self.eval_every < 1:
            raise ConfigError(f"{prefix}.eval_every", f"{self.eval_every} is out of range; allowed: >= 1 (epochs)")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:  # OpenMP fails to start 100,000
            raise ConfigError(f"{prefix}.threads", f"{self.threads} is out of range; allowed: 1..{MAX_THREADS} or null")
        one_of(f"{prefix}.optimizer", self.optimizer, OPTIMIZERS)
        one_of(f"{prefix}.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        one_of(f"{prefix}.device", self.device, DEVICES)


@dataclass
class PruningConfig:
    """What to prune and how masks are enforced; pattern-specific keys (e.g. ``n``, ``m``) go to the pattern."""

    mode: str = "unstructured"
    sparsity: float | None = 0.9
    frequency: int = 50
    masking: str = "inplace"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    max_layer_sparsity: float = 0.99

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.mode", self.mode, ["none", *PATTERNS.names()])
        if self.sparsity is not None:
            in_range(f"{prefix}.sparsity", self.sparsity, 0.0, 1.0)
        if self.frequency < 1:
            raise ConfigError(f"{prefix}.frequency", f"{self.frequency} is out of range; allowed: >= 1 (steps)")
        one_of(f"{prefix}.masking", self.masking, MASKINGS)
        in_range(f"{prefix}.max_layer_sparsity", self.max_layer_sparsity, 0.0, 1.0)


@dataclass
class NamedConfig:
    """A model or dataset: a registered name (or a ``_target_`` class) and its keyword arguments."""

    name: str
    params: dict[str, Any]
    # a dataset read from a user's file: the hash of what load_dataset last read for this config (see data_fingerprint)
    fingerprint: str | None = field(default=None, compare=False, repr=False)

    def label(self) -> str:
        return self.name


@dataclass
class BaselineConfig:
    """A post-training baseline; ``none`` means the run trains (dense or PAT)."""

    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """Everything one run needs, validated."""

    seed: int
    model: NamedConfig
    dataset: NamedConfig
    trainer: TrainerConfig
    pruning: PruningConfig
    scorer: Scorer
    schedule: Schedule
    allocation: Allocation
    regrowth: Regrowth
    regularizer: Regularizer | None
    pattern: Pattern | None
    baseline: BaselineConfig
    dense: str | None
    output_root: str
    source: dict[str, Any]  # the composed config (without ``hydra``), as saved in the run record

    @property
    def method(self) -> str:
        if self.baseline.name == "pat_from_dense":
            return "pat"
        if self.baseline.name != "none":
            return f"post:{self.baseline.name}"
        return "pat" if self.pruning.enabled else "dense"

    @property
    def needs_dense(self) -> bool:
        """Whether the run starts from a dense run (post-training baselines and PAT from the dense checkpoint)."""
        return self.baseline.name != "none"

    @property
    def target_sparsity(self) -> float:
        if not self.pruning.enabled:
            return 0.0
        if self.regularizer is not None and self.regularizer.target is not None and self.method == "pat":
            return self.regularizer.target  # a post-training baseline prunes to pruning.sparsity (and says it ignores it)
        if self.pruning.sparsity is None:
            return float(self.pattern.fixed_sparsity)
        return self.pruning.sparsity

    def recipe(self) -> str:
        """Short label of the method, e.g. ``agp+magnitude+global``; records with the same label are pooled."""
        if self.method == "dense" and self.trainer.init_from:
            return "dense+init"  # trained on from another run: not the dense reference its key would name
        if self.method != "pat":
            return self.method
        parts = [self.schedule.name, self.scorer.name, self.allocation.name]
        if self.pruning.mode != "unstructured":
            parts.append(self.pruning.mode)
        if self.regrowth.name != "none":
            parts.append(self.regrowth.name)
        elif self.pruning.masking != "inplace":
            parts.append(self.pruning.masking)
        if self.regularizer is not None:
            parts.append(self.regularizer.name)
        if self.baseline.name == "pat_from_dense":
            parts.append("from-dense")
        elif self.trainer.init_from:
            parts.append("init")
        return "+".join(parts)

    def model_dataset_hash(self) -> str:
        """Groups runs that are comparable: same model and dataset config. The folds of one dataset are one dataset
        (compare pools them like seeds), and leaving the fold out keeps the hash of runs made before folds existed.
        A user's text file adds the hash of the text read: the same path after an edit is another dataset (built-in
        datasets add nothing, so their hash is unchanged)."""
        from .data import data_fingerprint  # here: the data package imports this module

        dataset = {k: v for k, v in (self.source.get("dataset") or {}).items() if k != "val_fold"}
        fingerprint = data_fingerprint(self.dataset)
        if fingerprint is not None:
            dataset["text_sha256"] = fingerprint
        return config_hash({"model": self.source.get("model"), "dataset": dataset})

    def val_fold(self) -> int | None:
        return (self.source.get("dataset") or {}).get("val_fold")

    def model_dataset_changes(self, other: Mapping[str, Any]) -> str:
        """The model and dataset settings another run's config holds otherwise, "KEY: X there, Y here; ...": a
        refusal that named only the model ("mlp on digits") left the user to find which of its settings."""
        def settings(source: Mapping[str, Any]) -> dict[str, Any]:
            return {f"{group}.{key}": value for group in ("model", "dataset")
                    for key, value in ((source.get(group) or {}) if isinstance(source.get(group), Mapping) else {}).items()
                    if key != "val_fold"}  # a fold is checked apart, with its own message

        def shown(value: Any) -> str:
            return value if isinstance(value, str) else json.dumps(value)

        theirs, ours = settings(other), settings(self.source)
        keys = [*ours, *(key for key in theirs if key not in ours)]
        changes = [f"{key}: {shown(theirs.get(key))} there, {shown(ours.get(key))} here"
                   for key in keys if theirs.get(key) != ours.get(key)]
        return "; ".join(changes) or "the same settings, other data (the file it reads changed since)"

    def check_same_fold(self, key: str, run_dir: Path, other: Mapping[str, Any]) -> None:
        """A run trained on another cross-validation fold saw this run's validation images: refuse to build on it."""
        theirs, ours = (other.get("dataset") or {}).get("val_fold"), self.val_fold()
        if theirs != ours:
            shown = ["null" if fold is None else fold for fold in (theirs, ours)]
            raise ConfigError(key, f"{run_dir} was trained with dataset.val_fold={shown[0]}, this run uses {shown[1]} (its "
                                   "training images include this run's validation images); allowed: a run of the same fold")

    def dense_key(self) -> str:
        """Identifies the dense run a baseline needs: model, dataset (fold included), trainer (minus init) and seed."""
        given = self.source.get("trainer") or {}
        trainer = {k: v for k, v in given.items() if k not in NOT_TRAINING}
        if "eval_every" in given:  # keys made before it was known not to change the weights held it: the default keeps
            trainer["eval_every"] = TrainerConfig.eval_every  # theirs
        fold = self.val_fold()
        return config_hash({"md": self.model_dataset_hash(), "trainer": trainer, "seed": self.seed,
                            **({"val_fold": fold} if fold is not None else {})})


# Trainer settings that say where, from what or how often a run is looked at, not how it trains (its weights are bit for
# bit the same whatever they are): a dense run serves baselines whatever they hold, and a baseline keeps its own
NOT_TRAINING = ("device", "threads", "init_from", "eval_every")


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def label_of(data: Mapping[str, Any]) -> str:
    """How records name a model or dataset: its option name, or the class a ``_target_`` names ("?" for neither)."""
    return str(data.get("_target_") or data.get("name") or "?").rsplit(".", 1)[-1]


def _named(data: Mapping[str, Any] | None, prefix: str) -> NamedConfig:
    data = dict(data or {})
    if "_target_" in data:
        if not data["_target_"]:
            raise ConfigError(f"{prefix}._target_", f"missing; allowed: the dotted path of a class, e.g. {prefix}._target_=my_package.MyModel")
        return NamedConfig(name=label_of(data), params=data)
    name = data.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{prefix}.name", "missing; choose one from its config group")
    return NamedConfig(name=name, params=data)


TOP_LEVEL = ("seed", "model", "dataset", "trainer", "pruning", "scorer", "schedule", "allocation", "regrowth", "regularizer",
             "baseline", "dense", "output_root")


def parse_run_config(source: Mapping[str, Any]) -> RunConfig:
    """Validate the composed config (a plain dict, ``hydra`` key removed)."""
    source = {k: v for k, v in source.items() if k != "hydra"}
    unknown = sorted(set(source) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; allowed: {', '.join(TOP_LEVEL)}")
    seed = coerce(source.get("seed", 0), int, "seed")
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError("seed", f"{seed} is out of range; allowed: 0 <= seed < 2**63")
    pruning_data = dict(source.get("pruning") or {})
    common = {f.name for f in dataclasses.fields(PruningConfig)}
    pruning = parse(PruningConfig, {k: v for k, v in pruning_data.items() if k in common}, "pruning")
    pattern_data = {k: v for k, v in pruning_data.items() if k not in common}
    pattern = None
    if pruning.enabled:
        pattern = parse(PATTERNS.get(pruning.mode), pattern_data, "pruning",  # mode is chosen with pruning=OPTION
                        beside=tuple(f.name for f in dataclasses.fields(PruningConfig) if f.init and f.name != "mode"))
        fixed = pattern.fixed_sparsity
        if fixed is not None and pruning.sparsity is not None and abs(pruning.sparsity - fixed) > 1e-9:
            raise ConfigError(
                "pruning.sparsity",
                f"pruning={pruning.mode} fixes sparsity at {fixed:.12g}; allowed: {fixed:.12g} or null",
            )
        if fixed is not None and pruning.max_layer_sparsity < fixed - 1e-9:  # every layer sits at the fixed sparsity
            raise ConfigError("pruning.max_layer_sparsity", f"{pruning.max_layer_sparsity} is below the sparsity "
                              f"pruning={pruning.mode} gives every layer; allowed: {fixed:.12g} <= value < 1")
        if fixed is None and pruning.sparsity is None:
            raise ConfigError("pruning.sparsity", "missing; allowed: 0 <= value < 1")
    elif pattern_data:
        key = sorted(pattern_data)[0]
        raise ConfigError(f"pruning.{key}", f"unknown key; allowed: {', '.join(f'pruning.{k}' for k in sorted(common - {'mode'}))}")
    baseline_data = dict(source.get("baseline") or {"name": "none"})
    baseline = BaselineConfig(name=str(baseline_data.pop("name", "none")), params=baseline_data)
    dense = source.get("dense")
    if dense is not None and not isinstance(dense, str):
        raise ConfigError("dense", f"expected a run directory, got {dense!r}")
    output_root = coerce(source.get("output_root", "outputs"), str, "output_root")
    config = RunConfig(
        seed=seed,
        model=_named(source.get("model"), "model"),
        dataset=_named(source.get("dataset"), "dataset"),
        trainer=parse(TrainerConfig, source.get("trainer") or {}, "trainer"),
        pruning=pruning,
        scorer=parse_named(SCORERS, source.get("scorer") or {"name": "magnitude"}, "scorer"),
        schedule=parse_named(SCHEDULES, source.get("schedule") or {"name": "agp"}, "schedule"),
        allocation=parse_named(ALLOCATIONS, source.get("allocation") or {"name": "global"}, "allocation"),
        regrowth=parse_named(REGROWTHS, source.get("regrowth") or {"name": "none"}, "regrowth"),
        regularizer=_regularizer(source.get("regularizer")),
        pattern=pattern,
        baseline=baseline,
        dense=dense,
        output_root=output_root,
        source=source,
    )
    if pattern is not None and pattern.fixed_sparsity is not None:
        config.allocation = ALLOCATIONS.get("uniform")()  # a fixed pattern prunes every layer alike
    check_schedule_bounds(config.schedule)
    if config.method == "pat":  # a dense run or a post-training baseline uses no regrowth or regularizer (it warns)
        check_combination(config)
    return config


def _regularizer(data: Mapping[str, Any] | None) -> Regularizer | None:
    if not data or data.get("name", "none") == "none":
        return None
    return parse_named(REGULARIZERS, data, "regularizer")


def check_combination(config: RunConfig) -> None:
    """Engine parts that cannot work together: one line saying why, naming the option to change."""
    try:
        engine_check_combination(config.schedule, config.pruning.mode, config.pruning.masking, config.regrowth,
                                 config.regularizer, config.scorer, config.allocation)
    except CombinationError as error:
        raise ConfigError(error.key, str(error)) from error


def check_schedule_bounds(schedule: Schedule) -> None:
    """Static checks of begin/end that need no run length (the rest happens when the run is planned)."""
    for key in ("begin", "end"):
        value = getattr(schedule, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"schedule.{key}", f"expected a step (int) or a fraction of the run (float), got {value!r}")
        if isinstance(value, float):
            in_range(f"schedule.{key}", value, 0.0, 1.0, high_inclusive=True)
        elif value < 0:
            raise ConfigError(f"schedule.{key}", f"{value} is out of range; allowed: a step >= 0 or a fraction 0.0..1.0")
    in_range("schedule.initial_sparsity", schedule.initial_sparsity, 0.0, 1.0)
