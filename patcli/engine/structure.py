"""Finding channel groups: which parameter slices belong to each neuron, filter or attention head.

A model can describe itself with ``channel_groups(kind)`` (the built-in transformer does, for heads and MLP
neurons). Otherwise a feed-forward chain (``nn.Sequential``, possibly nested) is read in order: each Linear (for
``neurons``) or Conv (for ``filters``) produces channels; a BatchNorm right after it belongs to them; the next
Linear/Conv consumes them along its input dimension. The last layer's outputs are the model's outputs and are
never pruned.
"""

from __future__ import annotations

import logging
from typing import Iterable

from torch import nn

from .layouts import ChannelGroup, Slice
from .masks import as_list, matches_any

log = logging.getLogger(__name__)

PRODUCERS = {"neurons": (nn.Linear,), "filters": (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.LPPool1d, nn.LPPool2d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
         nn.AdaptiveMaxPool3d)
# each element alone (what a pruned channel computes is zeroed by its consumer's columns, whatever f(0) is)
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
               nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink,
               nn.Softshrink, nn.Hardshrink, nn.Threshold)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
TRANSPARENT = (*ELEMENTWISE, *DROPOUTS, nn.Flatten, nn.Identity, nn.Unflatten, *POOLS)
FINAL = (nn.Softmax, nn.LogSoftmax)  # across the model's outputs: only after its last layer, which keeps them all


class StructureError(ValueError):
    """The model's structure cannot be read for this kind of group."""


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


class NoChannels(StructureError):
    """A chain without channels of the kind asked (filters of an MLP); ``others``: the kinds it has."""

    def __init__(self, model: nn.Module, kind: str, others: list[str]) -> None:
        self.others = others
        allowed = ", ".join(f"pruning={k}" for k in others) or "pruning=unstructured, nm or block"
        super().__init__(f"{type(model).__name__} has no {kind} to prune; allowed: {allowed}")


def channel_groups(
    model: nn.Module, kind: str, include: Iterable[str] = ("*",), exclude: Iterable[str] = (), warn: bool = False
) -> list[ChannelGroup]:
    """The prunable channel groups of ``kind`` (neurons | filters | heads) whose producing weight is included and
    that touch no frozen parameter; ``warn`` of an exclude pattern that keeps none (once, where a pruner is built)."""
    if hasattr(model, "channel_groups"):
        groups = model.channel_groups(kind)
    elif kind == "heads":
        raise StructureError(f"{type(model).__name__} has no attention heads patcli can find: "
                             "define channel_groups('heads') on the model")
    else:
        groups = sequential_groups(model, kind)
        if not groups:  # filters of an MLP, neurons of a conv net whose only Linear is the classifier
            raise NoChannels(model, kind, [k for k in ("neurons", "filters") if k != kind and sequential_groups(model, k)])
    include, exclude = as_list("include", include), as_list("exclude", exclude)
    # include/exclude name a layer by its own weights, those cut along the producing weight's axis (a neuron's or
    # filter's rows; a head's Q, K and V): an excluded layer keeps its channels, while its input columns still go
    # with the previous layer's (so one exclude, e.g. the classifier, serves every mode). A frozen weight is never
    # pruned, not even those columns (a frozen norm's γ/β or a bias only go with their channel).
    shapes = {name: p.shape for name, p in model.named_parameters() if p.dim() >= 2}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad and p.dim() >= 2}

    def own(group: ChannelGroup) -> list[str]:  # cut along the producing weight's axis (rows, or columns of an (in, out) one)
        cut = [s for s in group.slices if s.param in shapes]
        producing = next((s for s in cut if shapes[s.param] == group.shape), cut[0] if cut else None)  # in any order
        return [s.param for s in cut if s.dim == producing.dim]

    selected = [g for g in groups if any(matches_any(w, include) for w in own(g)) and not any(matches_any(w, exclude) for w in own(g))
                and not any(s.param in frozen for s in g.slices)]
    if warn and kind == "heads":  # a layer after neurons or filters (the classifier) is the exclude that serves every mode
        warn_of_excludes_naming_no_heads(groups, selected, own, exclude, shapes)
    return selected


def warn_of_excludes_naming_no_heads(groups: list[ChannelGroup], selected: list[ChannelGroup], own, exclude: list[str],
                                     weights) -> None:
    """An exclude naming only an output projection, whose columns go with the heads of the Q, K and V before it, keeps
    no head: say which weights it would have to name (``selected``: the heads pruned; ``weights``: the 2-D and up)."""
    owners = {w for g in groups for w in own(g)}
    for pattern in exclude:
        if any(matches_any(w, [pattern]) for w in owners):
            continue
        following = [g for g in selected if any(s.param in weights and s.param not in own(g) and matches_any(s.param, [pattern])
                                                for s in g.slices)]
        if following:
            named = sorted({s.param for g in following for s in g.slices if s.param in weights and matches_any(s.param, [pattern])})
            log.warning("exclude pattern %r keeps no heads: the columns of %s go with the heads of %s, whose own weights "
                        "it does not name (exclude those to keep these heads)", pattern, ", ".join(named),
                        ", ".join(sorted({w for g in following for w in own(g)})))


def _plain_sequential(module: nn.Module) -> bool:
    """A Sequential that runs its children in order: a subclass with a forward of its own (a residual block) does not."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _unreadable(model: nn.Module) -> list[str]:
    """What the chain reader cannot follow: modules of unknown type (a block with its own forward, a residual
    connection), grouped convolutions, whose channels cannot be cut one at a time, and a layer or weight used at
    two places in the chain (the reader would see it once; cutting it for one place breaks the other)."""
    found = [type(m).__name__ for _, m in model.named_modules()
             if not _plain_sequential(m) and (list(m.children()) or not isinstance(m, LAYERS + NORMS + TRANSPARENT + FINAL))]
    leaves = _leaves(model)
    last_layer = max((i for i, (_, m) in enumerate(leaves) if isinstance(m, LAYERS)), default=-1)
    found += [f"{type(m).__name__} before the last layer" for _, m in leaves[:last_layer] if isinstance(m, FINAL)]
    found += [f"{type(m).__name__}(groups={m.groups})" for m in model.modules() if getattr(m, "groups", 1) != 1]
    shared = _used_twice(((n, m) for n, m in model.named_modules(remove_duplicate=False)
                          if any(True for _ in m.parameters(recurse=False))), "module")  # a shared ReLU is harmless
    return found + (shared or _used_twice(model.named_parameters(remove_duplicate=False), "parameter"))


def _used_twice(named: Iterable[tuple[str, object]], what: str) -> list[str]:
    names: dict[int, list[str]] = {}
    for name, thing in named:
        names.setdefault(id(thing), []).append(name)
    return [f"{what} {' = '.join(shared)} used twice" for shared in names.values() if len(shared) > 1]


def _named(name: str, module: nn.Module) -> str:
    """A layer as a message names it: a Sequential's names are bare indices, which say little alone."""
    return f"{name} ({type(module).__name__})"


def sequential_groups(model: nn.Module, kind: str) -> list[ChannelGroup]:
    leaves = _leaves(model)
    unknown = _unreadable(model)
    if unknown or not _plain_sequential(model):
        raise StructureError(
            f"structured pruning reads feed-forward nn.Sequential chains; {type(model).__name__} "
            f"({', '.join(sorted(set(unknown))) or 'not a plain Sequential'}) needs a channel_groups(kind) method"
        )
    groups = []
    for i, (name, module) in enumerate(leaves):
        if not isinstance(module, PRODUCERS[kind]):
            continue
        channels = module.weight.shape[0]
        slices = [Slice(f"{name}.weight", 0)]
        if module.bias is not None:
            slices.append(Slice(f"{name}.bias", 0))
        consumer = None
        buffers: list[Slice] = []
        between: list[nn.Module] = []  # activations, pooling, reshapes
        for next_name, following in leaves[i + 1 :]:
            if isinstance(following, NORMS):
                slices, buffers = slices + _norm_slices(next_name, following, channels, "weight", "bias"), \
                    buffers + _norm_slices(next_name, following, channels, "running_mean", "running_var")
                continue
            if isinstance(following, LAYERS):
                consumer = (next_name, following)
                break
            between.append(following)
        if consumer is None:
            continue  # the model's output layer
        consumer_name, consumer_module = consumer
        inputs = consumer_module.weight.shape[1]
        producer, reader = _named(name, module), _named(consumer_name, consumer_module)
        if inputs % channels:  # something between them changes how many values a channel gives (a pool across them)
            raise StructureError(f"{reader} takes {inputs} inputs, not a multiple of the {channels} channels of {producer}; "
                                 "allowed: a chain that passes whole channels on, or define channel_groups(kind) on the model")
        problem = _channel_axis_problem(module, consumer_module, between, inputs // channels)
        if problem:
            raise StructureError(f"{producer} → {reader}: {problem}")
        slices.append(Slice(f"{consumer_name}.weight", 1, width=inputs // channels))
        groups.append(ChannelGroup(name=name, channels=channels, slices=slices, shape=module.weight.shape,
                                   activation=consumer_name, buffers=buffers,
                                   activation_dim=-1 if isinstance(consumer_module, nn.Linear) else 1))
    return groups


def _channel_axis_problem(producer: nn.Module, consumer: nn.Module, between: list[nn.Module], width: int) -> str | None:
    """Why the consumer would not read the producer's channels where the chain reader assumes: a conv's on axis 1,
    a Linear's on the last axis, and after a conv's Flatten in channel-major blocks of ``width`` inputs."""
    if any(isinstance(m, nn.Unflatten) for m in between):
        return "an Unflatten between them moves the channels; allowed: define channel_groups(kind) on the model"
    rank = producer.weight.dim()  # a conv's output: (batch, channels, *positions)
    merged = channel_major = False  # channels flattened into features; and into channel-major features of all of them
    for module in between:
        if isinstance(module, POOLS) and (isinstance(producer, nn.Linear) or merged):  # per channel only over positions
            return (f"the {type(module).__name__} between them pools along the channel axis, mixing neighbouring channels; "
                    "allowed: pooling over a conv's spatial axes, or define channel_groups(kind) on the model")
        pooled, positions = int(type(module).__name__[-2]) if isinstance(module, POOLS) else 0, rank - 2
        if pooled > positions:  # torch reads the output as unbatched: the first pooled axis is the channels
            return (f"the {type(module).__name__} between them pools over {pooled} axes of an output with {positions} "
                    f"positional {'axis' if positions == 1 else 'axes'}, so over the channels too; allowed: a "
                    f"{positions}d pool, or define channel_groups(kind) on the model")
        if isinstance(module, nn.Flatten) and not isinstance(producer, nn.Linear):
            start, end = module.start_dim % rank, module.end_dim % rank  # a negative dim counts from the last
            if start <= 1 <= end:
                merged, channel_major = True, start == 1 and end == rank - 1
            rank -= end - start
    if isinstance(producer, nn.Linear):
        if not isinstance(consumer, nn.Linear):
            return "a Linear's outputs lie on the last axis, a conv reads its channels on axis 1; allowed: define channel_groups(kind)"
        if width > 1:  # the Linear ran on more than two dims: Flatten interleaves its outputs with the positions
            return (f"the consumer takes {width}× the Linear's outputs, flattened with its positions, not in blocks per "
                    "neuron; allowed: define channel_groups(kind) on the model")
    elif isinstance(consumer, nn.Linear) and not channel_major:
        return ("a Linear right after a conv acts on its last (spatial) axis, not on its channels; allowed: a Flatten "
                "of the channels and every position (start_dim=1) between them, or define channel_groups(kind) on the model")
    return None


def _norm_slices(name: str, norm: nn.Module, channels: int, *tensors: str) -> list[Slice]:
    """A norm between a producer and its consumer normalises its channels: per channel, or per flattened feature
    (``num_features`` = channels × positions, channel-major after ``Flatten``). Absent tensors (``affine=False``,
    ``track_running_stats=False``) have nothing to cut."""
    if norm.num_features % channels:
        raise StructureError(f"{name} normalises {norm.num_features} features, not a multiple of the {channels} channels before it")
    width = norm.num_features // channels
    return [Slice(f"{name}.{t}", 0, width=width) for t in tensors if getattr(norm, t, None) is not None]
