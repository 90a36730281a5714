"""Sparsity patterns: how a weight's elements form groups that are kept or pruned together.

A pattern turns element scores into one score per group, and a number of groups to prune into an element
keep-mask. Scores of already-pruned elements arrive as -inf, so they are chosen first and masks only grow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import Registry

PATTERNS: Registry["Pattern"] = Registry("pruning mode")


class PatternError(ValueError):
    """A pattern that does not fit a weight's shape or the requested sparsity."""


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

    def expand(self, group_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Element keep-mask from a keep flag per group."""
        return group_keep.reshape(shape)

    def keep_mask(self, scores: torch.Tensor, n_prune: int) -> torch.Tensor:
        """Keep-mask that prunes the ``n_prune`` lowest-scored groups."""
        group_scores = self.group_scores(scores)
        keep = torch.ones_like(group_scores, dtype=torch.bool)
        if n_prune > 0:
            lowest = torch.topk(group_scores, n_prune, largest=False, sorted=False).indices
            keep[lowest] = False
        return self.expand(keep, scores.shape)


@PATTERNS.register("unstructured")
@dataclass
class Unstructured(Pattern):
    """Any element can go."""
