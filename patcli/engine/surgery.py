"""Physical removal of pruned channels: a genuinely smaller dense model with the masked model's outputs.

A channel whose every slice (weight rows, bias, BatchNorm γ/β, the next layer's input columns) is zero
contributes nothing downstream, so cutting those slices (and the matching BatchNorm running statistics) leaves
the outputs unchanged. Module attributes (``in_features``, ``out_channels``, ``num_features``…) are re-read from
the new weight shapes, and ``resize_like`` re-applies saved shapes to a freshly built model so it can load the
smaller state_dict.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .group_scorers import without_scorer_hooks
from .layouts import ChannelGroup, channel_rows


def live_channels(model: nn.Module, groups: list[ChannelGroup]) -> list[torch.Tensor]:
    """Per group, which channels still carry anything (some slice non-zero); all-zero channels can go.

    A group with none left (a penalty can zero a whole layer) keeps its first, all zero, channel: a layer of width 0
    cannot run, and a zero channel computes exactly what the masked model's zeroed ones do.
    """
    tensors = dict(model.named_parameters())
    keep = []
    for group in groups:
        alive = torch.zeros(group.channels, dtype=torch.bool, device=next(iter(tensors.values())).device)
        for part in group.slices:
            alive |= (channel_rows(tensors[part.param].detach(), group.channels, part) != 0).any(dim=1)
        if not bool(alive.any()):
            alive[0] = True
        keep.append(alive)
    return keep


def _indices(keep: torch.Tensor, width: int) -> torch.Tensor:
    channels = keep.nonzero().squeeze(1)
    return (channels[:, None] * width + torch.arange(width, device=keep.device)).reshape(-1)


def shrink(model: nn.Module, groups: list[ChannelGroup], keep: list[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the channels that ``keep`` drops cut out of every slice (and its buffers)."""
    small = without_scorer_hooks(copy.deepcopy(model))
    cuts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for group, kept in zip(groups, keep):
        for part in [*group.slices, *group.buffers]:
            cuts.setdefault(part.param, []).append((part.dim, _indices(kept, part.width)))
    tensors = {**dict(small.named_parameters()), **dict(small.named_buffers())}
    for name, dims in cuts.items():
        value = tensors[name].detach()
        for dim, index in dims:
            value = value.index_select(dim, index.to(value.device))
        _replace(small, name, value.clone())
    sync_attributes(small)
    return small


def _replace(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = value


def sync_attributes(model: nn.Module) -> None:
    """Make standard modules' size attributes agree with their (possibly cut) weights."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.conv._ConvNd):
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            held = module.weight if module.weight is not None else module.running_mean
            if held is not None:  # affine=False without running stats holds no tensor: it normalises whatever comes
                module.num_features = held.shape[0]


def shapes_of(model: nn.Module) -> dict[str, list[int]]:
    """Every parameter's and buffer's shape: what ``resize_like`` needs to rebuild a shrunk model."""
    return {name: list(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}


def resize_like(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Give a freshly built model the (smaller) shapes of a shrunk one, ready for ``load_state_dict``."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if not isinstance(shapes, dict):
        raise ValueError(f"shapes: expected a mapping of names to shapes, got {shapes!r}")
    for name, shape in shapes.items():
        current = tensors.get(name)
        if current is None:
            continue
        if not (isinstance(shape, list) and len(shape) == current.dim()
                and all(isinstance(n, int) and 0 <= n <= full for n, full in zip(shape, current.shape))):
            # shrinking only removes channels: anything else is a damaged or foreign description
            raise ValueError(f"shapes.{name}: {shape!r} is no shrunk shape of its {tuple(current.shape)} weight")
        if list(current.shape) != shape:
            _replace(model, name, torch.zeros(shape, dtype=current.dtype, device=current.device))
    sync_attributes(model)
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

