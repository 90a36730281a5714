"""Which tensors are prunable, their keep-masks, and the two ways of enforcing them during training.

Masks are keyed by parameter name, stored as ``torch.bool`` for saving, and mirrored once in the weight's dtype
because ``torch._foreach_mul_`` by bool masks was ~6× slower than by float masks (DESIGN.md §6).
"""

from __future__ import annotations

import fnmatch
import operator
from typing import Iterable, Protocol

import torch
from torch import nn

from .threshold import count

PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def as_list(key: str, patterns: Iterable[str]) -> list[str]:
    """A list of name patterns; a bare string would be read letter by letter."""
    if isinstance(patterns, str):
        raise TypeError(f"{key} takes a list of name patterns, e.g. {key}=[{patterns!r}]; got the string {patterns!r}")
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"{key} takes a list of name patterns, e.g. {key}=['*.weight']; got {patterns!r}") from None
    if wrong := [p for p in patterns if not isinstance(p, str)]:
        raise TypeError(f"{key} takes a list of name patterns (strings); got {wrong[0]!r} in it")
    return patterns


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches one of the fnmatch ``patterns`` (include/exclude lists)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class PatternError(ValueError):
    """An include/exclude pattern that matches nothing; ``key`` says which list."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key} {message}")
        self.key = key
        self.message = message


def pattern_lists(model: nn.Module, include: Iterable[str], exclude: Iterable[str]) -> tuple[list[str], list[str]]:
    """``include``/``exclude`` as lists, each pattern checked to match a parameter of ``model``.

    A bare string would be read letter by letter, and a pattern that matches nothing (a typo) would silently leave
    the layer it meant pruned or dense: both are errors. Any parameter counts, not only those the chosen layout
    prunes, so one exclude can serve every pruning mode of a sweep; so does a weight a parametrization computes.
    """
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]  # a shared weight under each name
    names += computed_weights(model)
    lists = []
    for key, patterns in (("include", include), ("exclude", exclude)):
        patterns = as_list(key, patterns)
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise PatternError(key, f"pattern {pattern!r} matches no parameter of the model; allowed: fnmatch "
                                        f"patterns over {shown or '(the model has none)'}")
        lists.append(patterns)
    return lists[0], lists[1]


def select_prunable(
    model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()
) -> dict[str, nn.Parameter]:
    """Weights of Linear/Conv layers whose name matches an ``include`` and no ``exclude`` pattern (fnmatch).

    Biases, norms and embeddings are never candidates, nor an output layer whose weight is tied to an embedding
    (pruning it would prune the embedding), nor a frozen weight (``requires_grad=False``: nothing would recover
    what pruning takes, and gradient scores are 0 there); a weight shared by two modules is listed once. A weight
    that a parametrization computes at each forward (weight_norm, spectral_norm, ``torch.nn.utils.prune``) is no
    parameter: masking it would mask a tensor about to be recomputed, so it stays dense (``computed_weights``).
    """
    include, exclude = as_list("include", include), as_list("exclude", exclude)
    tied = tied_weights(model)
    candidates: dict[int, tuple[nn.Parameter, list[str]]] = {}  # each weight with every name it has
    for name, weight in layer_weights(model):
        if weight is not None and id(weight) not in tied and weight.requires_grad:
            candidates.setdefault(id(weight), (weight, []))[1].append(name)
    selected: dict[str, nn.Parameter] = {}
    for weight, names in candidates.values():  # a shared weight goes by its first name, and any name may exclude it
        if any(matches_any(n, include) for n in names) and not any(matches_any(n, exclude) for n in names):
            selected[names[0]] = weight
    return selected


def left_dense(model: nn.Module, include: list[str], exclude: list[str]) -> tuple[list[str], list[str]]:
    """What a user may expect pruned but never will be: ``include`` patterns that name no Linear/Conv weight (an
    LSTM's, an attention's ``in_proj_weight``, a bias), and the included Linear/Conv weights that are frozen."""
    tied = tied_weights(model)  # never prunable, frozen or not; a parametrization's weight is warned of apart
    weights = {name: w for name, w in layer_weights(model) if w is not None and id(w) not in tied}
    unmatched = [p for p in include if not any(matches_any(name, [p]) for name in weights)]
    frozen = [name for name, w in weights.items()
              if not w.requires_grad and matches_any(name, include) and not matches_any(name, exclude)]
    return unmatched, frozen


def tied_weights(model: nn.Module) -> set[int]:
    """Ids of the embeddings' weights: an output layer tied to one shares it, and pruning it would prune the
    embedding."""
    return {id(own_weight(m)) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


def layer_weights(model: nn.Module) -> list[tuple[str, nn.Parameter | None]]:
    """Each Linear/Conv layer's weight by its name (under every name of a layer used twice); None where a
    parametrization computes it."""
    return [(f"{name}.weight" if name else "weight", own_weight(module))
            for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, PRUNABLE_MODULES)]


def own_weight(module: nn.Module) -> nn.Parameter | None:
    """The module's ``weight`` parameter, or None when a parametrization computes it: read from the registered
    parameters, as reading ``module.weight`` would run the parametrization (spectral_norm's power iteration)."""
    return module._parameters.get("weight")


def computed_weights(model: nn.Module) -> list[str]:
    """Names of Linear/Conv weights a parametrization computes at each forward, which ``select_prunable`` skips."""
    return [name for name, weight in layer_weights(model) if weight is None]


def tensor_bytes(tensors) -> int:
    """Memory the tensors hold (for ``engine_state_bytes``)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask viewed as uint8 (no copy): converting that to float is ~10× faster on CPU than from bool."""
    return mask.view(torch.uint8)


def mark_pruned_(scores: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """Set ``scores`` to -inf where the float mask ``multiplier`` is 0, in place (scores must not be NaN).

    s·m/m is exactly s where m = 1 and 0/0 = NaN where m = 0, which ``nan_to_num_`` turns into -inf: three
    vectorised passes and no new tensor (a fresh multi-MB tensor costs page faults on CPU), ~10× faster on CPU than
    ``masked_fill`` with a bool mask, whose kernel is not vectorised.
    """
    inf = float("inf")
    return scores.mul_(multiplier).div_(multiplier).nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)


class MaskSet:
    """Keep-masks (True = keep) for a fixed list of named parameters.

    ``accounted`` marks the ones that count toward sparsity (prunable weights); structured pruning also masks
    biases and norm parameters so a pruned channel is wholly off, without counting them.
    """

    def __init__(self, weights: dict[str, nn.Parameter], accounted: list[bool] | None = None) -> None:
        if not weights:
            raise ValueError("no prunable weights: check include and exclude (pruning.include and pruning.exclude on the "
                             "command line); only Linear and Conv weights that train are prunable: not frozen ones, "
                             "embeddings, or weights a parametrization computes")
        self.names = list(weights)
        self.weights = list(weights.values())
        self.accounted = accounted or [True] * len(self.weights)
        self.keep = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]
        self._multipliers = [torch.ones_like(w) for w in self.weights]
        self.pruned_counts = [0] * len(self.weights)  # per tensor, kept up to date by set()

    def __len__(self) -> int:
        return len(self.names)

    def set(self, index: int, keep: torch.Tensor) -> None:
        """Copy a decision into the existing buffers (no new allocation: large fresh tensors are slow on CPU)."""
        self.keep[index].copy_(keep.reshape(self.keep[index].shape))
        self._multipliers[index].copy_(as_bytes(self.keep[index]))
        self.pruned_counts[index] = self.keep[index].numel() - count(self.keep[index])

    @property
    def multipliers(self) -> list[torch.Tensor]:
        """The masks as 1.0 / 0.0 in each weight's dtype (read-only for callers)."""
        return self._multipliers

    def check_weights(self) -> None:
        """The masks are made in the weights' dtype and device: a model moved or cast afterwards no longer fits."""
        for name, weight, multiplier in zip(self.names, self.weights, self._multipliers):
            if weight.dtype != multiplier.dtype or weight.device != multiplier.device:
                raise ValueError(f"{name} is now {weight.dtype} on {weight.device}, but the pruner was built for "
                                 f"{multiplier.dtype} on {multiplier.device}; allowed: move or cast the model before "
                                 "building the Pruner (and the optimizer)")

    def zero_pruned_(self, tensors: list[torch.Tensor] | None = None) -> None:
        """Multiply ``tensors`` (the weights by default) by the masks in place."""
        with torch.no_grad():
            torch._foreach_mul_(self.weights if tensors is None else tensors, self._multipliers)

    def accounted_numel(self) -> int:
        return sum(w.numel() for w, a in zip(self.weights, self.accounted) if a)

    def sparsity(self) -> float:
        """Fraction of accounted elements the masks prune."""
        return sum(c for c, a in zip(self.pruned_counts, self.accounted) if a) / self.accounted_numel()

    def state_bytes(self) -> int:
        return tensor_bytes([*self.keep, *self._multipliers])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: keep.clone() for name, keep in zip(self.names, self.keep)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"mask state lacks {sorted(missing)}")
        for i, name in enumerate(self.names):
            self.set(i, state[name])


class Masking(Protocol):
    """How masks are enforced around ``optimizer.step()``: one obvious place where a mask is applied."""

    acts_before_step: bool

    def before_step(self) -> None: ...

    def after_step(self, zero: bool = True) -> None: ...

    def masks_changed(self) -> None: ...

    def adopt_weights(self) -> None: ...

    def dense_weights(self) -> list[torch.Tensor]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def state_bytes(self) -> int: ...


class InplaceMasking:
    """Zero pruned weights right after each optimizer step: the weight itself is the sparse model.

    A pruned weight is 0 in every forward, and whatever its momentum or Adam moments would add is wiped at once,
    so optimizer state never revives it. The cheapest option measured (DESIGN.md §6).
    """

    acts_before_step = False

    def __init__(self, masks: MaskSet) -> None:
        self.masks = masks
        self.enforced = True

    def before_step(self) -> None:
        pass

    def after_step(self, zero: bool = True) -> None:
        if self.enforced and zero:
            self.masks.zero_pruned_()

    def masks_changed(self) -> None:
        if self.enforced:
            self.masks.zero_pruned_()

    def adopt_weights(self) -> None:
        pass  # the weights are the only copy

    def dense_weights(self) -> list[torch.Tensor]:
        return self.masks.weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def state_bytes(self) -> int:
        return 0


VERSION = operator.attrgetter("_version")


class DenseShadowMasking:
    """Keep dense weights aside; forward and backward see masked weights; the update lands on the dense ones.

    This is the straight-through update of dynamic pruning with feedback (Lin et al. 2020): a pruned weight keeps
    learning from the gradient at the masked point, so a later mask update can bring it back.
    """

    acts_before_step = True

    def __init__(self, masks: MaskSet) -> None:
        self.masks = masks
        self.enforced = True
        self.shadow = [w.detach().clone() for w in masks.weights]
        self._written = self._versions()

    def _versions(self) -> list[int]:
        """Each weight's in-place write count (the tensor's version counter)."""
        return list(map(VERSION, self.masks.weights))

    def before_step(self) -> None:
        with torch.no_grad():
            if self._versions() != self._written:  # written since the last step: a checkpoint loaded, a re-init
                self.take_written()
            torch._foreach_copy_(self.masks.weights, self.shadow)

    def take_written(self) -> None:
        """Make what was written into the weights between steps the dense copy's, as in-place masking keeps it: a
        kept weight as written, a pruned one where it was written non-zero (a dense checkpoint loaded)."""
        with torch.no_grad():
            for shadow, weight, keep in zip(self.shadow, self.masks.weights, self.masks.keep):
                shadow.copy_(torch.where(keep | (weight != 0), weight, shadow) if self.enforced else weight)

    def after_step(self, zero: bool = True) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.shadow, self.masks.weights)
        if self.enforced and zero:
            self.masks.zero_pruned_()
        self._written = self._versions()

    def masks_changed(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.masks.weights, self.shadow)
        if self.enforced:
            self.masks.zero_pruned_()
        self._written = self._versions()

    def adopt_weights(self) -> None:
        """Fold in what the weights learned without the pruner: a kept weight is as trained; a pruned one, masked to 0
        when the pruner let go, keeps its dense value plus what it moved since (straight through, as in a step)."""
        with torch.no_grad():
            for shadow, weight, multiplier in zip(self.shadow, self.masks.weights, self.masks.multipliers):
                if self.enforced:
                    shadow.mul_(1 - multiplier).add_(weight)
                else:  # decompressed: the weights were the dense ones
                    shadow.copy_(weight)

    def dense_weights(self) -> list[torch.Tensor]:
        return self.shadow

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"shadow.{name}": s.clone() for name, s in zip(self.masks.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.masks.names):
            self.shadow[i].copy_(state[f"shadow.{name}"])

    def state_bytes(self) -> int:
        return tensor_bytes(self.shadow)


MASKINGS = {"inplace": InplaceMasking, "dense_shadow": DenseShadowMasking}


def zero_optimizer_state_(optimizer: torch.optim.Optimizer, weights: list[torch.Tensor], where: list[torch.Tensor]) -> None:
    """Zero momentum / Adam moments of ``weights`` where ``where`` is True: state gathered while a weight was
    masked cannot revive it, and a regrown weight starts fresh."""
    with torch.no_grad():
        for weight, positions in zip(weights, where):
            for value in optimizer.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    value.masked_fill_(positions, 0)
