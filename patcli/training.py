"""One training and evaluation loop for dense runs, PAT and fine-tuning.

Pruning needs nothing from this loop: a Pruner hooks into ``optimizer.step()``. The loop syncs with the host
only to refresh the progress display and at evaluations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainerConfig
from .data import DataBundle, Split


class Progress(Protocol):
    """What the loop reports while it runs (the CLI draws it with rich)."""

    def start(self, total_steps: int, label: str | None = None) -> None: ...

    def update(self, step: int, loss: float, sparsity: float | None) -> None: ...

    def stop(self) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError

        raise ConfigError("trainer.device", "cuda was asked for but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)


def steps_per_epoch(data: DataBundle, batch_size: int) -> int:
    return math.ceil(len(data.train) / batch_size)


def total_steps(data: DataBundle, config: TrainerConfig) -> int:
    steps = config.epochs * steps_per_epoch(data, config.batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


def make_optimizer(model: nn.Module, config: TrainerConfig) -> torch.optim.Optimizer:
    """The configured optimizer, with torch's fused kernel where the parameters allow it.

    Fused AdamW steps are 4.8× faster than torch's CPU default (single-tensor) and 2.9× than foreach here, and do
    not slow down on exact-zero second moments (dead units of a sparse model) the way the foreach kernel's square
    root does (BENCHMARKS.md, adamw_zeros).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        cls, options = torch.optim.SGD, dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        options = dict(lr=config.lr, weight_decay=config.weight_decay)
    try:
        return cls(params, fused=True, **options)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return cls(params, **options)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant, cosine or linear decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def loss_and_outputs(model: nn.Module, task: str, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = model(inputs)
    if task == "language_modeling":
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)), outputs
    return F.cross_entropy(outputs, targets), outputs


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, task: str, batch_size: int = 512, max_batches: int | None = None) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity (language modelling) over a split (or its first
    ``max_batches`` batches, always the same ones)."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=split.inputs.device)
    correct = torch.zeros((), device=split.inputs.device)
    count = 0
    for index, (inputs, targets) in enumerate(split.batches(batch_size)):
        if max_batches is not None and index == max_batches:
            break
        loss, outputs = loss_and_outputs(model, task, inputs, targets)
        n = targets.numel()
        total_loss += loss * n
        correct += (outputs.argmax(-1) == targets).sum()
        count += n
    model.train(was_training)
    loss = float(total_loss) / count
    if task == "language_modeling":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": float(correct) / count}
    return {"loss": loss, "accuracy": float(correct) / count}


@dataclass
class FitResult:
    steps: int
    seconds: float
    evals: list[dict] = field(default_factory=list)


class Trainer:
    """Trains ``model`` on ``data``; ``on_eval`` receives each validation row (the run's metrics.jsonl)."""

    def __init__(self, model: nn.Module, data: DataBundle, config: TrainerConfig, device: torch.device, seed: int,
                 shuffle: torch.Generator | None = None) -> None:
        """``shuffle``: a stream of batch orders to go on with (a baseline's rounds); else one seeded by ``seed``."""
        self.model = model.to(device)
        if device.type == "cpu":
            # Training leaves denormal values (below ~1e-38) in weights, activations and optimizer state, and CPU
            # arithmetic on them is many times slower; flushing them to zero made steps ~10% faster here.
            torch.set_flush_denormal(True)
        self.data = data
        self.train_split = data.train.to(device)
        self.val_split = data.val.to(device)
        self.config = config
        self.device = device
        self.shuffle = shuffle if shuffle is not None else torch.Generator().manual_seed(seed)
        self.total_steps = total_steps(data, config)
        self.optimizer = make_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.total_steps, config.warmup_steps, config.lr_schedule),
        )

    def validation_loss(self, max_batches: int | None = None) -> float:
        return evaluate(self.model, self.val_split, self.data.task, max_batches=max_batches)["loss"]

    def fit(
        self,
        progress: Progress | None = None,
        on_eval: Callable[[dict], None] | None = None,
        sparsity: Callable[[], float] | None = None,
        refresh_every: int = 10,
        label: str | None = None,
    ) -> FitResult:
        config, model = self.config, self.model
        per_epoch = steps_per_epoch(self.data, config.batch_size)
        result = FitResult(steps=0, seconds=0.0)
        started = time.perf_counter()
        if progress:
            progress.start(self.total_steps, label)
        model.train()
        step = 0
        try:
            while step < self.total_steps:
                for inputs, targets in self.train_split.batches(config.batch_size, self.shuffle):
                    loss, _ = loss_and_outputs(model, self.data.task, inputs, targets)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip:
                        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    self.optimizer.step()
                    lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used (the scheduler moves on next)
                    self.scheduler.step()
                    step += 1
                    if progress and (step % refresh_every == 0 or step == self.total_steps):
                        progress.update(step, float(loss.detach()), sparsity() if sparsity else None)
                    epoch_done = step % per_epoch == 0
                    if step == self.total_steps or (epoch_done and (step // per_epoch) % config.eval_every == 0):
                        row = {
                            "step": step,
                            "epoch": round(step / per_epoch, 3),
                            "split": "val",
                            **evaluate(model, self.val_split, self.data.task),
                            "lr": lr,
                            "seconds": round(time.perf_counter() - started, 3),
                        }
                        if sparsity:
                            row["sparsity"] = sparsity()
                        result.evals.append(row)
                        if on_eval:
                            on_eval(row)
                        if not math.isfinite(row["loss"]):
                            raise FloatingPointError(
                                f"training diverged: validation loss is {row['loss']} at step {step}; "
                                "lower trainer.lr or set trainer.grad_clip")
                    if step >= self.total_steps:
                        break
        finally:
            if progress:
                progress.stop()
        result.steps = step
        result.seconds = time.perf_counter() - started
        return result
