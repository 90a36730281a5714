"""Regularization-based PAT: a proximal step after each optimizer step drives weights (or whole groups) to zero.

With the current learning rate η and strength λ (warmed up linearly):
lasso: w ← sign(w)·max(|w| − ηλ, 0); group lasso: w_g ← w_g·max(0, 1 − ηλ·√|g| / ‖w_g‖), with the engine's
channel groups (neurons, filters, heads: every slice of the channel). Weights the step zeroes become masked at
the next mask update (every ``pruning.frequency`` steps), so they stay zero. The penalty acts until the schedule's
``end``; there an optional ``target`` closes with an exact magnitude mask, and the rest of the run fine-tunes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .layouts import ChannelLayout, Layout, along_slice, channel_rows
from .registry import ParamError, Registry
from .schedules import to_step

REGULARIZERS: Registry["Regularizer"] = Registry("regularizer")


@dataclass
class Regularizer:
    """Strength ``lam``, linear warm-up over ``warmup`` (steps or fraction), optional exact final ``target``."""

    lam: float = 0.05
    warmup: int | float = 0.1
    target: float | None = None
    warmup_steps: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.lam < math.inf:  # NaN fails every comparison; 0 is no penalty: nothing would be pruned
            raise ParamError("lam", f"{self.lam} is out of range; allowed: a finite number > 0")
        if self.target is not None and not 0.0 <= self.target < 1.0:
            raise ParamError("target", f"{self.target} is out of range; allowed: 0 <= value < 1 or null")

    def bind(self, total_steps: int) -> "Regularizer":
        self.warmup_steps = to_step(self.warmup, total_steps, "regularizer.warmup")
        return self

    def strength(self, t: int) -> float:
        return self.lam * (min(1.0, (t + 1) / self.warmup_steps) if self.warmup_steps else 1.0)

    def check(self, layout: Layout) -> None:
        """Raise ValueError when the layout cannot carry this penalty."""

    def apply(self, layout: Layout, lr: Callable[[torch.Tensor], float], t: int) -> None:
        """One proximal step after the optimizer's; ``lr(weight)`` is the learning rate the optimizer gave it (a 0-dim
        tensor, 0 on a step a GradScaler skipped, under a fused optimizer)."""
        raise NotImplementedError


def soft_threshold_(weight: torch.Tensor, threshold: float | torch.Tensor) -> None:
    """w ← sign(w)·max(|w| − threshold, 0), in place (softshrink: one kernel instead of four; a threshold on the
    device, which softshrink cannot take, as w − clamp(w, −t, t))."""
    if isinstance(threshold, torch.Tensor):
        weight.sub_(weight.clamp(-threshold, threshold))
    else:
        weight.copy_(F.softshrink(weight, threshold))


@REGULARIZERS.register("lasso")
@dataclass
class Lasso(Regularizer):
    """Element-wise L1 proximal step on every prunable weight."""

    def check(self, layout: Layout) -> None:
        if isinstance(layout, ChannelLayout):
            raise ValueError("regularizer=lasso acts on single weights; allowed with pruning=unstructured (use group_lasso for channels)")

    @torch.no_grad()
    def apply(self, layout: Layout, lr: Callable[[torch.Tensor], float], t: int) -> None:
        for param, accounted in zip(layout.params, layout.accounted):
            if accounted:
                soft_threshold_(param, lr(param) * self.strength(t))


def shrink_factors(per_channel: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """max(0, 1 − threshold·√|g| / ‖w_g‖) per channel, from each slice's [channels, -1] values."""
    norms = torch.sqrt(sum(s.pow(2).sum(1) for s in per_channel))
    size = sum(s.shape[1] for s in per_channel)
    return (1.0 - threshold * math.sqrt(size) / norms.clamp(min=1e-12)).clamp(min=0.0)


@REGULARIZERS.register("group_lasso")
@dataclass
class GroupLasso(Regularizer):
    """Group-lasso proximal step over whole channels (pruning=neurons|filters|heads)."""

    def check(self, layout: Layout) -> None:
        if not isinstance(layout, ChannelLayout):
            raise ValueError("regularizer=group_lasso shrinks whole channels; allowed with pruning=neurons, filters or heads")

    @torch.no_grad()
    def apply(self, layout: Layout, lr: Callable[[torch.Tensor], float], t: int) -> None:
        """Each channel's shrink factor multiplies all of its slices (a weight in two groups is shrunk by each); the
        step size is the learning rate of the weight that produces the channels."""
        params = dict(zip(layout.names, layout.params))
        for group in layout.groups:
            threshold = lr(params[group.slices[0].param]) * self.strength(t)
            factor = shrink_factors([channel_rows(params[p.param], group.channels, p) for p in group.slices], threshold)
            for part in group.slices:
                params[part.param].mul_(along_slice(factor, part, params[part.param].dim()))
