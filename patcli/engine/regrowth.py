"""Pruning reversal and dynamic sparse training: masks that can give weights back.

``reversal`` (≈ DPF, Lin et al. 2020) keeps dense weights aside (``dense_shadow`` masking), lets pruned weights go
on learning from the gradient at the masked point, and re-chooses masks from all dense weights at each update,
so a pruned weight that became important returns. ``set`` (Mocanu et al. 2018) and ``rigl`` (Evci et al. 2020)
start sparse at the target and every ``delta_t`` steps drop the smallest active weights and regrow as many
(random for SET, largest |gradient| for RigL): the number of active weights per layer never changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .allocation import erk_sparsities
from .registry import ParamError, Registry, check_seed, stream_seed
from .schedules import ScheduleError, to_step

REGROWTHS: Registry["Regrowth"] = Registry("regrowth")


@dataclass
class Regrowth:
    """Base: what a regrowth mode changes about the pruner."""

    monotone = True  # masks only grow
    masking = None  # the masking it needs, if any
    replaces_schedule = False  # True: the mode decides when and how masks change

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def exact_counts(sparsities: list[float], sizes: list[int], total: int, caps: list[int]) -> list[int]:
    """Per-layer counts near s_l · n_l that add up to ``total``: floors, then the largest remainders get one more
    (rounding each layer alone can miss the total by up to one per layer)."""
    wanted = [s * n for s, n in zip(sparsities, sizes)]
    counts = [min(math.floor(w), c) for w, c in zip(wanted, caps)]
    missing = total - sum(counts)
    for i in sorted(range(len(sizes)), key=lambda i: counts[i] - wanted[i]):  # largest remainder first
        if missing <= 0:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
            missing -= 1
    return counts


@REGROWTHS.register("none")
@dataclass
class NoRegrowth(Regrowth):
    """Pruned weights stay pruned."""


@REGROWTHS.register("reversal")
@dataclass
class Reversal(Regrowth):
    """Pruning reversal: dense weights keep training, masks are re-chosen from them, pruned weights can return.

    Meant for SGD (as in DPF): Adam's per-coordinate normalisation moves a pruned weight's shadow as fast as a kept
    weight, whatever its gradient, so masks churn and accuracy drops at high sparsity (BENCHMARKS.md, ``dynamic``).
    """

    monotone = False
    masking = "dense_shadow"


def drop_fraction_at(t: int, end_step: int, initial: float) -> float:
    """Cosine-annealed drop fraction (RigL): initial/2 · (1 + cos(π·t/end))."""
    return initial / 2.0 * (1.0 + math.cos(math.pi * min(t, end_step) / end_step))


@dataclass
class DynamicSparse(Regrowth):
    """Sparse from the first step; every ``delta_t`` steps until ``end``, drop and regrow a fraction per layer."""

    delta_t: int = 50
    end: int | float = 0.75
    drop_fraction: float = 0.3
    init: str = "erk"  # random (every layer at the target) | erk (Erdős–Rényi-kernel densities)
    seed: int = 0
    replaces_schedule = True
    masking = "inplace"  # a regrown weight starts at zero: no dense copy may bring back an old value
    end_step: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.delta_t < 1:
            raise ParamError("delta_t", f"{self.delta_t} is out of range; allowed: >= 1 (steps)")
        if not 0.0 < self.drop_fraction < 1.0:
            raise ParamError("drop_fraction", f"{self.drop_fraction} is out of range; allowed: 0 < value < 1")
        if self.init not in ("random", "erk"):
            raise ParamError("init", f"{self.init!r} is not allowed; allowed: random, erk")
        check_seed(self.seed)
        self.generator = torch.Generator().manual_seed(stream_seed(self.seed, "regrowth", self.name))

    def bind(self, total_steps: int) -> "DynamicSparse":
        self.end_step = max(to_step(self.end, total_steps, "regrowth.end"), 1)
        if self.delta_t >= self.end_step:  # not one drop and regrow (at end the drop fraction is 0): static sparsity
            raise ScheduleError("regrowth.delta_t", f"{self.delta_t} steps reaches regrowth.end (step {self.end_step}) "
                                                    "before any update that drops weights, so nothing would ever be "
                                                    f"regrown; allowed: a delta_t below {self.end_step}, or a later "
                                                    "regrowth.end")
        return self

    def is_update_step(self, t: int) -> bool:
        return 0 < t <= self.end_step and t % self.delta_t == 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The random stream (SET's regrowth positions), so a resumed run regrows where the uninterrupted one would."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "generator" in state:  # absent in checkpoints written before it was saved
            self.generator.set_state(state["generator"].cpu())  # a CPU generator, whatever map_location said

    def initial_masks(self, weights: list[torch.Tensor], target: float, max_layer_sparsity: float) -> list[torch.Tensor]:
        """Random positions, s_l · n_l pruned per layer (s_l uniform or ERK), rounded so the total is exactly
        round(target · Σ n_l)."""
        shapes = [w.shape for w in weights]
        sparsities = [target] * len(weights) if self.init == "random" else erk_sparsities(shapes, target, max_layer_sparsity)
        sizes = [w.numel() for w in weights]
        caps = [math.floor(max_layer_sparsity * n + 1e-9) for n in sizes]
        masks = []
        for weight, pruned in zip(weights, exact_counts(sparsities, sizes, round(target * sum(sizes)), caps)):
            order = torch.randperm(weight.numel(), generator=self.generator).to(weight.device)
            keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
            keep[order[:pruned]] = False
            masks.append(keep.reshape(weight.shape))
        return masks

    def grow_scores(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, t: int, weights: list[torch.Tensor], grads: list[torch.Tensor], keeps: list[torch.Tensor]):
        """New keep-masks and, per layer, the positions regrown (which start at zero with fresh optimizer state)."""
        fraction = drop_fraction_at(t, self.end_step, self.drop_fraction)
        new_keeps, regrown = [], []
        for weight, grad, keep in zip(weights, grads, keeps):
            flat_keep = keep.reshape(-1)
            active = int(flat_keep.sum())
            n = min(round(fraction * active), flat_keep.numel() - active)
            if n <= 0:
                new_keeps.append(keep.clone())
                regrown.append(torch.zeros_like(keep))
                continue
            magnitude = weight.detach().abs().reshape(-1).masked_fill(~flat_keep, float("inf"))
            dropped = torch.topk(magnitude, n, largest=False).indices
            after_drop = flat_keep.clone()
            after_drop[dropped] = False
            scores = self.grow_scores(weight.detach(), grad).reshape(-1).float().masked_fill(after_drop, float("-inf"))
            grown = torch.topk(scores, n, largest=True).indices
            new_keep = after_drop.clone()
            new_keep[grown] = True
            new_keeps.append(new_keep.reshape(keep.shape))
            regrown.append((new_keep & ~flat_keep).reshape(keep.shape))
        return new_keeps, regrown


@REGROWTHS.register("set")
@dataclass
class SET(DynamicSparse):
    """Sparse evolutionary training (Mocanu et al. 2018): regrow at random positions."""

    def grow_scores(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self.generator).to(weight.device)


@REGROWTHS.register("rigl")
@dataclass
class RigL(DynamicSparse):
    """Rigged lottery (Evci et al. 2020): regrow where the dense gradient is largest."""

    def grow_scores(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()
