"""Turns a validated RunConfig into a finished run directory: build, train (with the pruner), test, record.

``plan`` does everything that can fail on a user's config without training (loading data, sizing the model,
fitting the schedule into the run), so the CLI can reject bad input before Hydra creates a run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import ConfigError, RunConfig, label_of, parse_run_config
from .data import DataBundle, load_dataset
from .engine import REGROWTHS, SCHEDULES, SCORERS, MaskUpdate, Pruner, select_prunable
from .engine.patterns import Structured
from .engine.masks import PatternError, pattern_lists
from .engine.pruner import make_layout
from .engine.allocation import AllocationError
from .engine.schedules import Schedule, ScheduleError
from .hydra_app import conf_dir, pruning_defaults
from .models import build_model
from .records import (MODEL_FILE, RESULT_FILE, RecordError, RunRecord, append_metrics, cannot_write, logged_progress,
                      mask_update_row, read_record, status_words, with_default_mode, write_record)
from .training import Progress, Trainer, evaluate, loss_and_outputs, resolve_device, total_steps

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a run will do, known before it starts."""

    data: DataBundle
    total_steps: int
    update_steps: int
    warnings: list[str]  # said once, in the job's run.log (the plan is also made before the job's log exists)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def engine_quiet():
    """Pruners built only to check a config (or again, for a baseline's next round): their warnings about the model
    (frozen or parametrized weights left dense, an exclude that keeps no channel) come once, from the run's own build."""
    logger = logging.getLogger("patcli.engine")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def plan(config: RunConfig) -> Plan:
    """Check the parts of a config that need the data and the run length; raise ConfigError on a mistake."""
    data = load_dataset(config.dataset)
    steps = total_steps(data, config.trainer)
    if config.trainer.warmup_steps >= steps and not config.needs_dense:  # a baseline fine-tunes without warm-up
        raise ConfigError("trainer.warmup_steps", f"{config.trainer.warmup_steps} is not below the run's {steps} steps, "
                                                  f"so the whole run would be warm-up; allowed: 0 to {steps - 1}")
    try:
        model = build_model(config.model, data.meta)  # validates model keys; a throwaway the checks below share
    except (RuntimeError, MemoryError) as error:  # model.hidden=[100000000]: more memory than there is
        raise ConfigError("model", f"cannot be built here ({error.__class__.__name__}: "
                                   f"{(str(error).splitlines() or [''])[0][:200]}); allowed: smaller sizes") from error
    warnings = data.warnings + check_model_fits(model, data)
    try:  # every run, dense included: its sparsity report reads them
        pattern_lists(model, config.pruning.include, config.pruning.exclude)
    except PatternError as error:
        raise ConfigError(f"pruning.{error.key}", error.message) from error
    update_steps, dense_steps = 0, steps  # a baseline's dense run is trained as this config says, unless given
    pruned = config  # the run as it prunes: a structured baseline cuts channels whatever pruning.mode says
    if config.dense:  # a baseline's starting point, or a training run's reference: checked before anything runs
        from .dense import check_dense_run

        dense_steps = check_dense_run(Path(config.dense), config).train_steps  # a baseline fine-tunes a share of them
        load_weights(model, Path(config.dense), "dense")  # readable, and of this model
    if config.needs_dense:
        from .baselines import finetune_budget, parse_baseline

        baseline = parse_baseline(config)
        if hasattr(baseline, "check"):
            baseline.check(model, config.pruning.mode)
        if hasattr(baseline, "check_steps"):
            baseline.check_steps(dense_steps)
        if not config.pruning.enabled:
            raise ConfigError("pruning", "post-training baselines prune: choose a pruning mode, not none")
        # the target fits the caps, with what the baseline prunes (structured: its channels and allocation)? Regrowth
        # and regularizers shape PAT's updates, not this one-shot check, and a post-training baseline scores its own
        # way (a scorer given to it is warned unused, not refused)
        pruned = baseline.recorded(config, model) if hasattr(baseline, "recorded") else config
        scorer = pruned.scorer if config.method == "pat" else SCORERS.get("magnitude")()
        fixed = dataclasses.replace(pruned, schedule=SCHEDULES.get("fixed")(), regrowth=REGROWTHS.get("none")(),
                                    regularizer=None, scorer=scorer)
        with engine_quiet():
            build_pruner(fixed, model, 1, evaluate_fn=never_called).detach()  # a channel scorer's model hooks off
            if config.method == "pat":  # pat_from_dense: the config's own schedule, regrowth and penalty over its budget
                budget = finetune_budget(baseline.finetune_fraction, dense_steps)
                build_pruner(config, model, budget, evaluate_fn=never_called).detach()
    elif config.pruning.enabled:
        with engine_quiet():
            pruner = build_pruner(config, model, steps, evaluate_fn=never_called)  # pattern fits?
        pruner.detach()  # only a check: the run builds its own, and a channel scorer's model hooks must go
        update_steps = pruner.schedule.update_count()
    check_shrinks(model, pruned, data)
    if config.trainer.init_from:
        load_weights(model, check_init_from(config), "trainer.init_from")
    return Plan(data=data, total_steps=steps, update_steps=update_steps, warnings=warnings)


def check_shrinks(model: nn.Module, config: RunConfig, data: DataBundle) -> None:
    """A model with channel groups of its own (``channel_groups``) whose forward cannot run with fewer channels (a
    head count kept as an int) trained to the end, then failed at the export that ends a structured run: a copy with
    one channel cut from each layer is run on two samples first. The chain reader's layers always can."""
    if not isinstance(config.pattern, Structured) or not callable(getattr(model, "channel_groups", None)):
        return
    from .engine.structure import channel_groups
    from .engine.surgery import shrink

    groups = channel_groups(model, config.pattern.kind, config.pruning.include, config.pruning.exclude)
    keep = [torch.arange(group.channels) < max(group.channels - 1, 1) for group in groups]
    try:
        with torch.no_grad():
            shrink(model, groups, keep).eval()(data.train.inputs[:2])
    except Exception as error:  # the user's forward, whatever it raises
        other = "an unstructured baseline (magnitude, gradient)" if config.needs_dense else "pruning=unstructured"
        raise ConfigError("model", f"{type(model).__name__}'s forward does not run with fewer {config.pattern.kind} (one cut "
                                   f"from each of its {len(groups)} layers: {error.__class__.__name__}: "
                                   f"{(str(error).splitlines() or [''])[0][:200]}); allowed: a forward that takes its sizes "
                                   f"from its weights, or {other}") from error


def check_model_fits(model: nn.Module, data: DataBundle) -> list[str]:
    """One forward pass and loss on two training samples: a model of one's own whose input or output size does not
    fit the data fails here, in one line, instead of at the first training step with a run directory half-written.
    Returns the warnings for a model that fits but looks unusual (more outputs than classes)."""
    inputs, targets = data.train.inputs[:2], data.train.targets[:2]
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model", f"{type(model).__name__} has no trainable parameters; allowed: a model with some")
    wanted = ", ".join(f"{k}={v}" for k, v in data.meta.items() if k in ("input_shape", "num_classes", "vocab_size"))
    try:
        with torch.no_grad():
            _, outputs = loss_and_outputs(model.eval(), data.task, inputs, targets)  # eval: no batch statistics move
    except Exception as error:  # a model of one's own may fail in any way (a tuple output has no .reshape)
        raise ConfigError("model", f"does not fit dataset={data.name} ({error.__class__.__name__}: {error}); "
                                   f"allowed: a model for {wanted}") from error
    # two samples may not hold the largest class: fewer outputs than classes would fail mid-run; more train (a
    # vocabulary padded to a round size), but may be a mistake
    scores, classes = outputs.shape[-1], data.meta["num_classes"]
    per = "sample" if data.task == "classification" else "position"
    if scores < classes:
        raise ConfigError("model", f"does not fit dataset={data.name} (it gives {scores} scores per {per} for "
                                   f"{classes} classes); allowed: a model for {wanted}")
    if scores > classes:
        return [f"the model gives {scores} scores per {per} for the {classes} classes of dataset={data.name}: the extra "
                "ones are never a target"]
    return []


def check_init_from(config: RunConfig) -> Path:
    run_dir = Path(config.trainer.init_from)
    if not os.path.isfile(run_dir / MODEL_FILE) or not os.path.isfile(run_dir / RESULT_FILE):  # never raises, unlike pathlib
        raise ConfigError("trainer.init_from", f"{run_dir} is not a finished patcli run (needs {MODEL_FILE} and {RESULT_FILE})")
    try:
        source = read_record(run_dir / RESULT_FILE)
    except RecordError as error:
        raise ConfigError("trainer.init_from", f"{run_dir} is not a finished patcli run ({error})") from error
    if source.status != "ok":
        raise ConfigError("trainer.init_from", f"{run_dir} is {status_words(source.status)} run; allowed: a run that finished ok")
    if source.model_dataset_hash != config.model_dataset_hash():
        raise ConfigError(
            "trainer.init_from",
            f"{run_dir} was trained with another model/dataset config ({source.model} on {source.dataset}; "
            f"{config.model_dataset_changes(source.config)}); "
            "allowed: a run with the same model and dataset settings",
        )
    config.check_same_fold("trainer.init_from", run_dir, source.config)
    return run_dir


def load_weights(model: nn.Module, run_dir: Path, key: str) -> None:
    """Load a patcli run's saved weights (safetensors: no code is unpickled); a damaged file, or one of another
    model, is a ConfigError naming the config ``key`` that pointed at the run."""
    path = Path(run_dir) / MODEL_FILE
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ConfigError(key, f"{path} does not load into this model ({error}); allowed: the {MODEL_FILE} "
                               "a finished patcli run wrote") from error


def save_tensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> int:
    """Save tensors (a state_dict: a plain model of the same architecture loads it) as safetensors; returns bytes.

    Written beside and renamed into place, as records are: a crash mid-write never leaves half a model under the name.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(partial), metadata=metadata)
        with_default_mode(partial)
        os.replace(partial, path)
    except (SafetensorError, OSError) as error:  # safetensors' own error for a full disk, among others
        raise cannot_write(path, error) from error
    finally:
        partial.unlink(missing_ok=True)
    return path.stat().st_size


def never_called() -> float:
    """The validation loss of a pruner built only to check a plan: it never updates masks."""
    raise AssertionError("a planning pruner evaluated a loss")


def warn_if_one_jump(schedule: Schedule, frequency: int) -> None:
    """A gradual schedule whose updates are too sparse for its ramp prunes everything at one step: say so."""
    gradual = schedule.curve(0.0) < schedule.curve(1.0) and getattr(schedule, "monotone", True)
    if not gradual or schedule.update_count() > 1000:  # a ramp of that many updates is no jump (and long to list)
        return
    steps = schedule.update_steps()
    rising = [t for t in steps if schedule.target(t) > schedule.initial_sparsity]
    if len(rising) != 1:
        return
    ramp = schedule.end_step - schedule.begin_step
    advice = ("schedule.end equals schedule.begin; set end later for a ramp" if ramp == 0
              else "lower pruning.frequency or train longer")
    # step numbers as metrics.jsonl counts them: optimizer steps done when the masks change
    log.warning("schedule=%s reaches %.4g sparsity in one jump at step %d (mask updates every pruning.frequency=%d "
                "steps, a ramp of %d steps): that is one-shot pruning; %s",
                schedule.name, schedule.final_sparsity, rising[0] + 1, frequency, ramp, advice)


def warn_of_unused_options(config: RunConfig) -> None:
    """pruning=none trains dense, and a post-training baseline prunes its own way: a scorer, schedule, allocation or
    regrowth chosen with them would be dropped without a word."""
    if config.method == "pat":
        return
    ignored = [f"{group}={name}" for group, default in pruning_defaults().items()
               if (name := (config.source.get(group) or {}).get("name", default["name"])) != default["name"]]
    if config.regularizer is not None:
        ignored.append(f"regularizer={config.regularizer.name}")
    if config.needs_dense and config.trainer.init_from:  # a baseline starts from its dense run's weights
        ignored.append(f"trainer.init_from={config.trainer.init_from}")
    if ignored:
        what = "pruning=none trains dense" if config.method == "dense" else f"baseline={config.baseline.name} prunes its own way"
        log.warning("%s: %s do%s not apply", what, ", ".join(ignored), "es" if len(ignored) == 1 else "")


def inert_settings(config: RunConfig) -> dict[str, str | None]:
    """A PAT run's settings that its other choices override: each key (or group prefix) with the warning that names
    it, or None where it was left at its default. The record keeps the keys, so `compare` pools runs that differ
    only there."""
    if config.method != "pat":
        return {}
    inert: dict[str, str | None] = {}
    if config.pattern is not None and config.pattern.fixed_sparsity is not None:
        chosen = (config.source.get("allocation") or {}).get("name")
        inert["allocation."] = None if chosen in (None, "uniform", pruning_defaults()["allocation"]["name"]) else (
            f"pruning={config.pattern.name} prunes every layer to {config.pattern.fixed_sparsity:g}: allocation={chosen} "
            "does not apply (uniform)")
    mode_defaults = OmegaConf.load(conf_dir() / "pruning" / f"{config.pruning.mode}.yaml")
    if config.schedule.name == "alternating":
        inert["pruning.frequency"] = None if config.pruning.frequency == mode_defaults.get("frequency") else (
            f"pruning.frequency={config.pruning.frequency} does not apply: schedule=alternating updates masks where its "
            "compressed phases start")
    reduce = (config.source.get("pruning") or {}).get("reduce")
    changed_reduce = reduce not in (None, mode_defaults.get("reduce"))
    if getattr(config.scorer, "grouped", False):
        inert["pruning.reduce"] = None if not changed_reduce else (
            f"pruning.reduce={reduce} does not apply: scorer={config.scorer.name} scores whole channels itself")
    elif config.scorer.name == "movement" and "reduce" in mode_defaults:
        inert["pruning.reduce"] = None if not changed_reduce else (
            f"pruning.reduce={reduce} does not apply: scorer=movement sums its signed scores over each channel")
    if config.regrowth.masking is not None:  # reversal keeps dense weights aside whatever pruning.masking says
        inert["pruning.masking"] = None
    inert.update(inert_schedule_settings(config, mode_defaults))
    return inert


def inert_schedule_settings(config: RunConfig, mode_defaults) -> dict[str, str | None]:
    """Schedule settings a run's choices make moot: a schedule that prunes once, or holds its target from begin on
    with masks that only grow, or a regrowth mode that decides the updates itself."""
    name, regrowth = config.schedule.name, config.regrowth
    reasons: dict[str, str] = {}
    if regrowth.replaces_schedule:
        reasons = dict.fromkeys(("pruning.frequency", "schedule.begin", "schedule.end", "schedule.initial_sparsity"),
                                f"regrowth={regrowth.name} is sparse at the target from the first step and updates masks "
                                "every regrowth.delta_t steps until regrowth.end")
    elif name == "oneshot":
        reasons["pruning.frequency"] = "schedule=oneshot prunes once, at schedule.begin"
    elif (name == "constant" and regrowth.name == "none" and config.regularizer is None
          and not isinstance(config.pattern, Structured)):  # whole channels may fall short of the target at first
        reasons["pruning.frequency"] = reasons["schedule.end"] = (
            "schedule=constant prunes to the target at schedule.begin, and its later updates change nothing without "
            "regrowth=reversal or a regularizer")
    ramp = config.source["schedule"].get("ramp", name)
    if not regrowth.replaces_schedule and ramp in ("constant", "oneshot"):
        holder = f"schedule.ramp={ramp}" if ramp != name else f"schedule={name}"
        reasons["schedule.initial_sparsity"] = f"{holder} holds the final sparsity from schedule.begin on"
    schedule_defaults = OmegaConf.to_container(OmegaConf.load(conf_dir() / "schedule" / f"{name}.yaml"))
    given = {"pruning.frequency": config.pruning.frequency, **{f"schedule.{k}": v for k, v in config.source["schedule"].items()}}
    defaults = {"pruning.frequency": mode_defaults.get("frequency"), **{f"schedule.{k}": v for k, v in schedule_defaults.items()}}
    moved_begin = given.get("schedule.begin") != defaults.get("schedule.begin")  # an end before it is refused: set, not moot
    return {key: None if given.get(key) == defaults.get(key) or (key == "schedule.end" and moved_begin) else
            f"{key}={given.get(key)} does not apply: {reason}" for key, reason in reasons.items()}


def warn_of_unused_settings(config: RunConfig) -> None:
    """A PAT run's settings that its other choices override, named rather than dropped without a word."""
    for warning in inert_settings(config).values():
        if warning:
            log.warning("%s", warning)


def allocation_loss(config: RunConfig, trainer: Trainer) -> Callable[[], float]:
    """The validation loss a loss-measuring allocation calls, over as many batches as it asks for."""
    return functools.partial(trainer.validation_loss, getattr(config.allocation, "batches", None))


def build_pruner(
    config: RunConfig,
    model: nn.Module,
    steps: int,
    evaluate_fn: Callable[[], float] | None = None,
    on_update: Callable[[MaskUpdate], None] | None = None,
) -> Pruner:
    try:
        pruner = Pruner(
            model,
            sparsity=config.target_sparsity,
            schedule=config.schedule,
            total_steps=steps,
            scorer=config.scorer,
            allocation=config.allocation,
            pattern=config.pattern,
            frequency=config.pruning.frequency,
            masking=config.pruning.masking,
            include=config.pruning.include,
            exclude=config.pruning.exclude,
            max_layer_sparsity=config.pruning.max_layer_sparsity,
            regrowth=config.regrowth,
            regularizer=config.regularizer,
            evaluate=evaluate_fn,
            on_update=on_update,
        )  # it refuses a target the per-layer caps cannot reach
        return pruner
    except ScheduleError as error:
        raise ConfigError(error.key, str(error).split(": ", 1)[1]) from error
    except AllocationError as error:
        target = config.regularizer is not None and config.regularizer.target is not None
        raise ConfigError("regularizer.target" if target else "pruning.sparsity", str(error)) from error
    except ValueError as error:
        raise ConfigError("pruning", str(error)) from error


def sparsity_report(model: nn.Module, config: RunConfig) -> tuple[float, dict[str, float], int]:
    """Achieved sparsity over the prunable weights (zeros / elements), per layer, and their count.

    For channel modes the prunable weights are those the channels span (heads: the attention projections).
    """
    if isinstance(config.pattern, Structured):
        with engine_quiet():  # its warnings came when the run's pruner was built
            layout = make_layout(model, config.pattern, config.pruning.include, config.pruning.exclude)
        weights = {n: p for n, p, counted in zip(layout.names, layout.params, layout.accounted) if counted}
    else:
        weights = select_prunable(model, config.pruning.include, config.pruning.exclude)
    per_layer = {name: float((w == 0).sum()) / w.numel() for name, w in weights.items()}
    prunable = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return (zeros / prunable if prunable else 0.0), per_layer, prunable


def base_record(config: RunConfig, data: DataBundle) -> RunRecord:
    metric, higher = data.primary_metric
    pat = config.method == "pat"
    return RunRecord(
        method=config.method,
        recipe=config.recipe(),
        model=config.model.label(),
        dataset=config.dataset.name,
        model_dataset_hash=config.model_dataset_hash(),
        seed=config.seed,
        package_version=__version__,
        scorer=config.scorer.name if pat else None,
        schedule=config.schedule.name if pat else None,
        allocation=config.allocation.name if pat else None,
        pattern=config.pruning.mode if config.pruning.enabled else None,
        regrowth=config.regrowth.name if pat else None,
        regularizer=config.regularizer.name if pat and config.regularizer else None,
        target_sparsity=config.target_sparsity,
        primary_metric=metric,
        higher_is_better=higher,
        config=config.source,
        extra={"dense_key": config.dense_key(), **({"inert": sorted(inert)} if (inert := inert_settings(config)) else {})},
    )


def finish_record(record: RunRecord, model: nn.Module, config: RunConfig, data: DataBundle, run_dir: Path, device) -> RunRecord:
    """Test once, measure sparsity and size, save the weights (and the smaller model of a structured run); the record
    is complete but not yet written."""
    record.metrics["val"] = evaluate(model, data.val.to(device), data.task)
    record.metrics["test"] = evaluate(model, data.test.to(device), data.task)
    record.achieved_sparsity, record.per_layer_sparsity, record.params_prunable = sparsity_report(model, config)
    record.params_total = sum(p.numel() for p in model.parameters())
    record.params_nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    record.bytes_on_disk = save_tensors(model.state_dict(), run_dir / MODEL_FILE)
    if isinstance(config.pattern, Structured):  # structured runs end with a genuinely smaller model
        from .export import export_model

        export_model(model, config, data, run_dir, record)
    return record


def record_engine(record: RunRecord, pruners: list[Pruner], fit_seconds: float) -> None:
    """What the pruners did and cost: updates, memory held, and their time over the rest of the training loop."""
    record.mask_updates = sum(len(p.updates) for p in pruners)
    record.engine_state_bytes = max((p.engine_state_bytes() for p in pruners), default=0)
    if fit_seconds:
        engine = sum(p.seconds for p in pruners)
        record.step_overhead = engine / max(fit_seconds - engine, 1e-9)


def run_training(config: RunConfig, run_dir: Path, progress: Progress | None = None, label: str | None = None) -> RunRecord:
    """A dense (pruning=none) or PAT run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    data = load_dataset(config.dataset)
    device = resolve_device(config.trainer.device)
    model = build_model(config.model, data.meta)
    if config.trainer.init_from:
        load_weights(model, check_init_from(config), "trainer.init_from")
    trainer = Trainer(model, data, config.trainer, device, config.seed)
    record = base_record(config, data)
    pruner = None
    if config.method == "pat" and config.regrowth.name == "reversal" and config.trainer.optimizer != "sgd":
        log.warning("regrowth=reversal with trainer.optimizer=%s: reversal is meant for SGD; under Adam pruned weights "
                    "random-walk and masks churn (see BENCHMARKS.md, dynamic)", config.trainer.optimizer)
    warn_of_unused_options(config)
    warn_of_unused_settings(config)
    if config.method == "pat":
        pruner = build_pruner(
            config,
            trainer.model,
            trainer.total_steps,
            evaluate_fn=allocation_loss(config, trainer),
            on_update=lambda u: append_metrics(run_dir, mask_update_row(u)),
        ).attach(trainer.optimizer)
        if config.regularizer is None or config.regularizer.target is not None:  # a penalty without a target zeroes
            warn_if_one_jump(pruner.schedule, config.pruning.frequency)  # what it chooses: no ramp to jump along
    fit = trainer.fit(
        progress=progress,
        on_eval=lambda row: append_metrics(run_dir, {"kind": "eval", **row}),
        sparsity=pruner.current_sparsity if pruner else None,
        label=label,
    )
    if pruner:
        pruner.detach()
        record_engine(record, [pruner], fit.seconds)
        record.extra["revived_weights"] = sum(u.revived for u in pruner.updates)
    record.train_steps = record.total_train_steps = fit.steps
    record.train_seconds = round(fit.seconds, 3)
    if config.dense:  # a dense run given for reference (sweeps that compare against one)
        from .dense import check_dense_run, dense_reference

        record.dense_reference = dense_reference(Path(config.dense), check_dense_run(Path(config.dense), config))
    if config.trainer.init_from:
        source = read_record(Path(config.trainer.init_from) / RESULT_FILE)
        record.total_train_steps += source.total_train_steps
        record.extra["init_from"] = str(config.trainer.init_from)
    finish_record(record, trainer.model, config, data, run_dir, device)
    if pruner:
        warn_if_off_target(config, record)
    if config.regularizer is not None:
        warn_if_penalty_overshot(config, record)
        if config.regularizer.target is None:  # the penalty chose the sparsity
            record.target_sparsity = round(record.achieved_sparsity, 2)
    return record


def warn_if_off_target(config: RunConfig, record: RunRecord) -> None:
    """Say when the zeros miss the target by more than half a percent, and why. A penalty's own overshoot is said
    with its fix (``warn_if_penalty_overshot``); under its target the channels' rounding is said here."""
    regularizer = config.regularizer if config.method == "pat" else None  # a post-training baseline ignores one
    miss = record.achieved_sparsity - record.target_sparsity
    if abs(miss) > 0.005 if regularizer is None else regularizer.target is not None and miss < -0.005:
        log.warning("pruning=%s reached %.4g of the prunable weights for %s=%g: %s", config.pruning.mode,
                    record.achieved_sparsity, "pruning.sparsity" if regularizer is None else "regularizer.target",
                    record.target_sparsity, off_target_reason(config))


def off_target_reason(config: RunConfig) -> str:
    """Why a run's zeros can miss its target by more than rounding, for the warning that says it did."""
    if isinstance(config.pattern, Structured):
        return f"the nearest that whole {config.pruning.mode} reach"
    if config.pruning.mode == "block":
        return "the nearest that whole blocks reach"
    # unstructured or N:M: masks hold the exact count, so the extra zeros are weights left at zero outside them
    return "weights outside the masks are exactly zero too (units that no longer get a gradient)"


def warn_if_penalty_overshot(config: RunConfig, record: RunRecord) -> None:
    """A penalty too strong zeroes more than regularizer.target, or a layer beyond the cap: no mask can bring those
    weights back, so the run ends sparser (or cut) than asked; say so, with the fix."""
    regularizer, cap = config.regularizer, config.pruning.max_layer_sparsity
    # in channel modes a weight whose input and output channels are both cut may pass the cap: only a whole layer counts
    limit = 1.0 - 1e-9 if isinstance(config.pattern, Structured) else cap + 1e-9
    over = [name for name, sparsity in record.per_layer_sparsity.items() if sparsity > limit]
    if over:
        log.warning("regularizer=%s zeroed %s beyond pruning.max_layer_sparsity=%g (%s): lower regularizer.lam (%g)",
                    regularizer.name, ", ".join(over), cap,
                    ", ".join(f"{record.per_layer_sparsity[name]:.4g}" for name in over), regularizer.lam)
    if regularizer.target is not None and record.achieved_sparsity > regularizer.target + 0.005:
        log.warning("regularizer=%s zeroed %.4g of the prunable weights, more than regularizer.target=%g: lower "
                    "regularizer.lam (%g)", regularizer.name, record.achieved_sparsity, regularizer.target, regularizer.lam)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """``trainer.threads`` for one run, then torch's count as it was: the next job in this process (a sweep's, or a
    baseline's dense run) must not inherit it, as the count changes the floating-point sums and so the weights."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute(config: RunConfig, run_dir: Path, progress: Progress | None = None, label: str | None = None) -> RunRecord:
    """Run whatever the config describes and write its record."""
    snapshot = run_dir / ".hydra" / "config.yaml"
    if not snapshot.exists():  # a run started outside Hydra still carries the config that rebuilds it
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(OmegaConf.to_yaml(config.source))
    with torch_threads(config.trainer.threads):
        if config.needs_dense:
            from .baselines import run_baseline

            record = run_baseline(config, run_dir, progress)
        else:
            record = run_training(config, run_dir, progress, label)
        record.extra["environment"] = environment(config)
    record.status = "ok"
    write_record(run_dir, record)
    return record


def environment(config: RunConfig) -> dict[str, object]:
    """What besides the config decides a run's exact numbers: the same settings give bit-identical weights only on
    the same device kind with the same thread count and versions (a joblib job runs on cores // n_jobs threads, for one)."""
    import platform

    return {"device": resolve_device(config.trainer.device).type, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine()}


def failed_record(source: dict, run_dir: Path, error: BaseException, status: str = "failed") -> RunRecord:
    """A record for a run that did not finish, built from the raw config so it works even when parsing failed."""
    baseline = ((source.get("baseline") or {}).get("name")) or "none"
    pruning = source.get("pruning") or {}
    method = f"post:{baseline}" if baseline != "none" else ("dense" if pruning.get("mode") == "none" else "pat")
    sparsity = pruning.get("sparsity")
    target = float(sparsity) if isinstance(sparsity, (int, float)) else 0.0
    model = label_of(source["model"] if isinstance(source.get("model"), dict) else {})  # one's own: its class, as when done
    try:
        config = parse_run_config(source)
        recipe, md_hash, method, target = config.recipe(), config.model_dataset_hash(), config.method, config.target_sparsity
    except Exception:  # the config itself may be what failed
        recipe, md_hash = method, ""
    record = RunRecord(
        method=method,
        recipe=recipe,
        model=model,
        dataset=str((source.get("dataset") or {}).get("name", "?")),
        model_dataset_hash=md_hash,
        seed=int(source.get("seed", 0) or 0),
        status=status,
        package_version=__version__,
        target_sparsity=target,
        error=f"{error.__class__.__name__}: {error}",
        config=source,
    )
    steps, sparsity, updates = logged_progress(run_dir)  # how far it got, not 0
    record.train_steps = record.total_train_steps = steps
    record.achieved_sparsity, record.mask_updates = sparsity or 0.0, updates
    write_record(run_dir, record)
    return record

