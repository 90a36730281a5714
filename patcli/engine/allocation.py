"""Layerwise allocation: a global sparsity budget → how many groups each layer prunes.

Every allocator returns exact per-layer counts whose elements add up to round(target · total), up to the
granularity of the groups, never above a layer's cap (``max_layer_sparsity``; a layer pruned to 100% cuts the
network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .registry import ParamError, Registry
from .threshold import lowest_counts

ALLOCATIONS: Registry["Allocation"] = Registry("allocation")


class AllocationError(ValueError):
    """A budget the caps cannot meet."""


@dataclass
class LayerBudget:
    """What an allocator sees of the prunable layers at one mask update."""

    group_scores: list[torch.Tensor]  # one 1-D tensor per layer; -inf marks groups already pruned
    group_sizes: list[int]  # elements per group, per layer
    shapes: list[torch.Size]  # weight shapes
    target: float  # fraction of all prunable elements to prune
    max_layer_sparsity: float
    total: int | None = None  # prunable elements; by default the groups' elements added up
    # exact pruned elements for given counts where groups overlap (channels); None: sizes add up
    pruned_elements: Callable[[list[int]], int] | None = None
    loss_with_layer_pruned: Callable[[int, float], float] | None = None  # for sensitivity analysis
    cut: torch.Tensor | None = None  # set by a global threshold on the raw group scores: selection can reuse it

    @property
    def num_groups(self) -> list[int]:
        return [s.numel() for s in self.group_scores]

    @property
    def total_elements(self) -> int:
        return self.total if self.total is not None else sum(g * s for g, s in zip(self.num_groups, self.group_sizes))

    @property
    def budget_elements(self) -> int:
        return int(round(self.target * self.total_elements))

    @property
    def additive(self) -> bool:
        return self.pruned_elements is None

    def pruned(self, counts: list[int]) -> int:
        if self.pruned_elements is not None:
            return self.pruned_elements(counts)
        return sum(c * s for c, s in zip(counts, self.group_sizes))

    def caps(self) -> list[int]:
        return [math.floor(self.max_layer_sparsity * g + 1e-9) for g in self.num_groups]

    def floors(self) -> list[int]:
        """Groups already pruned (scores of -inf): masks only grow, so counts never go below these."""
        return torch.stack([torch.count_nonzero(torch.isneginf(s)) for s in self.group_scores]).tolist()


@dataclass
class Allocation:
    """Base allocator; ``needs_loss``: it measures a validation loss (the pruner's ``evaluate``)."""

    needs_loss = False

    def prune_counts(self, budget: LayerBudget) -> list[int]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def check_reachable(budget: LayerBudget) -> None:
    caps = budget.caps()
    reachable = budget.pruned(caps)
    if budget.budget_elements > reachable + rounding_slack(budget, caps, reachable):
        most = budget.pruned([g - 1 for g in budget.num_groups])  # a cap is below 1: each layer keeps a group
        if budget.budget_elements > most:
            raise AllocationError(
                f"sparsity {budget.target} needs {budget.budget_elements} pruned weights but every layer keeps at least "
                f"one of its groups (weights, blocks or channels: {min(budget.num_groups)} in the smallest layer), so "
                f"at most {most} can go whatever the cap; lower the sparsity or prune in smaller groups")
        raise AllocationError(
            f"sparsity {budget.target} needs {budget.budget_elements} pruned weights but the per-layer cap "
            f"max_layer_sparsity={budget.max_layer_sparsity} allows at most {reachable}; raise the cap or lower the sparsity"
        )


def rounding_slack(budget: LayerBudget, caps: list[int], reachable: int) -> int:
    """How far past the caps' total a channel target may lie and still be reached by rounding.

    Channels overlap (a filter also takes the next layer's input channel), so whole-channel totals come in steps,
    and a channel run lands on a total near its target, not on it: a target at most half a step past the caps'
    total is reached as nearly as whole channels allow, at the caps. Elements and blocks are counted exactly: no slack.
    """
    if budget.additive:
        return 0
    steps = [budget.pruned([c + (j == i) for j, c in enumerate(caps)]) - reachable
             for i, (c, g) in enumerate(zip(caps, budget.num_groups)) if c < g]
    return min(steps) // 2 if steps else 0


def counts_from_sparsities(budget: LayerBudget, sparsities: list[float]) -> list[int]:
    """Round per-layer sparsities to group counts; the largest layers then absorb the rounding gap exactly.

    Overlapping groups (channels) cannot absorb a gap group by group: their rounded counts are returned as is.
    """
    caps, floors, sizes = budget.caps(), budget.floors(), budget.group_sizes
    counts = [min(max(round(s * g), f), c) for s, g, f, c in zip(sparsities, budget.num_groups, floors, caps)]
    if not budget.additive:
        return counts
    for i in sorted(range(len(counts)), key=lambda i: -budget.num_groups[i] * sizes[i]):
        gap = budget.budget_elements - sum(c * s for c, s in zip(counts, sizes))
        counts[i] = min(max(counts[i] + round(gap / sizes[i]), floors[i]), caps[i])  # the nearest whole group
    return counts


@ALLOCATIONS.register("uniform")
@dataclass
class Uniform(Allocation):
    """Every layer at the global target."""

    def prune_counts(self, budget: LayerBudget) -> list[int]:
        check_reachable(budget)
        if budget.additive:
            return counts_from_sparsities(budget, [budget.target] * len(budget.group_scores))
        caps, floors = budget.caps(), budget.floors()

        def counts(fraction: float) -> list[int]:
            return [min(max(round(fraction * g), f), c) for g, f, c in zip(budget.num_groups, floors, caps)]

        return closest(budget, counts)


def closest(budget: LayerBudget, counts_at: Callable[[float], list[int]]) -> list[int]:
    """Bisection over a monotone knob x ∈ [0, 1] for the counts whose pruned elements land nearest the budget."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if budget.pruned(counts_at(mid)) < budget.budget_elements else (lo, mid)
    return min((counts_at(lo), counts_at(hi)), key=lambda c: abs(budget.pruned(c) - budget.budget_elements))


@ALLOCATIONS.register("global")
@dataclass
class Global(Allocation):
    """One threshold over every layer's scores; layers that would pass their cap are held there."""

    def prune_counts(self, budget: LayerBudget) -> list[int]:
        check_reachable(budget)
        return threshold_counts(budget, budget.group_scores)


def threshold_counts(budget: LayerBudget, scores: list[torch.Tensor]) -> list[int]:
    """Counts from one threshold over ``scores`` (exact for additive groups, bisection on rank otherwise)."""
    if budget.additive:
        counts, cut = global_counts(scores, budget.group_sizes, budget.budget_elements, budget.caps())
        if scores is budget.group_scores:  # the selection inside each layer can reuse this threshold
            budget.cut = cut
        return counts
    flat = torch.cat(scores)
    layer = torch.cat([torch.full((s.numel(),), i, device=flat.device) for i, s in enumerate(scores)])
    ranked_layers = layer[torch.argsort(flat, stable=True)]
    caps, floors = budget.caps(), budget.floors()

    def counts(fraction: float) -> list[int]:  # never below what is already pruned: masks only grow
        taken = torch.bincount(ranked_layers[: int(round(fraction * flat.numel()))], minlength=len(scores)).tolist()
        return [min(max(t, f), c) for t, f, c in zip(taken, floors, caps)]

    return closest(budget, counts)


def global_counts(
    scores: list[torch.Tensor], sizes: list[int], budget_elements: int, caps: list[int]
) -> tuple[list[int], torch.Tensor | None]:
    """Lowest-scored groups across layers until ``budget_elements`` elements are pruned, respecting caps.

    Also returns the threshold when one value separates pruned from kept in every uncapped layer.
    """
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(len(scores)) if i not in fixed]
        remaining = budget_elements - sum(fixed[i] * sizes[i] for i in fixed)
        found, cut = lowest_counts([scores[i] for i in free], [sizes[i] for i in free], remaining)
        counts = dict(zip(free, found))
        over = [i for i in free if counts[i] > caps[i]]
        if not over:
            counts.update(fixed)
            return [counts[i] for i in range(len(scores))], cut
        for i in over:
            fixed[i] = caps[i]


@ALLOCATIONS.register("lamp")
@dataclass
class LAMP(Allocation):
    """Layer-adaptive magnitude pruning (Lee et al. 2021): a global threshold on score² / Σ of the larger score².

    Each layer's LAMP scores are rank-normalised, so one threshold across layers needs no hand-set scale. Scores
    that can be negative (movement) are shifted to start at zero within their layer first.
    """

    def prune_counts(self, budget: LayerBudget) -> list[int]:
        check_reachable(budget)
        return threshold_counts(budget, [lamp_scores(s) for s in budget.group_scores])


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """score_u² / Σ_{v ≥ u} score_v² over the layer's groups sorted ascending; -inf (already pruned) stays -inf."""
    pruned = torch.isneginf(scores)
    values = scores.double().clone()
    live = values[~pruned]
    if live.numel() and live.min() < 0:
        values[~pruned] = live - live.min()
    values[pruned] = 0.0
    squared = values**2
    order = torch.argsort(squared)
    sorted_sq = squared[order]
    suffix = sorted_sq.flip(0).cumsum(0).flip(0)
    lamp_sorted = torch.where(suffix > 0, sorted_sq / suffix.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    result = torch.empty_like(values)
    result[order] = lamp_sorted
    result[pruned] = float("-inf")
    return result.float()


@ALLOCATIONS.register("erk")
@dataclass
class ERK(Allocation):
    """Erdős–Rényi-kernel densities (Evci et al. 2020): density ∝ Σ dims / Π dims, scaled to meet the budget.

    Small layers (few connections per unit) stay denser. A layer whose density would pass 1 is left dense, one that
    would fall below 1 - max_layer_sparsity is held at the cap, and the scale is solved again for the rest.
    """

    power: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.power < math.inf:
            raise ParamError("power", f"{self.power} is out of range; allowed: finite values >= 0 (0 = uniform)")

    def prune_counts(self, budget: LayerBudget) -> list[int]:
        check_reachable(budget)

        def sparsities(target: float) -> list[float]:
            return erk_sparsities(budget.shapes, target, budget.max_layer_sparsity, self.power)

        if budget.additive:
            return counts_from_sparsities(budget, sparsities(budget.target))
        # a pruned channel also zeroes the next layer's inputs: search the ERK target whose counts meet the budget
        caps, floors = budget.caps(), budget.floors()
        return closest(budget, lambda knob: [min(max(round(s * g), f), c) for s, g, f, c
                                             in zip(sparsities(knob), budget.num_groups, floors, caps)])


def erk_sparsities(shapes: list[torch.Size], target: float, max_layer_sparsity: float, power: float = 1.0) -> list[float]:
    """Per-layer sparsities whose weighted mean is ``target`` with density_l = min(1, ε·raw_l), raw_l = (Σ dims/Π dims)^power.

    raw is taken relative to the largest free layer's, through logarithms: a large power would underflow it to 0.
    """
    sizes = [math.prod(s) for s in shapes]
    log_raw = [power * (math.log(sum(s)) - math.log(math.prod(s))) for s in shapes]
    keep_total = (1.0 - target) * sum(sizes)
    min_density = 1.0 - max_layer_sparsity
    density: dict[int, float] = {}
    while True:
        free = [i for i in range(len(shapes)) if i not in density]
        if not free:  # every layer at its cap or dense: the target is out of reach, the caps hold
            return [1.0 - density[i] for i in range(len(shapes))]
        fixed_keep = sum(density[i] * sizes[i] for i in density)
        largest = max(log_raw[i] for i in free)
        raw = {i: math.exp(log_raw[i] - largest) for i in free}
        eps = (keep_total - fixed_keep) / sum(raw[i] * sizes[i] for i in free)
        dense_now = [i for i in free if eps * raw[i] > 1.0]
        if dense_now:
            for i in dense_now:
                density[i] = 1.0
            continue
        sparse_now = [i for i in free if eps * raw[i] < min_density]
        if sparse_now:
            for i in sparse_now:
                density[i] = min_density
            continue
        for i in free:
            density[i] = eps * raw[i]
        return [1.0 - density[i] for i in range(len(shapes))]


@ALLOCATIONS.register("sensitivity")
@dataclass
class Sensitivity(Allocation):
    """Layerwise adaptive sparsity from measured sensitivity (the article's; cf. Han et al. 2015, §4).

    At a mask update each layer alone is pruned to each trial sparsity and the validation loss increase recorded
    (at every update with ``refresh``, since a barely trained model's sensitivities say little; otherwise once).
    Each layer's curve, linear between trials, is replaced by its lower convex hull; the budget is then filled with
    the hull segments that cost the least loss per pruned weight first, across layers. Insensitive layers go
    further, and a small layer is not pruned hard merely because its loss curve is flat in sparsity: what counts
    is loss per weight removed. The per-layer cap is measured too, so no layer goes past its last measured point
    on a guess. Cost per measurement: one validation pass per layer and trial.
    """

    trials: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    refresh: bool = True
    # held-out batches per measurement, for whoever builds ``evaluate`` (None = all): no part of how the engine prunes
    batches: int | None = field(default=8, metadata={"identity": False})
    needs_loss = True
    curves: list[list[float]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        bad = [t for t in self.trials if not 0 < t < 1]
        if bad:
            raise ParamError("trials", f"{bad[0]} is out of range; allowed: sparsities 0 < value < 1")
        if self.batches is not None and self.batches < 1:
            raise ParamError("batches", f"{self.batches} is out of range; allowed: >= 1 or null (the whole split)")

    def points(self, budget: LayerBudget) -> list[float]:
        """The trial sparsities below the per-layer cap, and the cap itself (none when the cap is 0)."""
        cap = budget.max_layer_sparsity
        return sorted({t for t in self.trials if t < cap} | ({cap} if cap > 0 else set()))

    def measure(self, budget: LayerBudget) -> None:
        if budget.loss_with_layer_pruned is None:
            raise AllocationError("allocation=sensitivity needs a validation loss to measure; none was provided")
        base = budget.loss_with_layer_pruned(0, 0.0)
        self.curves = [
            [max(budget.loss_with_layer_pruned(i, s) - base, 0.0) for s in self.points(budget)]
            for i in range(len(budget.shapes))
        ]

    def prune_counts(self, budget: LayerBudget) -> list[int]:
        check_reachable(budget)
        if budget.budget_elements <= 0:  # nothing to allocate (a schedule's first update): no curves needed yet
            return budget.floors()
        if self.refresh or not self.curves:  # without refresh: measured once, at the first update that prunes
            self.measure(budget)
        elements = [g * size for g, size in zip(budget.num_groups, budget.group_sizes)]
        segments = cheapest_first(self.curves, self.points(budget), elements)

        caps, floors = budget.caps(), budget.floors()

        def counts(knob: float) -> list[int]:  # never below what is already pruned: masks only grow
            sparsities = sparsities_after(segments, len(self.curves), knob * len(segments))
            return [min(max(round(s * g), f), c) for s, g, f, c in zip(sparsities, budget.num_groups, floors, caps)]

        best = closest(budget, counts)
        if not budget.additive:
            return best
        return counts_from_sparsities(budget, [c / g for c, g in zip(best, budget.num_groups)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        # float64, as measured: rounded slopes could rank two layers the other way after a resume
        return {"curves": torch.tensor(self.curves, dtype=torch.float64)} if self.curves else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.curves = state["curves"].tolist() if "curves" in state else []  # none yet: measured at the next update


def lower_hull(xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    """The lower convex hull of points sorted by x (Andrew's monotone chain): slopes only grow along it."""
    hull: list[tuple[float, float]] = []
    for point in zip(xs, ys):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (point[0] - x0) < (point[1] - y0) * (x1 - x0):
                break  # the middle point lies below the chord: keep it
            hull.pop()
        hull.append(point)
    return hull


def cheapest_first(curves: list[list[float]], trials: list[float], elements: list[int]) -> list[tuple[int, float, float]]:
    """Every layer's hull segments (layer, from, to sparsity), ordered by loss increase per pruned element.

    Curves start at (0, 0) and are made monotone first (noise can make a higher sparsity look cheaper). Within a
    layer, hull slopes grow, so each layer's segments keep their order; ties go by layer, then sparsity.
    """
    segments = []
    for layer, (curve, n) in enumerate(zip(curves, elements)):
        ys = [0.0]
        for y in curve:
            ys.append(max(ys[-1], y))
        hull = lower_hull([0.0, *trials], ys)
        for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
            segments.append(((y1 - y0) / ((x1 - x0) * max(n, 1)), layer, x0, x1))
    segments.sort()
    return [(layer, x0, x1) for _, layer, x0, x1 in segments]


def sparsities_after(segments: list[tuple[int, float, float]], layers: int, taken: float) -> list[float]:
    """Per-layer sparsity once the first ``taken`` segments (a fraction of the last one) are pruned."""
    sparsities = [0.0] * layers
    for i, (layer, x0, x1) in enumerate(segments):
        if taken <= i:
            break
        sparsities[layer] = x0 + (x1 - x0) * min(1.0, taken - i)
    return sparsities
