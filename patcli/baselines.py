"""Post-training baselines, run through the same engine, data, loop and records as PAT.

Each baseline starts from a finished dense run (rebuilt from its own saved config), prunes it with the engine's
scorers and allocators, optionally fine-tunes with the shared training loop, and returns the fine-tune steps it
used. ``pat_from_dense`` is the other standard comparison: PAT itself, started from the same dense checkpoint
with the baselines' fine-tune budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import NOT_TRAINING, ConfigError, RunConfig, parse
from .data import DataBundle, load_dataset
from .dense import check_dense_run, dense_reference, load_run_config, resolve_dense
from .engine import ALLOCATIONS, PATTERNS, SCHEDULES, Pruner
from .engine.patterns import CHANNEL_MODES
from .engine.registry import ParamError, Registry
from .engine.structure import NoChannels, StructureError, channel_groups
from .engine.scorers import Gradient, Magnitude, Scorer
from .models import build_model
from .records import RunRecord, append_metrics, mask_update_row
from .runner import (allocation_loss, base_record, build_pruner, engine_quiet, finish_record, load_weights, record_engine,
                     seed_everything, warn_if_off_target, warn_of_unused_options, warn_of_unused_settings)
from .training import Progress, Trainer, loss_and_outputs, resolve_device, steps_per_epoch

log = logging.getLogger(__name__)
BASELINES: Registry = Registry("baseline")


@dataclass
class BaselineContext:
    """What a baseline works with: the dense model (weights loaded), its data, and the run's settings."""

    config: RunConfig  # this run: target sparsity, include/exclude, baseline parameters
    dense: RunConfig  # the dense run's own config: model, data, trainer
    dense_steps: int
    model: nn.Module
    data: DataBundle
    device: torch.device
    progress: Progress | None
    run_dir: Path
    pruners: list[Pruner] = field(default_factory=list)  # every pruner the baseline used, for the record
    fit_seconds: float = 0.0
    steps_done: int = 0  # fine-tuning steps of earlier rounds
    # one shuffling stream for all fine-tuning: each round of a prune-and-fine-tune loop goes on to new batches
    # (a trainer per round, each seeded alike, replayed the first round's batches)
    shuffle: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        self.shuffle.manual_seed(self.config.seed)

    @property
    def target(self) -> float:
        return self.config.target_sparsity

    def log_update(self, update, pruner: Pruner) -> None:
        """A mask update's metrics row, its step counted over all of the baseline's fine-tuning."""
        append_metrics(self.run_dir, mask_update_row(update, self.steps_done, after_a_step=pruner.optimizer is not None))

    def fit(self, trainer: Trainer, pruner: Pruner, label: str) -> None:
        """Fine-tune with ``pruner`` attached, its evaluations in metrics.jsonl as a training run's are."""
        pruner.attach(trainer.optimizer)
        per_epoch = steps_per_epoch(trainer.data, trainer.config.batch_size)

        def log_eval(row: dict) -> None:  # steps and epochs counted over all rounds, as mask-update rows are
            step = row["step"] + self.steps_done
            append_metrics(self.run_dir, {"kind": "eval", **row, "step": step, "epoch": round(step / per_epoch, 3)})

        fitted = trainer.fit(progress=self.progress, label=label, sparsity=pruner.current_sparsity, on_eval=log_eval)
        pruner.detach()
        self.fit_seconds += fitted.seconds
        self.steps_done += fitted.steps

    def pruner(self, scorer: Scorer, pattern=None, allocation=None, sparsity: float | None = None) -> Pruner:
        """A pruner whose masks only change when the baseline says (``update_masks``); the run's pattern by default
        (``pruning=nm`` with a magnitude baseline is one-shot 2:4 magnitude pruning)."""
        with engine_quiet() if self.pruners else contextlib.nullcontext():  # the model's warnings once, not per round
            pruner = self._new_pruner(scorer, pattern, allocation, sparsity)
        self.pruners.append(pruner)
        return pruner

    def _new_pruner(self, scorer: Scorer, pattern, allocation, sparsity: float | None) -> Pruner:
        pruner = Pruner(
            self.model,
            sparsity=self.target if sparsity is None else sparsity,
            schedule=SCHEDULES.get("fixed")(),
            total_steps=1,
            scorer=scorer,
            allocation=allocation or ALLOCATIONS.get("global")(),
            pattern=pattern or self.config.pattern,
            include=self.config.pruning.include,
            exclude=self.config.pruning.exclude,
            max_layer_sparsity=self.config.pruning.max_layer_sparsity,
            on_update=lambda update: self.log_update(update, pruner),
        )
        return pruner

    def finetune_steps(self, fraction: float) -> int:
        return finetune_budget(fraction, self.dense_steps)

    def trainer(self, steps: int, lr: float | None) -> Trainer:
        """The shared training loop, sized to ``steps`` fine-tuning steps at ``lr`` (default: the dense run's)."""
        dense_trainer = self.dense.trainer
        per_epoch = steps_per_epoch(self.data, dense_trainer.batch_size)
        config = dataclasses.replace(
            dense_trainer, epochs=math.ceil(steps / per_epoch), max_steps=steps, lr=lr or dense_trainer.lr,
            warmup_steps=0, init_from=None,
        )
        return Trainer(self.model, self.data, config, self.device, self.config.seed, shuffle=self.shuffle)


@BASELINES.register("magnitude")
@dataclass
class OneShotMagnitude:
    """One-shot global |w| pruning of the trained dense model, no fine-tuning."""

    def run(self, ctx: BaselineContext) -> int:
        ctx.pruner(Magnitude()).update_masks(0, ctx.target)
        return 0


@BASELINES.register("gradient")
@dataclass
class OneShotGradient:
    """One-shot global first-order Taylor |w·g|, accumulated over ``calibration_batches`` training batches."""

    calibration_batches: int = 16

    def __post_init__(self) -> None:
        at_least("calibration_batches", self.calibration_batches, 1)

    def run(self, ctx: BaselineContext) -> int:
        pruner = ctx.pruner(Gradient())
        generator = torch.Generator().manual_seed(ctx.config.seed)
        train = ctx.data.train.to(ctx.device)

        def batches():  # as many as asked: more than one pass over a small training set starts another shuffled pass
            while True:
                yield from train.batches(ctx.dense.trainer.batch_size, generator)

        ctx.model.eval()  # no fine-tuning: BatchNorm statistics stay the dense run's, and no dropout in the scores
        for _, (inputs, targets) in zip(range(self.calibration_batches), batches()):
            ctx.model.zero_grad(set_to_none=True)
            loss, _ = loss_and_outputs(ctx.model, ctx.data.task, inputs, targets)
            loss.backward()
            pruner.observe()
        ctx.model.zero_grad(set_to_none=True)
        ctx.model.train()
        pruner.update_masks(0, ctx.target)
        return 0


@BASELINES.register("structured")
@dataclass
class StructuredNorm:
    """Whole neurons (Linear), filters (Conv) or attention heads with the lowest L2 norm, the same fraction per layer."""

    kind: str = "auto"  # auto (filters for conv nets, else neurons) | neurons | filters | heads
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        if self.kind not in ("auto", *CHANNEL_MODES):
            raise ParamError("kind", f"{self.kind!r} is not allowed; allowed: auto, neurons, filters, heads")
        allowed = [name for name in ALLOCATIONS.names() if not ALLOCATIONS.get(name).needs_loss]  # one-shot: no loss to measure
        if self.allocation not in allowed:
            raise ParamError("allocation", f"{self.allocation!r} is not allowed; allowed: {', '.join(allowed)}")

    def kind_for(self, model: nn.Module, mode: str) -> str:
        """The channels to remove: ``pruning=neurons|filters|heads`` names them (so a sweep over ``baseline`` prunes
        what its PAT runs prune), else ``kind`` does, ``auto`` meaning filters for conv nets and neurons otherwise."""
        if mode in CHANNEL_MODES:
            if self.kind not in ("auto", mode):
                raise ConfigError("baseline.kind", f"{self.kind!r} contradicts pruning={mode}; allowed: auto or {mode}")
            return mode
        if mode != "unstructured":
            raise ConfigError("pruning", f"{mode!r} is not a channel pattern for baseline=structured; allowed: "
                                         f"unstructured (then baseline.kind chooses), {', '.join(CHANNEL_MODES)}")
        if self.kind != "auto":
            return self.kind
        return "filters" if any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules()) else "neurons"

    def check(self, model: nn.Module, mode: str) -> None:
        """The model has the groups this kind removes (before any run starts)."""
        kind = self.kind_for(model, mode)
        key = "pruning" if mode in CHANNEL_MODES else "baseline.kind"  # the option that chose the kind
        try:
            groups = channel_groups(model, kind)
        except NoChannels as error:
            raise ConfigError(key, f"the model ({type(model).__name__}) has no {kind} to remove; allowed here: "
                                   f"{', '.join(f'{key}={k}' for k in error.others) or 'another kind'}") from error
        except StructureError as error:
            raise ConfigError(key, f"{error}; allowed here: another kind") from error
        if not groups:
            raise ConfigError(key, f"the model ({type(model).__name__}) has no {kind} to remove; allowed here: another kind")

    def recorded(self, config: RunConfig, model: nn.Module) -> RunConfig:
        """The run as it pruned: channels, so its sparsity, record and export are those of a structured run."""
        kind = self.kind_for(model, config.pruning.mode)
        # the record's config says so too: runs pruned alike must not split into two rows of compare
        source = {**config.source, "pruning": {**(config.source.get("pruning") or {}), "mode": kind, "reduce": "l2"}}
        return dataclasses.replace(config, pattern=PATTERNS.get(kind)(reduce="l2"), source=source,
                                   pruning=dataclasses.replace(config.pruning, mode=kind),
                                   allocation=ALLOCATIONS.get(self.allocation)())

    def run(self, ctx: BaselineContext) -> int:
        pruned = self.recorded(ctx.config, ctx.model)
        ctx.pruner(Magnitude(), pattern=pruned.pattern, allocation=pruned.allocation).update_masks(0, ctx.target)
        return 0


@BASELINES.register("iterative")
@dataclass
class Iterative:
    """Han et al. 2015: ``rounds`` × (global |w| prune to a growing target, then fine-tune).

    Round targets follow the cubic AGP curve s·(1 − (1 − r/rounds)³), so early rounds take the most; the
    fine-tune budget (``finetune_fraction`` of the dense run's steps) is split evenly. ``rounds=1`` is one-shot +
    fine-tune.
    """

    rounds: int = 3
    finetune_fraction: float = 0.25
    lr: float | None = None

    def __post_init__(self) -> None:
        at_least("rounds", self.rounds, 1)
        check_budget(self.finetune_fraction, self.lr)

    def check_steps(self, dense_steps: int) -> None:
        """Every round fine-tunes for at least a step: more rounds than steps would prune with no fine-tuning."""
        budget = finetune_budget(self.finetune_fraction, dense_steps)
        if self.rounds > budget:
            raise ConfigError("baseline.rounds", f"{self.rounds} rounds share {budget} fine-tuning steps "
                                                 f"(baseline.finetune_fraction={self.finetune_fraction} of {dense_steps}); "
                                                 f"allowed: 1..{budget}, or a larger baseline.finetune_fraction")

    def run(self, ctx: BaselineContext) -> int:
        total = ctx.finetune_steps(self.finetune_fraction)
        per_round = [total // self.rounds + (1 if r < total % self.rounds else 0) for r in range(self.rounds)]
        for r, steps in enumerate(per_round, start=1):
            target = ctx.target * (1.0 - (1.0 - r / self.rounds) ** 3)
            pruner = ctx.pruner(Magnitude(), sparsity=ctx.target)
            pruner.update_masks(0, target)
            if steps:
                ctx.fit(ctx.trainer(steps, self.lr), pruner, f"{ctx.config.recipe()} round {r}/{self.rounds}")
        return total


@BASELINES.register("pat_from_dense")
@dataclass
class PATFromDense:
    """PAT during fine-tuning of the dense checkpoint (the config's scorer, schedule, allocation and pattern),
    with the same fine-tune budget the baselines get."""

    finetune_fraction: float = 0.25
    lr: float | None = None

    def __post_init__(self) -> None:
        check_budget(self.finetune_fraction, self.lr)

    def run(self, ctx: BaselineContext) -> int:
        steps = ctx.finetune_steps(self.finetune_fraction)
        trainer = ctx.trainer(steps, self.lr)
        config = dataclasses.replace(ctx.config, schedule=dataclasses.replace(ctx.config.schedule))
        pruner = build_pruner(config, ctx.model, trainer.total_steps, evaluate_fn=allocation_loss(config, trainer),
                              on_update=lambda update: ctx.log_update(update, pruner))
        ctx.pruners.append(pruner)
        ctx.fit(trainer, pruner, ctx.config.recipe())
        return steps


def finetune_budget(fraction: float, dense_steps: int) -> int:
    """Fine-tuning steps a baseline gets: a share of the dense run's, at least one."""
    return max(1, round(fraction * dense_steps))


def at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ParamError(name, f"{value} is out of range; allowed: >= {low}")


def check_budget(fraction: float, lr: float | None) -> None:
    if not 0.0 < fraction <= 10.0:
        raise ParamError("finetune_fraction", f"{fraction} is out of range; allowed: 0 < value <= 10 (of the dense steps)")
    if lr is not None and not 0 < lr < math.inf:  # NaN fails every comparison
        raise ParamError("lr", f"{lr} is out of range; allowed: a finite number > 0 or null (the dense run's)")


def parse_baseline(config: RunConfig):
    """The baseline object a config names, with its parameters checked (ConfigError names the key)."""
    if config.baseline.name not in BASELINES:
        raise ConfigError("baseline", f"unknown baseline {config.baseline.name!r}; allowed: {', '.join(BASELINES.names())}")
    return parse(BASELINES.get(config.baseline.name), config.baseline.params, "baseline")


def run_baseline(config: RunConfig, run_dir: Path, progress: Progress | None = None) -> RunRecord:
    """Prune (and maybe fine-tune) the matching dense run; the record says ``post:<name>`` (or ``pat``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    baseline = parse_baseline(config)
    dense_dir = resolve_dense(config, progress)
    log.info("starting from the dense run %s", dense_dir)
    dense_record = check_dense_run(dense_dir, config)
    if hasattr(baseline, "check_steps"):  # against the dense run found: plan() could only check the config's length
        baseline.check_steps(dense_record.train_steps)
    dense = load_run_config(dense_dir)
    config = as_trained(config, dense, dense_dir)
    warn_of_unused_options(config)
    warn_of_unused_settings(config)
    seed_everything(config.seed)
    data = load_dataset(dense.dataset)
    device = resolve_device(config.trainer.device)
    model = build_model(dense.model, data.meta).to(device)
    load_weights(model, dense_dir, "dense")
    context = BaselineContext(config, dense, dense_record.train_steps, model, data, device, progress, run_dir)
    started = time.perf_counter()
    steps = baseline.run(context)
    config = as_pruned(config, model)
    record = base_record(config, data)
    record.model, record.dataset = dense.model.label(), dense.dataset.name
    record.model_dataset_hash = dense.model_dataset_hash()
    record.train_steps = steps
    record.total_train_steps = dense_record.total_train_steps + steps
    record.train_seconds = round(time.perf_counter() - started, 3)
    record.dense_reference = dense_reference(dense_dir, dense_record)
    record.extra.update({"baseline": {"name": config.baseline.name, **dataclasses.asdict(baseline)}})
    record_engine(record, context.pruners, context.fit_seconds)
    finish_record(record, model, config, data, run_dir, device)
    warn_if_off_target(config, record)
    return record


def as_pruned(config: RunConfig, model: nn.Module) -> RunConfig:
    """A baseline's config as it pruned, for its record and export: the structured one removes channels whatever
    ``pruning.mode`` says."""
    baseline = parse_baseline(config)
    return baseline.recorded(config, model) if hasattr(baseline, "recorded") else config


def as_trained(config: RunConfig, dense: RunConfig, dense_dir: Path) -> RunConfig:
    """The baseline with the seed and trainer of the dense run it starts from: fine-tuning uses that trainer, and a
    record that said another seed would pool with runs it does not repeat."""
    mine, theirs = _training(config), _training(dense)
    differ = [f"{k}={theirs.get(k)} (not {mine.get(k)})" for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k)]
    if not differ:
        return config
    log.warning("dense=%s was trained with %s: this run uses and records those", dense_dir, ", ".join(differ))
    kept = {k: v for k, v in (config.source.get("trainer") or {}).items() if k in NOT_TRAINING}
    source = {**config.source, "seed": dense.seed, "trainer": {**(dense.source.get("trainer") or {}), **kept}}
    trainer = dataclasses.replace(dense.trainer, **{k: getattr(config.trainer, k) for k in NOT_TRAINING})
    return dataclasses.replace(config, seed=dense.seed, trainer=trainer, source=source)


def _training(config: RunConfig) -> dict:
    """Seed and trainer settings: what makes two trainings the same."""
    trainer = {f"trainer.{k}": v for k, v in (config.source.get("trainer") or {}).items() if k not in NOT_TRAINING}
    return {"seed": config.seed, **trainer}
