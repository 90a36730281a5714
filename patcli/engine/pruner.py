"""The pruner: ties masks, scorer, schedule, allocation and pattern to an optimizer's steps.

Score → decide → apply: the scorer says how much each weight matters, the allocation how many groups each layer
loses, the pattern which elements form a group, and the masking how the decision is enforced. The pruner hooks
into ``optimizer.step()``, so a training loop needs no other call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .allocation import Allocation, LayerBudget, Uniform
from .masks import MASKINGS, MaskSet, select_prunable, zero_optimizer_state_
from .patterns import Pattern, Unstructured
from .schedules import Schedule
from .scorers import Magnitude, Scorer

log = logging.getLogger(__name__)


@dataclass
class MaskUpdate:
    """What one mask update did, for the run's metrics."""

    step: int
    target: float
    sparsity: float
    revived: int = 0


class Pruner:
    """Pruning-aware training for any model and optimizer.

    ``evaluate`` (a function returning a validation loss) is only needed by sensitivity-based allocation.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sparsity: float,
        schedule: Schedule,
        total_steps: int,
        scorer: Scorer | None = None,
        allocation: Allocation | None = None,
        pattern: Pattern | None = None,
        frequency: int = 10,
        masking: str = "inplace",
        include: tuple[str, ...] | list[str] = ("*",),
        exclude: tuple[str, ...] | list[str] = (),
        max_layer_sparsity: float = 0.99,
        monotone: bool = True,
        evaluate: Callable[[], float] | None = None,
        on_update: Callable[[MaskUpdate], None] | None = None,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be within 0 <= s < 1, got {sparsity}")
        self.model = model
        self.pattern = pattern or Unstructured()
        if self.pattern.fixed_sparsity is not None and abs(sparsity - self.pattern.fixed_sparsity) > 1e-9:
            raise ValueError(f"pattern {self.pattern.name!r} fixes sparsity at {self.pattern.fixed_sparsity}, got {sparsity}")
        self.sparsity_target = sparsity
        self.schedule = schedule.bind(total_steps, sparsity, frequency)
        self.scorer = scorer or Magnitude()
        self.allocation = allocation or Uniform()
        self.max_layer_sparsity = max_layer_sparsity
        self.monotone = monotone and getattr(self.schedule, "monotone", True)
        self.evaluate = evaluate
        self.on_update = on_update
        self.seconds = 0.0  # wall time spent in the pruner's hooks, for the per-step overhead
        weights = select_prunable(model, include, exclude)
        self.masks = MaskSet(weights)
        for name, weight in weights.items():
            self.pattern.check(name, weight.shape)
        if masking not in MASKINGS:
            raise ValueError(f"unknown masking {masking!r}; allowed: {', '.join(MASKINGS)}")
        self.masking = MASKINGS[masking](self.masks)
        self.step = 0
        self.updates: list[MaskUpdate] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._handles: list = []

    # -- wiring ---------------------------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "Pruner":
        """Run the pruner around every ``optimizer.step()``."""
        self.detach()
        self.optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(lambda *_: self.before_step()),
            optimizer.register_step_post_hook(lambda *_: self.after_step()),
        ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the step -------------------------------------------------------------------------------------------------

    def before_step(self) -> None:
        started = time.perf_counter()
        if self.scorer.needs_grad:
            grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self.masks.weights]
            self.scorer.observe([w.detach() for w in self.masks.weights], grads)
        self.masking.before_step()
        self.seconds += time.perf_counter() - started

    def after_step(self) -> None:
        started = time.perf_counter()
        t = self.step
        self.masking.after_step()
        enforced = self.schedule.masks_enforced(t)
        if enforced != self.masking.enforced:
            self.masking.enforced = enforced
            if enforced:
                self.masking.masks_changed()
        if self.schedule.is_update_step(t):
            self.update_masks(t)
        self.step += 1
        self.seconds += time.perf_counter() - started

    # -- decisions ------------------------------------------------------------------------------------------------

    def update_masks(self, t: int) -> MaskUpdate:
        """Re-choose masks for the schedule's target at step t."""
        target = self.schedule.target(t)
        old_keep = [k.clone() for k in self.masks.keep] if not self.monotone else None
        scores = self._scores()
        budget = self._budget(scores, target)
        counts = self.allocation.prune_counts(budget)
        for i, (element_scores, count) in enumerate(zip(scores, counts)):
            self.masks.set(i, self.pattern.keep_mask(element_scores, count))
        self.masking.masks_changed()
        if getattr(self.schedule, "resets_optimizer_state", False) and self.optimizer is not None:
            zero_optimizer_state_(self.optimizer, self.masks)
        self.scorer.reset()
        revived = 0
        if old_keep is not None:
            revived = int(sum(((~old) & new).sum() for old, new in zip(old_keep, self.masks.keep)))
        update = MaskUpdate(step=t, target=target, sparsity=self.masks.sparsity(), revived=revived)
        self.updates.append(update)
        log.debug("mask update at step %d: target %.4f, sparsity %.4f", t, target, update.sparsity)
        if self.on_update:
            self.on_update(update)
        return update

    def _scores(self) -> list[torch.Tensor]:
        scores = [s.float() for s in self.scorer.scores(self.masking.dense_weights())]
        if self.monotone:
            scores = [s.masked_fill(~keep, float("-inf")) for s, keep in zip(scores, self.masks.keep)]
        return scores

    def _budget(self, scores: list[torch.Tensor], target: float) -> LayerBudget:
        shapes = [w.shape for w in self.masks.weights]
        return LayerBudget(
            group_scores=[self.pattern.group_scores(s) for s in scores],
            group_sizes=[self.pattern.group_size(shape) for shape in shapes],
            shapes=shapes,
            target=target,
            max_layer_sparsity=self.max_layer_sparsity,
            loss_with_layer_pruned=(lambda i, s: self._loss_with_layer_pruned(i, s, scores[i])) if self.evaluate else None,
        )

    def _loss_with_layer_pruned(self, index: int, sparsity: float, scores: torch.Tensor) -> float:
        """Validation loss with one layer alone pruned to ``sparsity`` by its scores (sensitivity analysis)."""
        weight = self.masks.weights[index]
        saved = weight.detach().clone()
        count = int(round(sparsity * self.pattern.group_scores(scores).numel()))
        with torch.no_grad():
            weight.mul_(self.pattern.keep_mask(scores, count))
        try:
            return float(self.evaluate())
        finally:
            with torch.no_grad():
                weight.copy_(saved)

    # -- reporting and state --------------------------------------------------------------------------------------

    def sparsity(self) -> float:
        """Achieved fraction of prunable weights that are exactly zero in the model."""
        zeros = sum(int((w == 0).sum()) for w in self.masks.weights)
        return zeros / sum(self.masks.numels())

    def per_layer_sparsity(self) -> dict[str, float]:
        return {name: float((w == 0).sum()) / w.numel() for name, w in zip(self.masks.names, self.masks.weights)}

    def engine_state_bytes(self) -> int:
        """Memory the engine holds besides the model: masks, shadow weights, score accumulators."""
        return self.masks.state_bytes() + self.masking.state_bytes() + self.scorer.state_bytes()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"step": torch.tensor(self.step)}
        state.update({f"mask.{k}": v for k, v in self.masks.state_dict().items()})
        state.update({f"masking.{k}": v for k, v in self.masking.state_dict().items()})
        state.update({f"scorer.{k}": v for k, v in self.scorer.state_dict().items()})
        state.update({f"allocation.{k}": v for k, v in self.allocation.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        self.step = int(state["step"])
        self.masks.load_state_dict(part("mask."))
        self.masking.load_state_dict(part("masking."))
        self.scorer.load_state_dict(part("scorer."))
        self.allocation.load_state_dict(part("allocation."))
        self.masking.enforced = self.schedule.masks_enforced(max(self.step - 1, 0))
        self.masking.masks_changed()
