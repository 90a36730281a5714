"""Scorers that judge whole channels (neurons, filters, heads) rather than single weights.

They need a channel layout (``pruning=neurons|filters|heads``). Data-driven ones watch the model through
ordinary forward (pre-)hooks on the modules a ChannelGroup names (``activation``: the module whose input carries
the channels; ``attention``), only while the model is in training mode, and keep one small accumulator per group
on the device: no host syncs per step.
Norm-based channel scores need no class here: ``scorer=magnitude`` with ``pruning.reduce=l1|l2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layouts import ChannelLayout
from .masks import tensor_bytes
from .scorers import SCORERS, Scorer

WATCHING = "_patcli_scorer_hook"  # marks a channel scorer's model hooks, so a copy of the model can shed them


def watching(hook):
    setattr(hook, WATCHING, True)
    return hook


def without_scorer_hooks(model: nn.Module) -> nn.Module:
    """``model`` (a copy) rid of the channel scorers' hooks it carried over: they would score its activations into
    the live pruner's sums, shaped for the channels the copy no longer has."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [key for key, hook in hooks.items() if getattr(hook, WATCHING, False)]:
                del hooks[key]
    return model


@dataclass
class GroupScorer(Scorer):
    """Accumulates one score per channel and layer between mask updates.

    As with the weight scorers, a mask update closes each layer's window and its next observation opens a new one:
    an update before any new observation ranks by the closed window, and so does one whose window holds only
    batches that were dropped (head_importance drops a batch whose gradient overflowed under a GradScaler).
    """

    grouped = True
    heads_only = False  # True: reads the attention probabilities only head groups name
    _sums: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    _counts: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    _closed: list[bool] = field(default_factory=list, init=False, repr=False)
    _last: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)  # the closed windows' scores
    _seen: bool = field(default=False, init=False, repr=False)  # a training batch reached a hook
    _handles: list = field(default_factory=list, init=False, repr=False)

    def attach(self, model: nn.Module, layout: ChannelLayout) -> None:
        device = layout.params[0].device
        self._sums = [torch.zeros(g.channels, device=device) for g in layout.groups]
        self._counts = [torch.zeros((), device=device) for _ in layout.groups]
        self._last = [torch.zeros(g.channels, device=device) for g in layout.groups]
        self._closed = [False] * len(layout.groups)
        self.layout = layout
        self.watch_model(model)

    def watch_model(self, model: nn.Module) -> None:
        """(Re-)register this scorer's hooks on the model: a pruner detached and attached again watches it again."""
        self.detach()
        modules = dict(model.named_modules())
        for i, group in enumerate(self.layout.groups):
            self.watch(i, group, modules)

    def watch(self, index: int, group, modules: dict[str, nn.Module]) -> None:
        """Register the hooks this scorer needs for one group (none by default)."""

    def _module(self, modules: dict[str, nn.Module], name: str | None, what: str) -> nn.Module:
        if name is None or name not in modules:
            raise ValueError(f"scorer {self.name!r} needs each channel group to name its {what} module; the model gives {name!r}")
        return modules[name]

    def _open_window(self, index: int) -> None:
        """Zero a layer's sums closed by the last mask update, as its first observation since arrives."""
        self._seen = True
        if self._closed[index]:
            self._sums[index].zero_()
            self._counts[index].zero_()
            self._closed[index] = False

    def _accumulate(self, index: int, values: torch.Tensor) -> None:
        self._open_window(index)
        self._sums[index] += values.detach().float()
        self._counts[index] += 1

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def group_scores(self) -> list[torch.Tensor]:
        if not self._seen:
            raise RuntimeError(f"scorer {self.name!r} saw no training batches before the mask update (it reads them "
                               "in training mode: call model.train())")
        # a window of dropped batches only (count 0) ranks by the last one; before any, every channel ties at 0
        return [torch.where(c > 0, s / c.clamp(min=1), last) for s, c, last in zip(self._sums, self._counts, self._last)]

    def has_scores(self) -> bool:
        """Whether any batch was counted (this window or the last): else every channel ties at 0 (one host sync)."""
        return any(bool(c) for c in self._counts) or any(bool(last.any()) for last in self._last)

    def scores(self, weights: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        raise RuntimeError(f"scorer {self.name!r} scores channels: use it with pruning=neurons|filters|heads")

    def reset(self) -> None:
        if self._seen:
            self._last = self.group_scores()
        self._closed = [True] * len(self._sums)

    def state_bytes(self) -> int:  # the accumulators held, without copying them as state_dict() does
        return tensor_bytes([*self._sums, *self._counts, *self._last])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"sum.{i}": s.clone() for i, s in enumerate(self._sums)}
        state.update({f"count.{i}": c.clone() for i, c in enumerate(self._counts)})
        state.update({f"last.{i}": last.clone() for i, last in enumerate(self._last)})
        if self._sums:
            state["closed"] = torch.tensor(self._closed)
            state["seen"] = torch.tensor(self._seen)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i in range(len(self._sums)):
            self._sums[i].copy_(state[f"sum.{i}"])
            self._counts[i].copy_(state[f"count.{i}"])
            last = state.get(f"last.{i}")  # older states kept none: an update ranked only what its window counted
            if last is None:
                self._last[i].zero_()
            else:
                self._last[i].copy_(last)
        # states saved before windows closed lazily had zeroed sums: open windows read the same
        self._closed = state["closed"].tolist() if "closed" in state else [False] * len(self._sums)
        self._seen = bool(state["seen"]) if "seen" in state else any(bool(c) for c in self._counts)


@SCORERS.register("taylor")
@dataclass
class GroupTaylor(GroupScorer):
    """|Σ_group w·g| per step, averaged (Molchanov et al. 2019): the loss change if the whole channel went to zero."""

    needs_grad = True

    def observe(self, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        products = torch._foreach_mul(weights, grads)
        for i, summed in enumerate(self.layout.group_scores(products, reduce="sum")):
            self._accumulate(i, summed.abs())


@SCORERS.register("activation")
@dataclass
class MeanActivation(GroupScorer):
    """Mean |activation| of each neuron or filter over the training batches: units that stay near zero go first."""

    def watch(self, index: int, group, modules: dict[str, nn.Module]) -> None:
        module = self._module(modules, group.activation, "activation")
        dim = group.activation_dim

        def hook(module: nn.Module, inputs) -> None:
            if module.training:
                moved = inputs[0].detach().abs().movedim(dim, 0)
                self._accumulate(index, moved.reshape(group.channels, -1).mean(1))

        self._handles.append(module.register_forward_pre_hook(watching(hook)))


@SCORERS.register("head_importance")
@dataclass
class HeadImportance(GroupScorer):
    """|∂L/∂ξ_h| for a gate ξ_h = 1 on each head's output (Michel et al. 2019), per example, averaged.

    With o_h the head's output, ∂L/∂ξ_h = Σ o_h · ∂L/∂o_h: read from a tensor hook on the head-output module.
    Under a GradScaler that gradient is the scaled one: a step's scores all carry the same loss scale (the ranking
    holds), and a batch whose gradient overflowed adds nothing, decided on the device.
    """

    def watch(self, index: int, group, modules: dict[str, nn.Module]) -> None:
        module = self._module(modules, group.activation, "head output")
        dim = group.activation_dim

        def hook(module: nn.Module, inputs) -> None:
            heads = inputs[0]
            if module.training and heads.requires_grad:
                value = heads.detach()

                def on_grad(grad: torch.Tensor) -> None:
                    per_example = (value * grad).movedim(dim, 1).reshape(value.shape[0], group.channels, -1).sum(-1)
                    score = per_example.abs().mean(0).float()
                    finite = torch.isfinite(score).all()
                    self._open_window(index)
                    self._sums[index] += torch.where(finite, score, 0.0)
                    self._counts[index] += finite

                heads.register_hook(on_grad)

        self._handles.append(module.register_forward_pre_hook(watching(hook)))


@SCORERS.register("attention_entropy")
@dataclass
class AttentionEntropy(GroupScorer):
    """−(mean entropy of each head's attention distribution): diffuse heads (near-uniform attention) go first."""

    heads_only = True

    def watch(self, index: int, group, modules: dict[str, nn.Module]) -> None:
        module = self._module(modules, group.attention, "attention-probabilities")

        def hook(module: nn.Module, inputs, probs: torch.Tensor) -> None:
            if module.training:
                p = probs.detach()
                entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)  # (B, H, T)
                self._accumulate(index, -entropy.mean(dim=(0, 2)))

        self._handles.append(module.register_forward_hook(watching(hook)))
