"""Sparsity patterns inside one weight: which elements form a group that is kept or pruned together.

A pattern turns element scores into one score per group, picks which groups to prune given how many, and
expands a keep flag per group back to an element mask. Blocks view a weight as 2-D ``[out, in·k…]``; N:M groups
run along the input channels (dimension 1) at each kernel position, as sparse GEMM and convolution kernels take them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import ParamError, Registry
from .threshold import keep_all_but_lowest

PATTERNS: Registry["Pattern"] = Registry("pruning mode")


class PatternError(ValueError):
    """A pattern that does not fit a weight's shape or the requested sparsity."""


def as_rows(shape: torch.Size) -> tuple[int, int]:
    """A weight seen as [outputs, inputs]: conv kernels are flattened into the input side."""
    rows = shape[0]
    return rows, (int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1)


@dataclass
class Pattern:
    """Groups of elements of one weight tensor; the base class is unstructured (one element per group)."""

    @property
    def fixed_sparsity(self) -> float | None:
        """Sparsity the pattern imposes by itself (N:M), or None when the schedule decides."""
        return None

    def check(self, name: str, shape: torch.Size) -> None:
        """Raise PatternError when the pattern cannot apply to a weight of this shape."""

    def group_size(self, shape: torch.Size) -> int:
        return 1

    def group_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """One score per group (1-D)."""
        return scores.reshape(-1)

    def select(self, group_scores: torch.Tensor, n_prune: int, shape: torch.Size, cut: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Keep flag per group: the ``n_prune`` lowest-scored groups go (``cut``: a known threshold, if any; ``out``:
        a bool buffer that may receive the flags)."""
        return keep_all_but_lowest(group_scores, n_prune, cut, out)

    def expand(self, group_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Element keep-mask from a keep flag per group."""
        return group_keep.reshape(shape)


@PATTERNS.register("unstructured")
@dataclass
class Unstructured(Pattern):
    """Any element can go."""


@PATTERNS.register("nm")
@dataclass
class NM(Pattern):
    """N:M semi-structured sparsity: at most N non-zeros in every M consecutive inputs (2:4 runs on sparse tensor cores).

    A conv's groups are M consecutive input channels at one filter and kernel position (its weight read as
    ``[out, kh, kw, in]``), the layout sparse convolution kernels require; grouping the flattened ``in·kh·kw`` row
    instead would mix kernel positions and channels. The sparsity is fixed at 1 - N/M. Before the final target, only
    elements that N:M would drop anyway are pruned (the lowest M - N of each group), lowest scores first, so gradual
    schedules end exactly at N:M.
    """

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if self.m < 2:
            raise ParamError("m", f"{self.m} is not allowed; allowed: m >= 2")
        if not 1 <= self.n < self.m:
            raise ParamError("n", f"{self.n}:{self.m} is not allowed; allowed: 1 <= n < m")

    @property
    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check(self, name: str, shape: torch.Size) -> None:
        inputs = shape[1] if len(shape) > 1 else 1
        if inputs % self.m:
            kind = "input channel" if len(shape) > 2 else "input"
            raise PatternError(f"{name} has {inputs} {kind}{'s' if inputs != 1 else ''}, not a multiple of m={self.m}; "
                               f"leave it dense with exclude=['{name}'] (pruning.exclude on the command line)")

    def select(self, group_scores: torch.Tensor, n_prune: int, shape: torch.Size, cut: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        channels_last = group_scores.reshape(shape).movedim(1, -1)
        rank = channels_last.reshape(-1, self.m).argsort(dim=1).argsort(dim=1)
        droppable = (rank < self.m - self.n).reshape(channels_last.shape).movedim(-1, 1).reshape(-1)
        ranked = torch.where(droppable, group_scores, torch.full_like(group_scores, float("inf")))
        n_prune = min(n_prune, int(droppable.sum()))
        return super().select(ranked, n_prune, shape)


@PATTERNS.register("block")
@dataclass
class Block(Pattern):
    """Rectangular blocks of ``rows`` × ``cols`` elements, scored by the sum of their element scores (|w|: L1 norm)."""

    rows: int = 1
    cols: int = 4

    def __post_init__(self) -> None:
        for name, size in (("rows", self.rows), ("cols", self.cols)):
            if size < 1:
                raise ParamError(name, f"{size} is not allowed (block {self.rows}x{self.cols}); allowed: sizes >= 1")

    def check(self, name: str, shape: torch.Size) -> None:
        out, inputs = as_rows(shape)
        if out % self.rows or inputs % self.cols:
            raise PatternError(f"{name} of shape {tuple(shape)} does not divide into {self.rows}x{self.cols} blocks; "
                               f"leave it dense with exclude=['{name}'] (pruning.exclude on the command line)")

    def group_size(self, shape: torch.Size) -> int:
        return self.rows * self.cols

    def _blocked(self, tensor: torch.Tensor) -> torch.Tensor:
        out, inputs = as_rows(tensor.shape)
        return tensor.reshape(out // self.rows, self.rows, inputs // self.cols, self.cols)

    def group_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return self._blocked(scores).sum(dim=(1, 3)).reshape(-1)

    def expand(self, group_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        out, inputs = as_rows(shape)
        grid = group_keep.reshape(out // self.rows, 1, inputs // self.cols, 1)
        return grid.expand(-1, self.rows, -1, self.cols).reshape(shape)


CHANNEL_MODES = ("neurons", "filters", "heads")  # the registered Structured patterns


@dataclass
class Structured(Pattern):
    """Whole channels across tensors (see layouts.ChannelLayout); ``reduce`` folds element scores into one per channel."""

    kind = "neurons"
    reduce: str = "l2"

    def __post_init__(self) -> None:
        if self.reduce not in ("l1", "l2"):
            raise ParamError("reduce", f"{self.reduce!r} is not allowed; allowed: l1, l2")


@PATTERNS.register("neurons")
@dataclass
class Neurons(Structured):
    """Output features of Linear layers, with their bias and the next layer's input columns."""

    kind = "neurons"


@PATTERNS.register("filters")
@dataclass
class Filters(Structured):
    """Output channels of Conv layers, with their bias, BatchNorm γ/β and the next layer's input channels."""

    kind = "filters"


@PATTERNS.register("heads")
@dataclass
class Heads(Structured):
    """Whole attention heads: their Q/K/V rows and output-projection columns."""

    kind = "heads"
