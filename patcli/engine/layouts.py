"""Layouts: how the masked parameters divide into *layers of groups* — the units allocation counts.

``TensorLayout``: each prunable weight is a layer, its groups come from a pattern (elements, N:M, blocks).
``ChannelLayout``: each layer is a set of output channels (neurons, filters, heads); a channel's group spans
every parameter that only exists for it — its weight rows, bias, BatchNorm γ/β and the next layer's input
columns — so a pruned channel is wholly off and can later be removed physically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .patterns import Pattern
from .threshold import keep_all_but_lowest


@dataclass
class Slice:
    """Channel c of a group owns indices [c·width, (c+1)·width) of ``param`` along ``dim``."""

    param: str
    dim: int
    width: int = 1


@dataclass
class ChannelGroup:
    """The output channels of one layer and the parameter slices that belong to each.

    ``activation`` names the module whose *input* carries the channels (along ``activation_dim``) — the values
    that actually flow on, after any nonlinearity — for activation-based scorers; ``attention`` the module whose
    output is a head's attention probabilities;
    ``buffers`` are slices of buffers (BatchNorm running statistics) that surgery cuts with the parameters.
    """

    name: str
    channels: int
    slices: list[Slice]
    shape: torch.Size = field(default_factory=lambda: torch.Size())  # the producing weight's shape (for ERK)
    activation: str | None = None
    activation_dim: int = -1
    attention: str | None = None
    buffers: list[Slice] = field(default_factory=list)


def channel_rows(tensor: torch.Tensor, channels: int, part: Slice) -> torch.Tensor:
    """[channels, everything else] view of one slice: row c holds what channel c owns of ``tensor``."""
    return tensor.movedim(part.dim, 0).reshape(channels, -1)


def along_slice(per_channel: torch.Tensor, part: Slice, ndim: int) -> torch.Tensor:
    """One value per channel, shaped to broadcast over the slice's parameter (``width`` entries each along ``dim``)."""
    view = [1] * ndim
    view[part.dim] = -1
    return per_channel.repeat_interleave(part.width).reshape(view)


class Layout:
    """Masked parameters (``names``/``params``), which of them count toward sparsity, and their layers of groups."""

    names: list[str]
    params: list[nn.Parameter]
    accounted: list[bool]
    layer_names: list[str]
    group_keep: list[torch.Tensor]
    elementwise = False  # one group per element of each param (group scores are element scores)

    def shapes(self) -> list[torch.Size]:
        raise NotImplementedError

    def group_scores(self, scores: list[torch.Tensor], reduce: str | None = None) -> list[torch.Tensor]:
        """One score per group and layer from element scores of ``params`` (``reduce`` overrides the default)."""
        raise NotImplementedError

    def group_sizes(self) -> list[int]:
        raise NotImplementedError

    def pruned_elements(self, counts: list[int]) -> int | None:
        """Exact accounted zeros for these counts when groups overlap; None when sizes simply add up."""
        return None

    def select(self, layer: int, group_scores: torch.Tensor, n_prune: int, cut: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Keep flags for one layer's groups; ``cut`` is a global threshold the allocation found, if any.

        ``out``, a bool buffer of the result's size, may receive the flags (no new tensor); use the returned tensor.
        """
        raise NotImplementedError

    def element_masks(self, group_keep: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def set_group_keep(self, group_keep: list[torch.Tensor]) -> list[torch.Tensor]:
        """Adopt a decision (copied into the existing flags: no new tensors); returns the element masks for ``params``."""
        for current, new in zip(self.group_keep, group_keep):
            if new.data_ptr() != current.data_ptr():  # select may have written into the flags already
                current.copy_(new.reshape(current.shape))
        return self.element_masks(self.group_keep)


class TensorLayout(Layout):
    """One layer per prunable weight, grouped by a pattern."""

    def __init__(self, weights: dict[str, nn.Parameter], pattern: Pattern) -> None:
        for name, weight in weights.items():
            pattern.check(name, weight.shape)
        self.pattern = pattern
        self.names = list(weights)
        self.params = list(weights.values())
        self.accounted = [True] * len(self.params)
        self.layer_names = self.names
        self.group_keep = [
            torch.ones(p.numel() // pattern.group_size(p.shape), dtype=torch.bool, device=p.device) for p in self.params
        ]
        self.elementwise = all(pattern.group_size(p.shape) == 1 for p in self.params)

    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    def group_scores(self, scores: list[torch.Tensor], reduce: str | None = None) -> list[torch.Tensor]:
        return [self.pattern.group_scores(s) for s in scores]

    def group_sizes(self) -> list[int]:
        return [self.pattern.group_size(p.shape) for p in self.params]

    def select(self, layer: int, group_scores: torch.Tensor, n_prune: int, cut: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        return self.pattern.select(group_scores, n_prune, self.params[layer].shape, cut, out)

    def element_masks(self, group_keep: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.pattern.expand(k, p.shape) for k, p in zip(group_keep, self.params)]


class ChannelLayout(Layout):
    """One layer per channel group; a channel's score reduces the scores of all its slices (``l2`` or ``l1``)."""

    def __init__(self, params: dict[str, nn.Parameter], groups: list[ChannelGroup], reduce: str = "l2") -> None:
        if not groups:
            raise ValueError("no channel groups to prune: check include and exclude (pruning.include and pruning.exclude on the "
                             "command line) and the model")
        self.groups = groups
        self.reduce = reduce
        self.names = list(dict.fromkeys(s.param for g in groups for s in g.slices))
        self.params = [params[n] for n in self.names]
        self.accounted = [p.dim() >= 2 for p in self.params]  # weights count; biases and norm parameters do not
        self.layer_names = [g.name for g in groups]
        self._index = {n: i for i, n in enumerate(self.names)}
        device = self.params[0].device
        self.group_keep = [torch.ones(g.channels, dtype=torch.bool, device=device) for g in groups]

    def shapes(self) -> list[torch.Size]:
        return [g.shape for g in self.groups]

    def group_scores(self, scores: list[torch.Tensor], reduce: str | None = None) -> list[torch.Tensor]:
        """``l2``: root of summed squares over the channel's slices; ``l1``/``sum``: their sum."""
        reduce = reduce or self.reduce
        result = []
        for group in self.groups:
            total = torch.zeros(group.channels, device=scores[0].device)
            for part in group.slices:
                per_channel = channel_rows(scores[self._index[part.param]].float(), group.channels, part)
                total += per_channel.pow(2).sum(1) if reduce == "l2" else per_channel.sum(1)
            result.append(total.sqrt() if reduce == "l2" else total)
        return result

    def group_sizes(self) -> list[int]:
        sizes = []
        for group in self.groups:
            size = 0
            for part in group.slices:
                param = self.params[self._index[part.param]]
                if self.accounted[self._index[part.param]]:
                    size += param.numel() // group.channels
            sizes.append(size)
        return sizes

    def pruned_elements(self, counts: list[int]) -> int:
        kept = [1.0] * len(self.params)
        for group, count in zip(self.groups, counts):
            for part in group.slices:
                kept[self._index[part.param]] *= (group.channels - count) / group.channels
        return int(round(sum(p.numel() * (1.0 - k) for p, k, a in zip(self.params, kept, self.accounted) if a)))

    def select(self, layer: int, group_scores: torch.Tensor, n_prune: int, cut: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        return keep_all_but_lowest(group_scores, n_prune, cut, out)

    def element_masks(self, group_keep: list[torch.Tensor]) -> list[torch.Tensor]:
        masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        for group, keep in zip(self.groups, group_keep):
            for part in group.slices:
                i = self._index[part.param]
                masks[i] &= along_slice(keep, part, masks[i].dim())
        return masks

