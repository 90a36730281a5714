"""The pruner: ties masks, scorer, schedule, allocation and pattern to an optimizer's steps.

Score → decide → apply: the scorer says how much each weight matters, the layout (from the pattern) folds those
scores into groups, the allocation decides how many groups each layer loses, and the masking enforces the
decision. The pruner hooks into ``optimizer.step()``, so a training loop needs no other call.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import numbers
import re
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .allocation import Allocation, LayerBudget, Uniform, check_reachable
from .combinations import check_combination, name_of
from .layouts import ChannelLayout, Layout, TensorLayout
from .masks import (MASKINGS, DenseShadowMasking, MaskSet, as_bytes, computed_weights, left_dense, mark_pruned_,
                    matches_any, pattern_lists, select_prunable, tensor_bytes, zero_optimizer_state_)
from .patterns import Pattern, Structured, Unstructured
from .regrowth import NoRegrowth, Regrowth
from .regularizers import Regularizer
from .schedules import Schedule, ScheduleError
from .scorers import Magnitude, Scorer
from .structure import channel_groups

log = logging.getLogger(__name__)

# the pruner attached to each weight (by id; the pruner holds the weight, so the id stays its while the entry lives)
ATTACHED: "weakref.WeakValueDictionary[int, Pruner]" = weakref.WeakValueDictionary()
# how many param groups of each optimizer were looked at (each group once, at the optimizer's first step after it
# was added) for pruned weights it trains behind their pruner's back
LOOKED_AT: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()
_every_optimizer_hook = None


def name_foreign_steps(optimizer: torch.optim.Optimizer, *_) -> None:
    """Warn when an optimizer the pruner is not attached to steps pruned weights (a new optimizer for a second
    phase, never attached; one built over model.parameters() by mistake): nothing zeroes them after its step, so
    they grow back. One look per param group, then one lookup per step."""
    seen, groups = LOOKED_AT.get(optimizer, 0), optimizer.param_groups
    if seen == len(groups):
        return
    LOOKED_AT[optimizer] = len(groups)
    stepped: dict[int, tuple[Pruner, set[int]]] = {}
    for group in groups[seen:]:
        for param in group["params"]:
            pruner = ATTACHED.get(id(param))
            if pruner is not None and pruner.optimizer is not optimizer:
                stepped.setdefault(id(pruner), (pruner, set()))[1].add(id(param))
    for pruner, ids in stepped.values():
        names = [name for name, w in zip(pruner.masks.names, pruner.masks.weights) if id(w) in ids]
        log.warning("an optimizer that is not the one the pruner is attached to stepped %s: their pruned weights can "
                    "grow back; allowed: pruner.attach(optimizer) to the optimizer that trains them", ", ".join(names))


@dataclass
class MaskUpdate:
    """What one mask update did, for the run's metrics."""

    step: int
    target: float
    sparsity: float
    revived: int = 0


def unscaled(grads: list[torch.Tensor | None], grad_scale: torch.Tensor | None,
             found_inf: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Gradients divided by a GradScaler's scale, and zero on a step it skips for overflow (inf · 0 would be NaN);
    a missing one stays missing."""
    if grad_scale is not None:
        grads = [None if g is None else g / grad_scale.to(g.dtype) for g in grads]
    if found_inf is not None:
        skipped = found_inf.to(torch.bool)
        grads = [None if g is None else torch.where(skipped, torch.zeros((), dtype=g.dtype, device=g.device), g)
                 for g in grads]
    return grads


COMPILED_PREFIX = re.compile(r"^(mask\.|masking\.shadow\.)?_orig_mod\.")


def unwrapped_names(names):
    """Patterns (or state keys) written for a torch.compile'd model, as the module it compiles names them."""
    if not isinstance(names, (list, tuple)):
        return names  # a mistake the argument checks name
    return [COMPILED_PREFIX.sub(r"\1", n) if isinstance(n, str) else n for n in names]


def make_layout(model: nn.Module, pattern: Pattern, include, exclude) -> Layout:
    """Tensor layout for element/N:M/block patterns, channel layout for neurons/filters/heads."""
    include, exclude = pattern_lists(model, include, exclude)
    if computed := [n for n in computed_weights(model) if matches_any(n, include) and not matches_any(n, exclude)]:
        log.warning("%s left dense: computed by a parametrization (weight_norm, spectral_norm, torch.nn.utils.prune) "
                    "at each forward, not a parameter the pruner can mask; remove the parametrization to prune it",
                    ", ".join(computed))
    unmatched, frozen = left_dense(model, include, exclude)
    for unused in unmatched:
        log.warning("include pattern %r matches no prunable weight (only the weights of Linear and Conv layers that "
                    "train, and are not tied to an embedding, are pruned)", unused)
    if frozen:
        log.warning("%s left dense: frozen (requires_grad=False) when the Pruner was built; the target is spread over "
                    "the other weights (exclude %s to say so)", ", ".join(frozen), "it" if len(frozen) == 1 else "them")
    if isinstance(pattern, Structured):
        params = dict(model.named_parameters())
        return ChannelLayout(params, channel_groups(model, pattern.kind, include, exclude, warn=True), pattern.reduce)
    return TensorLayout(select_prunable(model, include, exclude), pattern)


PARTS = {"schedule": (Schedule, "SCHEDULES"), "scorer": (Scorer, "SCORERS"), "allocation": (Allocation, "ALLOCATIONS"),
         "pattern": (Pattern, "PATTERNS"), "regrowth": (Regrowth, "REGROWTHS"), "regularizer": (Regularizer, "REGULARIZERS")}


def check_arguments(*, sparsity, total_steps, frequency, max_layer_sparsity, **parts) -> None:
    """What the CLI's config checks, for a Pruner built in Python: one ValueError (TypeError) naming the argument."""
    for name, value, high in (("sparsity", sparsity, 1.0), ("max_layer_sparsity", max_layer_sparsity, 1.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number within 0 <= value < {high:g}, got {value!r}")
        if not 0.0 <= value < high:
            raise ValueError(f"{name} must be a number within 0 <= value < {high:g}, got {value!r}")
    for name, value in (("total_steps", total_steps), ("frequency", frequency)):
        # a float (epochs * batches / accumulation) would put the schedule's end between two steps: never reached
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer >= 1 (optimizer steps), got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (optimizer steps), got {value!r}")
    if parts.get("schedule") is None:
        raise TypeError("schedule must be a Schedule object, e.g. SCHEDULES.get(name)(), got None")
    for name, value in parts.items():
        kind, registry = PARTS[name]
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__} object, e.g. {registry}.get(name)(), got {value!r}; "
                            "prune_during_training also takes names")


def own_copy(part):
    """A part of the same settings for this pruner alone: it binds its parts to its own run (steps, accumulators,
    model hooks, random streams), so one object given to two pruners must not carry one's binding into the other.

    A registered part is made anew from its settings (a fresh random stream too); a part of one's own is copied
    shallowly, as its constructor and what it refers to (a model, say) are its author's.
    """
    if part is None:
        return None
    if dataclasses.is_dataclass(part) and "name" in type(part).__dict__:  # registered: the registry named the class
        return dataclasses.replace(part)
    return copy.copy(part)


class Pruner:
    """Pruning-aware training for any model and optimizer.

    ``evaluate`` (a function returning a validation loss) is only needed by sensitivity-based allocation.
    ``monotone`` masks only grow (pruned weights never return); reversal and regrowth modes turn it off.
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
        frequency: int = 50,
        masking: str = "inplace",
        include: tuple[str, ...] | list[str] = ("*",),
        exclude: tuple[str, ...] | list[str] = (),
        max_layer_sparsity: float = 0.99,
        monotone: bool = True,
        regrowth: Regrowth | None = None,
        regularizer: Regularizer | None = None,
        evaluate: Callable[[], float] | None = None,
        on_update: Callable[[MaskUpdate], None] | None = None,
    ) -> None:
        check_arguments(sparsity=sparsity, total_steps=total_steps, frequency=frequency, max_layer_sparsity=max_layer_sparsity,
                        schedule=schedule, scorer=scorer, allocation=allocation, pattern=pattern, regrowth=regrowth,
                        regularizer=regularizer)
        # numpy's numbers are taken as Python's (a step count from numpy integers, a sparsity from np.linspace)
        sparsity, max_layer_sparsity, total_steps, frequency = float(sparsity), float(max_layer_sparsity), int(total_steps), int(frequency)
        schedule, scorer, allocation, regrowth, regularizer = map(own_copy, (schedule, scorer, allocation, regrowth, regularizer))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper: the module it compiles
            model = model._orig_mod  # has the weights, their names without the wrapper's prefix, and the structure
            include, exclude = unwrapped_names(include), unwrapped_names(exclude)
        if lazy := next((name for name, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)), None):
            raise ValueError(f"{lazy} is not initialized yet (a lazy module): run one forward pass before building the pruner")
        self.model = model
        self.pattern = pattern or Unstructured()
        if self.pattern.fixed_sparsity is not None and abs(sparsity - self.pattern.fixed_sparsity) > 1e-9:
            raise ValueError(f"pattern {self.pattern.name!r} fixes sparsity at {self.pattern.fixed_sparsity}, got {sparsity}")
        self.sparsity_target = sparsity
        self.schedule = schedule.bind(total_steps, sparsity, frequency)
        self.scorer = scorer or Magnitude()
        # a pattern that fixes the sparsity (N:M) prunes every layer alike
        self.allocation = Uniform() if self.pattern.fixed_sparsity is not None else (allocation or Uniform())
        if self.allocation.needs_loss and evaluate is None:
            raise ValueError(f"allocation={self.allocation.name} measures each layer's loss: pass evaluate=, "
                             "a function returning a validation loss")
        self.max_layer_sparsity = max_layer_sparsity
        self.regrowth = regrowth or NoRegrowth()
        self.regularizer = regularizer
        check_combination(schedule, name_of(self.pattern), masking, self.regrowth, regularizer, scorer, allocation)
        masking = self.regrowth.masking or masking
        self.monotone = monotone and getattr(self.schedule, "monotone", True) and self.regrowth.monotone
        self.evaluate = evaluate
        self.on_update = on_update
        self.seconds = 0.0  # wall time spent in the pruner's hooks, for the per-step overhead
        self.layout = make_layout(model, self.pattern, include, exclude)
        if getattr(self.scorer, "grouped", False):
            if self.scorer.heads_only and name_of(self.pattern) != "heads":
                raise ValueError(f"scorer {self.scorer.name!r} scores attention heads; allowed with pruning=heads")
            if not isinstance(self.layout, ChannelLayout):
                raise ValueError(f"scorer {self.scorer.name!r} scores whole channels; allowed with pruning=neurons, filters or heads")
            self.scorer.attach(model, self.layout)
        try:
            self._build(masking, total_steps, sparsity, max_layer_sparsity)
        except BaseException:
            if getattr(self.scorer, "grouped", False):  # a refused build leaves no hooks running at every forward
                self.scorer.detach()
            raise

    def _build(self, masking: str, total_steps: int, sparsity: float, max_layer_sparsity: float) -> None:
        """The rest of the build, once a channel scorer watches the model."""
        self.masks = MaskSet(dict(zip(self.layout.names, self.layout.params)), self.layout.accounted)
        if masking not in MASKINGS:
            raise ValueError(f"unknown masking {masking!r}; allowed: {', '.join(MASKINGS)}")
        self.masking = MASKINGS[masking](self.masks)
        self.step = 0
        self._scratch: list[torch.Tensor] | None = None
        self._scorer_takes_buffers = (  # a scorer of one's own may not take out=
            "out" in inspect.signature(self.scorer.scores).parameters
            and not self.scorer.needs_grad
            and self.masks.weights[0].device.type == "cpu"
            and not getattr(self.scorer, "grouped", False)  # channel scorers rank their own sums
            and not self.regrowth.replaces_schedule and self.regularizer is None  # their updates do not score with it
        )
        self.updates: list[MaskUpdate] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._group_index: dict[int, int] = {}
        self._handles: list = []
        self._detached = False  # set by detach(): attach() then takes the weights as they are
        self.check_reachable()  # the final target under the caps: said now, not at an update late in training
        if not self.regrowth.monotone and not self.regrowth.replaces_schedule:
            self.check_revivable()
        if self.regrowth.replaces_schedule:
            self.regrowth.bind(total_steps)
            self._adopt([k.reshape(-1) for k in self.regrowth.initial_masks(self.masks.weights, sparsity, max_layer_sparsity)])
        if self.regularizer is not None:
            self.regularizer.check(self.layout)
            self.regularizer.bind(total_steps)

    def check_revivable(self) -> None:
        """Reversal revives weights at the updates after the first that prunes: a schedule with fewer than two such
        updates ran as plain pruning, under a reversal recipe's name."""
        schedule = self.schedule
        if schedule.update_count() > 1000:  # a ramp of that many updates prunes at more than one of them
            return
        pruning = sum(schedule.target(t) > 0 for t in schedule.update_steps())
        if pruning < 2:
            name = getattr(schedule, "name", type(schedule).__name__)  # a schedule of one's own may have none
            raise ScheduleError("regrowth", f"{getattr(self.regrowth, 'name', 'reversal')} re-chooses the masks at each "
                                f"mask update after the first that prunes, and this run's schedule={name} prunes at "
                                f"{pruning} (steps {schedule.begin_step}–{schedule.end_step}, frequency="
                                f"{schedule.frequency}), so no pruned weight could return; allowed: more updates that "
                                "prune (a later schedule end, a lower frequency or a longer run), or regrowth=none")

    def check_model(self) -> None:
        """The weights are still the model's, in the dtype and on the device the masks were made for: checked at
        attach() and at each mask update, never per step."""
        for name, weight in zip(self.masks.names, self.masks.weights):
            try:
                current = self.model.get_parameter(name)
            except AttributeError:
                current = None
            if current is not weight:
                raise ValueError(f"{name} is no longer the model's parameter (load_state_dict(assign=True), or a move "
                                 "that made new ones); allowed: build the Pruner (and the optimizer) for the model as it is now")
        self.masks.check_weights()

    # -- wiring ---------------------------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "Pruner":
        """Run the pruner around every ``optimizer.step()`` (of this optimizer only)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach() takes a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):  # its forward passes inside step(closure) would see unmasked weights
            raise ValueError("LBFGS evaluates the model several times inside one step(closure), before the pruner can mask "
                             "the weights; allowed: optimizers that update once per step() (SGD, Adam, AdamW, ...)")
        self.check_model()
        group_index = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        untrained = [name for name, weight, counted in zip(self.masks.names, self.masks.weights, self.masks.accounted)
                     if counted and id(weight) not in group_index]  # a frozen norm or bias only goes with its channel
        if untrained:  # pruned but never trained: gradient scores would be 0 there and nothing would recover
            raise ValueError(f"{untrained[0]} is prunable but not in the optimizer; allowed: give it to the optimizer, "
                             f"or leave it dense with exclude=[{untrained[0]!r}]")
        for handle in self._handles:
            handle.remove()
        if getattr(self.scorer, "grouped", False):  # detach() took its model hooks away
            self.scorer.watch_model(self.model)
        if self._detached:  # the weights may have trained unmasked since: take them as they are, masked again
            self.masking.adopt_weights()
            self.masking.masks_changed()
            self._detached = False
        for other in {id(p): p for w in self.masks.weights if (p := ATTACHED.get(id(w))) not in (None, self)}.values():
            # a second pruner on the same weights (a notebook cell run twice) would mask them by two schedules
            log.warning("%s is already pruned by another attached Pruner: that one is detached, this one takes over",
                        next(n for n, w in zip(self.masks.names, self.masks.weights) if ATTACHED.get(id(w)) is other))
            other.detach()
        self.optimizer = optimizer
        ATTACHED.update({id(w): self for w in self.masks.weights})
        global _every_optimizer_hook
        if _every_optimizer_hook is None:
            _every_optimizer_hook = register_optimizer_step_post_hook(name_foreign_steps)
        # each weight's param group by position: optimizer.load_state_dict replaces the group dicts, not their order
        self._group_index = group_index
        self._handles = [optimizer.register_step_post_hook(lambda *_: self.after_step())]
        if self.scorer.needs_grad or self.masking.acts_before_step:  # the common case needs only the post-step hook
            # a GradScaler leaves a fused optimizer's gradients scaled, with the scale and the overflow flag set on
            # the optimizer for the step
            self._handles.append(optimizer.register_step_pre_hook(
                lambda opt, *_: self.before_step(getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None))))
        return self

    def detach(self) -> None:
        """Stop hooking the optimizer (and the model, for scorers that watch it)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._detached = True
        for weight in self.masks.weights:
            if ATTACHED.get(id(weight)) is self:
                del ATTACHED[id(weight)]
        if getattr(self.scorer, "grouped", False):
            self.scorer.detach()

    # -- the step -------------------------------------------------------------------------------------------------

    def observe(self, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        """Feed the current gradients to the scorer (also used alone, for calibration without training).

        ``grad_scale``/``found_inf``: a GradScaler's, when it leaves the gradients scaled for a fused optimizer; an
        overflowing step then adds nothing, decided on the device (no host sync).
        """
        if self.scorer.needs_grad:
            missing = None if self.scorer.takes_missing_grads else torch.zeros_like  # a frozen layer, an unused one
            grads = [w.grad if w.grad is not None or missing is None else missing(w) for w in self.masks.weights]
            if grad_scale is not None or found_inf is not None:
                grads = unscaled(grads, grad_scale, found_inf)
            # the dense values (the shadow under reversal): a pruned weight scored at 0 could never return
            self.scorer.observe([w.detach() for w in self.masking.dense_weights()], grads)

    def before_step(self, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        started = time.perf_counter()
        self.observe(grad_scale, found_inf)
        self.masking.before_step()
        self.seconds += time.perf_counter() - started

    def after_step(self) -> None:
        started = time.perf_counter()
        t = self.step
        enforced = self.schedule.masks_enforced(t)
        # A compressed phase starts with masks chosen afresh from the weights as trained: zeroing them with the old
        # masks first would throw away what the pruned ones learned while decompressed.
        entering = enforced and not self.masking.enforced
        self.masking.enforced = enforced
        try:
            self.masking.after_step(zero=not entering)
        except RuntimeError:  # a model moved to another device since: torch's message would not say which, or why
            self.masks.check_weights()
            raise
        if self.regularizer is not None and self.optimizer is not None and t <= self.schedule.end_step:
            groups, index = self.optimizer.param_groups, self._group_index
            # a GradScaler's fused step skipped for overflow takes no proximal step either (decided on the device)
            found_inf = getattr(self.optimizer, "found_inf", None)
            taken = None if found_inf is None else 1.0 - found_inf  # 0 on a skipped step, once per step

            def step_size(weight: torch.Tensor) -> float | torch.Tensor:
                rate = groups[index[id(weight)]]["lr"] if id(weight) in index else 0.0  # a frozen norm takes no step
                return rate if taken is None else taken * rate

            self.regularizer.apply(self.layout, step_size, t)
        if not self._scheduled_update(t) and entering:
            self.masking.masks_changed()
        self.step += 1
        self.seconds += time.perf_counter() - started

    def finish(self) -> MaskUpdate | None:
        """Make the schedule's last mask update now, if the run stopped before its end step.

        A step a GradScaler skips never calls ``optimizer.step()`` (with a non-fused optimizer), so the pruner may see
        fewer steps than the loop ran and miss the update that reaches the final target; call this after training.
        """
        end = self.schedule.end_step
        if self.regrowth.replaces_schedule or self.step > end:
            return None
        self.masking.enforced = True
        updated = self._scheduled_update(end)
        self.step = end + 1
        return self.updates[-1] if updated else None

    def _scheduled_update(self, t: int) -> bool:
        """The mask update due at step t, if any (each one enforces the masks it makes)."""
        due = self.regrowth.is_update_step(t) if self.regrowth.replaces_schedule else self.schedule.is_update_step(t)
        if not due:
            return False
        if self.regrowth.replaces_schedule:
            self.regrow(t)
        elif self.regularizer is None:
            self.update_masks(t)
        elif t == self.schedule.end_step and self.regularizer.target is not None:
            # closing: exactly the target by magnitude, over all weights (the penalty may have zeroed too many)
            self.update_masks(t, self.regularizer.target, monotone=False, scorer=Magnitude())
        else:
            self.mask_zeros(t)
        return True

    # -- decisions ------------------------------------------------------------------------------------------------

    def update_masks(self, t: int, target: float | None = None, monotone: bool | None = None,
                     scorer: Scorer | None = None) -> MaskUpdate:
        """Re-choose masks for the schedule's target at step t (or an explicit ``target``, or ``scorer``)."""
        self.check_model()  # at each update, not each step: soon after a model is cast, at no per-step cost
        target = self.schedule.target(t) if target is None else target
        trained_unmasked = self._trained_unmasked()
        if monotone is None:
            # an alternating schedule chooses masks afresh only where a compressed phase starts: an update inside
            # one (the final phase right after a compressed phase) only adds to them, as AC/DC keeps a phase's masks
            monotone = self.monotone or (self.schedule.lifts_masks and not trained_unmasked)
        old_keep = [k.clone() for k in self.masks.keep] if not monotone else None
        group_scores = self.group_scores(monotone, scorer)
        budget = self._budget(group_scores, target, monotone)
        counts = self.allocation.prune_counts(budget)
        if (scorer is None and getattr(self.scorer, "grouped", False) and not self.scorer.has_scores()
                and any(c > f for c, f in zip(counts, budget.floors()))):  # ties at 0 would go in index order
            raise RuntimeError(f"scorer {self.scorer.name!r} has no scores for the mask update at step {t}: every batch "
                               "it saw was dropped (its gradient overflowed under a GradScaler); allowed: begin pruning "
                               "once the scaler has settled (a later schedule begin)")
        cuts = [budget.cut] * len(counts)
        if not monotone and trained_unmasked:
            group_scores, cuts = self._zero_groups_first(group_scores, cuts)
        # the new flags go straight into the layout's (the old ones are not read again before _adopt)
        self._adopt([self.layout.select(i, s, c, cut, out=self.layout.group_keep[i])
                     for i, (s, c, cut) in enumerate(zip(group_scores, counts, cuts))])
        if getattr(self.schedule, "resets_optimizer_state", False) and self.optimizer is not None:
            zero_optimizer_state_(self.optimizer, self.masks.weights, [~k for k in self.masks.keep])
        self.scorer.reset()
        revived = 0
        if old_keep is not None:
            revived = int(sum(torch.count_nonzero(~old & new) for old, new, a in zip(old_keep, self.masks.keep, self.masks.accounted) if a))
        return self._record(t, target, revived)

    def _trained_unmasked(self) -> bool:
        """Whether the weights this update chooses among trained without masks: a dense copy (``dense_shadow``), or
        the step before it ran with the masks lifted (a decompressed phase, the warm-up). Read from the schedule, not
        kept as state, so a resumed run decides the same."""
        return isinstance(self.masking, DenseShadowMasking) or not self.schedule.masks_enforced(self.step - 1)

    def _zero_groups_first(self, group_scores: list[torch.Tensor], cuts: list) -> tuple[list[torch.Tensor], list]:
        """Masks chosen afresh prune the groups that are already all zero first, within each layer's count.

        Pruning them changes nothing the model computes, and a dead one (a ReLU unit whose weights in and out are
        zero gets no gradient, so a decompressed phase cannot revive it) would otherwise stay zero unmasked while a
        live group is pruned in its place, and the model would end sparser than its target. Only which groups go
        changes, not how many, so every allocation's per-layer counts hold. Only for weights that trained unmasked:
        under in-place masking a pruned weight is zero because it is masked, and must stay free to return.
        """
        weights = [w.detach() for w in self.masking.dense_weights()]
        if self.layout.elementwise:  # one group per element
            zeros = [(w == 0).reshape(-1) for w in weights]
        else:
            zeros = [m == 0 for m in self.layout.group_scores([w.abs() for w in weights], reduce="l1")]
        ranked, cuts = [], list(cuts)
        for layer, (scores, zero) in enumerate(zip(group_scores, zeros)):
            if bool(zero.any()):
                ranked.append(scores.masked_fill(zero, float("-inf")))
                cuts[layer] = None  # a global threshold no longer splits this layer's scores
            else:
                ranked.append(scores)
        return ranked, cuts

    def mask_zeros(self, t: int) -> MaskUpdate:
        """Mask what a regularizer drove to zero (whole groups for channel layouts), so it stays zero."""
        self.check_model()
        magnitudes = [w.detach().abs() for w in self.masks.weights]
        grouped = self.layout.group_scores(magnitudes, reduce="l1")
        self._adopt([(g > 0) & k for g, k in zip(grouped, self.layout.group_keep)])
        return self._record(t, self.masks.sparsity(), 0)

    def regrow(self, t: int) -> MaskUpdate | None:
        """Dynamic sparse training: drop the smallest active weights, regrow as many (SET / RigL).

        Under a GradScaler a fused optimizer's step has already unscaled the gradients in place by now (this runs
        after the step), and a step it skipped for overflow regrows nothing (one host sync per regrowth update, never
        per step).
        """
        self.check_model()
        found_inf = getattr(self.optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            log.info("regrowth at step %d skipped: the GradScaler skipped this step for overflow", t)
            return None
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self.masks.weights]
        keeps, regrown = self.regrowth.update(t, self.masks.weights, grads, self.masks.keep)
        self._adopt([k.reshape(-1) for k in keeps])
        if self.optimizer is not None:
            zero_optimizer_state_(self.optimizer, self.masks.weights, regrown)
        return self._record(t, self.sparsity_target, int(sum(torch.count_nonzero(r) for r in regrown)))

    def _adopt(self, decision: list[torch.Tensor]) -> None:
        """Make a keep-decision per group the masks, and enforce them."""
        for i, keep in enumerate(self.layout.set_group_keep(decision)):
            self.masks.set(i, keep)
        self.masking.masks_changed()

    def _record(self, t: int, target: float, revived: int) -> MaskUpdate:
        # what the model holds: a penalty's zeros count where the masks do not hold them (yet, or after the close)
        update = MaskUpdate(step=t, target=target, sparsity=self.current_sparsity(), revived=revived)
        self.updates.append(update)
        log.debug("mask update at step %d: target %.4f, sparsity %.4f, revived %d", t, target, update.sparsity, revived)
        if self.on_update:
            self.on_update(update)
        return update

    def group_scores(self, monotone: bool | None = None, scorer: Scorer | None = None) -> list[torch.Tensor]:
        """Scores per group and layer (by ``scorer`` if given, else the pruner's); with monotone masks, groups
        already pruned score -inf (chosen first)."""
        if scorer is None and getattr(self.scorer, "grouped", False):
            grouped = self.scorer.group_scores()
        else:
            scorer = scorer or self.scorer
            buffers = self._score_buffers() if scorer is self.scorer else None
            weights = self.masking.dense_weights()
            scores = scorer.scores(weights) if buffers is None else scorer.scores(weights, out=buffers)
            # signed scores (movement) are summed per channel: an l2 norm would rank a channel moving hard toward
            # zero as high as one moving away
            grouped = self.layout.group_scores([s.float() for s in scores], reduce="sum" if scorer.signed else None)
        self._check_not_nan(grouped)
        if self.monotone if monotone is None else monotone:
            if self.layout.elementwise:  # one group per element: the float masks already held mark the scores
                grouped = [mark_pruned_(g, m.reshape(-1)) if pruned else g
                           for g, m, pruned in zip(grouped, self.masks.multipliers, self.masks.pruned_counts)]
            else:
                grouped = [mark_pruned_(g, as_bytes(k).to(g.dtype)) for g, k in zip(grouped, self.layout.group_keep)]
        return grouped

    def _check_not_nan(self, group_scores: list[torch.Tensor]) -> None:
        """Stop on NaN scores: the exact count cannot hold and the masks would mean nothing (training diverged).

        One sum per layer and one host sync per update, never per step; a NaN sum is checked element by element, as
        +inf and -inf scores also sum to NaN.
        """
        sums = torch.stack([g.sum() for g in group_scores])
        if not bool(torch.isnan(sums).any()):
            return
        for name, g in zip(self.layout.layer_names, group_scores):
            if bool(torch.isnan(g).any()):
                raise FloatingPointError(f"pruning scores of {name} are NaN at step {self.step}: its weights or "
                                         "gradients are not finite (training diverged; lower the learning rate or clip gradients)")

    def _score_buffers(self) -> list[torch.Tensor] | None:
        """Score tensors reused across updates, on CPU, for scorers without an accumulator of their own.

        A fresh multi-MB tensor on CPU pays page faults every update (~20 ms per 40 MB here); CUDA's caching
        allocator already reuses memory, and accumulating scorers return tensors of their own.
        """
        if not self._scorer_takes_buffers:
            return None
        if self._scratch is None:
            self._scratch = [torch.empty_like(w) for w in self.masks.weights]
        return self._scratch

    def check_reachable(self) -> None:
        """Raise AllocationError when the final target needs more than the per-layer caps allow (a regularizer's:
        its closing target; without one it masks what its penalty zeroes, and targets nothing)."""
        target = self.sparsity_target if self.regularizer is None else self.regularizer.target
        if target is None:
            return
        # only the group counts matter: stand-in scores that hold no memory (a model's worth of zeros would)
        stand_in = torch.zeros(())
        check_reachable(self._budget([stand_in.expand(k.numel()) for k in self.layout.group_keep], target))

    def _budget(self, group_scores: list[torch.Tensor], target: float, monotone: bool = True) -> LayerBudget:
        return LayerBudget(
            group_scores=group_scores,
            group_sizes=self.layout.group_sizes(),
            shapes=self.layout.shapes(),
            target=target,
            max_layer_sparsity=self.max_layer_sparsity,
            total=self.masks.accounted_numel(),
            pruned_elements=self.layout.pruned_elements if isinstance(self.layout, ChannelLayout) else None,
            loss_with_layer_pruned=(lambda i, s: self._loss_with_layer_pruned(i, s, group_scores, monotone))
            if self.evaluate else None,
        )

    def _loss_with_layer_pruned(self, layer: int, sparsity: float, group_scores: list[torch.Tensor],
                                monotone: bool) -> float:
        """Validation loss with one layer alone pruned to ``sparsity`` of its groups (sensitivity analysis).

        The trial starts from the weights this update chooses among: for a monotone update the current sparse model
        (what is pruned stays pruned), otherwise every weight, dense (an alternating compressed phase, reversal).
        """
        current = [k if monotone else torch.ones_like(k) for k in self.layout.group_keep]
        groups = group_scores[layer].numel()  # the cap point measured as the allocation rounds it: never the whole layer
        count = min(round(sparsity * groups), math.floor(self.max_layer_sparsity * groups + 1e-9))
        decision = list(current)
        decision[layer] = self.layout.select(layer, group_scores[layer], count) & current[layer]
        saved = [w.detach().clone() for w in self.masks.weights]
        with torch.no_grad():
            for weight, dense, keep in zip(self.masks.weights, self.masking.dense_weights(), self.layout.element_masks(decision)):
                torch.mul(dense, keep, out=weight)
        try:
            return self._validation_loss()
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.masks.weights, saved)

    def _validation_loss(self) -> float:
        """``evaluate()`` with the model in eval mode, then each module's mode restored: a trial must not move
        BatchNorm statistics, draw dropout, or feed the scorers' training hooks. A loss that is not one finite
        number is refused: the allocation would rank layers by NaN."""
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            value = self.evaluate()
        finally:
            for module, training in modes:
                module.training = training
        try:
            loss = float(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"evaluate must return one number, the validation loss; it returned {type(value).__name__}"
                            f" ({error})") from error
        if not math.isfinite(loss):
            raise FloatingPointError(f"evaluate returned {loss} at step {self.step}: allocation=sensitivity needs a "
                                     "finite validation loss (training diverged, or the loss is not computed right)")
        return loss

    # -- reporting and state --------------------------------------------------------------------------------------

    def current_sparsity(self) -> float:
        """The sparsity the model holds now, for progress and metrics: the masks' while they are enforced (no host
        sync), counted from the weights while an alternating schedule has lifted them, or while a regularizer zeroes
        weights the masks do not hold (its closing mask comes only at the end)."""
        return self.masks.sparsity() if self.masking.enforced and self.regularizer is None else self.sparsity()

    def sparsity(self) -> float:
        """Achieved fraction of accounted (prunable) weights that are exactly zero in the model."""
        zeros = sum(int(torch.count_nonzero(w == 0)) for w, a in zip(self.masks.weights, self.masks.accounted) if a)
        return zeros / self.masks.accounted_numel()

    def smaller_model(self) -> nn.Module:
        """A copy of the model with the channels it no longer uses cut out (pruned neurons, filters or heads, and any
        other all-zero ones): fewer parameters, the same outputs. The model and the pruner go on as they were."""
        if not isinstance(self.layout, ChannelLayout):
            raise ValueError(f"pattern {name_of(self.pattern)!r} keeps every weight's shape; allowed: pattern='neurons', "
                             "'filters' or 'heads' (a compressed file of sparse weights: patcli export)")
        from .surgery import live_channels, shrink

        groups = self.layout.groups
        return shrink(self.model, groups, live_channels(self.model, groups))

    def engine_state_bytes(self) -> int:
        """Memory the engine holds besides the model: masks, the layout's group flags, shadow weights, score
        accumulators or buffers."""
        # the score buffers are made at the first update and held from then on: counted from the start, so the
        # same state reports the same (a resumed pruner has not made them yet)
        buffers = tensor_bytes(self.masks.weights) if self._scorer_takes_buffers else 0
        return (self.masks.state_bytes() + self.masking.state_bytes() + self.scorer.state_bytes()
                + tensor_bytes(self.layout.group_keep) + buffers)

    def _pattern_id(self) -> str:
        """The pattern's kind and geometry (not its channel score reduction, which leaves masks valid)."""
        fields = ", ".join(f"{k}={v}" for k, v in vars(self.pattern).items() if k != "reduce")
        return f"{type(self.pattern).__name__}({fields})"

    def _schedule_id(self) -> str:
        """The schedule as bound to this run: its kind, target, update interval and steps."""
        s = self.schedule
        return (f"{type(s).__name__}(final_sparsity={s.final_sparsity}, frequency={s.frequency}, begin_step={s.begin_step}, "
                f"end_step={s.end_step})")

    @staticmethod
    def _settings_id(part) -> str:
        """A part's kind and every setting (a schedule's power or phases, a regrowth's interval, a penalty's weight):
        each decides when and how the masks change."""
        if part is None:
            return "None"
        if not dataclasses.is_dataclass(part):  # a part of one's own, not built on patcli's: its kind alone
            return type(part).__name__
        # a seed only starts a random stream, which the state carries on; fields hidden from repr are run state (a
        # scorer's sums), not settings, and one marked identity=False is read by the user's code, not the engine's
        settings = [f"{f.name}={list(v) if isinstance(v := getattr(part, f.name), tuple) else v}"
                    for f in dataclasses.fields(part) if f.name != "seed" and f.repr and f.metadata.get("identity", True)]
        # an object's address (a function given as a setting of one's own part) differs from process to process
        return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(part).__name__}({', '.join(settings)})")

    @staticmethod
    def _same_settings(saved: str, mine: str) -> bool:
        """1 and 1.0 are one setting (a state saved with either loads into a pruner built with the other)."""
        def plain(text: str) -> str:
            return re.sub(r"(?<![\w.])(\d+)\.0(?![\d\w])", r"\1", text)

        return plain(saved) == plain(mine)

    def _identity(self) -> dict[str, str]:
        """What a saved state must have been built with: another pattern's masks would not hold this one's structure
        (2:4, blocks); under another schedule, regrowth or regularizer (run length, target, interval, settings) the
        saved step and masks would miss this run's updates or undo them; another scorer would read the saved sums as
        its own statistic (gradient, hessian and movement keep theirs under the same keys), and another allocation or
        cap would spread the later updates differently."""
        return {"pattern": self._pattern_id(), "schedule": self._schedule_id(),
                "schedule_settings": self._settings_id(self.schedule), "regrowth": self._settings_id(self.regrowth),
                "regularizer": self._settings_id(self.regularizer), "scorer": self._settings_id(self.scorer),
                "allocation": self._settings_id(self.allocation), "max_layer_sparsity": str(self.max_layer_sparsity)}

    def _load_parts(self, state: dict[str, torch.Tensor]) -> None:
        """The pruner's own state, every part's, from ``state`` (the model's weights are left as they are)."""

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        self.step = int(state["step"])
        if "updates" in state:  # the history of mask updates (a pruner state saved before it was kept has none)
            self.updates = [MaskUpdate(int(t), float(target), float(sparsity), int(revived))
                            for t, target, sparsity, revived in state["updates"].tolist()]
        # into the pruner's own tensors, or onto its device: a state loaded with map_location="cpu" may resume a
        # CUDA run
        self.masks.load_state_dict(part("mask."))
        for i, keep in enumerate(self.layout.group_keep):
            keep.copy_(state[f"groups.{i}"])
        self.masking.load_state_dict(part("masking."))
        device = self.masks.weights[0].device
        # floating-point sums only: an integer or byte tensor may be a count or a CPU generator's state
        self.scorer.load_state_dict({k: v.to(device) if v.is_floating_point() else v for k, v in part("scorer.").items()})
        self.allocation.load_state_dict(part("allocation."))
        self.regrowth.load_state_dict(part("regrowth."))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {key: torch.tensor(list(mine.encode()), dtype=torch.uint8) for key, mine in self._identity().items()}
        history = [[u.step, u.target, u.sparsity, u.revived] for u in self.updates]
        state |= {"step": torch.tensor(self.step), "updates": torch.tensor(history, dtype=torch.float64).reshape(-1, 4)}
        state.update({f"mask.{k}": v for k, v in self.masks.state_dict().items()})
        state.update({f"groups.{i}": k.clone() for i, k in enumerate(self.layout.group_keep)})
        state.update({f"masking.{k}": v for k, v in self.masking.state_dict().items()})
        state.update({f"scorer.{k}": v for k, v in self.scorer.state_dict().items()})
        state.update({f"allocation.{k}": v for k, v in self.allocation.state_dict().items()})
        state.update({f"regrowth.{k}": v for k, v in self.regrowth.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Resume: build the pruner first, then load the model's, the optimizer's and this state, in that order.

        A regrowth mode that starts sparse (set, rigl) zeroes weights when its pruner is built: model weights loaded
        before that would lose the ones its first random masks drop.
        """

        state = dict(zip(unwrapped_names(list(state)), state.values()))  # saved on a compiled model by older versions
        groups = {k.removeprefix("groups."): v for k, v in state.items() if k.startswith("groups.")}
        for key, mine in self._identity().items():
            saved = bytes(state[key].tolist()).decode() if key in state else mine  # older states lack some of these
            if not self._same_settings(saved, mine):
                raise ValueError(f"the pruner state was saved with {key} {saved}, this pruner uses {mine}; allowed: the "
                                 "state of a pruner built the same way (sparsity, total_steps, frequency, schedule, pattern, "
                                 "regrowth, regularizer, scorer, allocation, max_layer_sparsity)")
        masks = {k.removeprefix("mask."): v for k, v in state.items() if k.startswith("mask.")}
        for name, keep in zip(self.masks.names, self.masks.keep):  # the same weights, each of its own shape
            saved = masks.get(name)
            if saved is not None and saved.shape != keep.shape:
                raise ValueError(f"the pruner state does not fit this pruner: its mask of {name} is "
                                 f"{tuple(saved.shape)}, the weight here {tuple(keep.shape)} (another model); allowed: "
                                 "the state of a pruner built the same way")
        missing = [name for name in self.masks.names if name not in masks]
        if missing:
            raise ValueError(f"the pruner state does not fit this pruner: it has no mask of {missing[0]} (another model "
                             "or include/exclude); allowed: the state of a pruner built the same way")
        unknown = sorted(set(masks) - set(self.masks.names)) + [f"groups.{k}" for k in sorted(
            set(groups) - {str(i) for i in range(len(self.layout.group_keep))})]
        if unknown:  # a pruner over more weights (another include/exclude): this one would drop their masks
            raise ValueError(f"the pruner state does not fit this pruner: it masks {unknown[0]}, which this pruner "
                             "does not prune (another model or include/exclude); allowed: the state of a pruner built "
                             "the same way")
        for i, (name, current) in enumerate(zip(self.layout.layer_names, self.layout.group_keep)):
            saved = groups.get(str(i))
            if saved is None or saved.shape != current.shape:  # another pattern or model: the masks would not hold it
                held = "no" if saved is None else saved.numel()
                raise ValueError(f"the pruner state does not fit this pruner: {held} group flags for {name} in the state, "
                                 f"{current.numel()} here (another pattern, structure or model); allowed: the state of a "
                                 "pruner built the same way")
        # dense weights kept aside (dense_shadow masking, reversal) in one and not the other: loading would stop half
        # way on a missing key, or drop the weights the masks hide
        saved_shadow = any(k.startswith("masking.") for k in state)
        if saved_shadow != isinstance(self.masking, DenseShadowMasking):
            held, kept = ("holds", "keeps none") if saved_shadow else ("holds none of", "needs them")
            raise ValueError(f"the pruner state {held} the dense weights that pruning.masking=dense_shadow (or reversal) "
                             f"keeps aside, and this pruner {kept}; allowed: the state of a pruner built the same way")
        before = self.state_dict()
        try:
            self._load_parts(state)
        except (KeyError, ValueError, RuntimeError) as error:  # a part's state missing or of another shape
            self._load_parts(before)  # nothing half-loaded; the model's weights were not touched yet
            raise ValueError(f"the pruner state does not fit this pruner ({type(error).__name__}: {error}), saved by a "
                             "pruner built another way (model, scorer, allocation or regrowth); allowed: the state of a "
                             "pruner built the same way") from error
        self.masking.enforced = self.schedule.masks_enforced(max(self.step - 1, 0))
        self.masking.masks_changed()
        self._detached = False  # the state loaded is the whole truth: nothing to take from the weights at attach()
