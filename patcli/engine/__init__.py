"""The PAT engine: pure torch, usable without the CLI.

A few lines in any training loop::

    from patcli.engine import prune_during_training
    pruner = prune_during_training(model, optimizer, sparsity=0.9, total_steps=len(loader) * epochs)
    # ... the usual loop: loss.backward(); optimizer.step() — masks update and apply inside step()
"""

from __future__ import annotations

import torch
from torch import nn

from . import group_scorers  # noqa: F401  (registers the channel scorers)
from .allocation import ALLOCATIONS, Allocation
from .masks import MaskSet, select_prunable
from .patterns import PATTERNS, Pattern
from .pruner import MaskUpdate, Pruner
from .regrowth import REGROWTHS, Regrowth
from .regularizers import REGULARIZERS, Regularizer
from .schedules import SCHEDULES, Schedule
from .scorers import SCORERS, Scorer

__all__ = [
    "ALLOCATIONS",
    "PATTERNS",
    "REGROWTHS",
    "REGULARIZERS",
    "SCHEDULES",
    "SCORERS",
    "Allocation",
    "MaskSet",
    "MaskUpdate",
    "Pattern",
    "Pruner",
    "Regrowth",
    "Regularizer",
    "Schedule",
    "Scorer",
    "prune_during_training",
    "select_prunable",
]


def _part(registry, value, argument: str, optional: bool = False):
    """A part from its name or as given; ``optional`` parts may be None (or "none", as the CLI's regularizer=none)."""
    if optional and (value is None or (value == "none" and "none" not in registry)):
        return None
    if value is None:  # not the Pruner's own default, which may differ from this function's
        raise TypeError(f"{argument} must be a name ({', '.join(registry.names())}) or an object, got None")
    return registry.get(value)() if isinstance(value, str) else value


def prune_during_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    sparsity: float,
    total_steps: int,
    scorer: str | Scorer = "magnitude",
    schedule: str | Schedule = "agp",
    allocation: str | Allocation = "global",
    pattern: str | Pattern = "unstructured",
    regrowth: str | Regrowth | None = None,
    regularizer: str | Regularizer | None = None,
    **options,
) -> Pruner:
    """A Pruner built from names or objects and attached to ``optimizer``; ``options`` go to ``Pruner``."""
    pruner = Pruner(
        model,
        sparsity=sparsity,
        total_steps=total_steps,
        scorer=_part(SCORERS, scorer, "scorer"),
        schedule=_part(SCHEDULES, schedule, "schedule"),
        allocation=_part(ALLOCATIONS, allocation, "allocation"),
        pattern=_part(PATTERNS, pattern, "pattern"),
        regrowth=_part(REGROWTHS, regrowth, "regrowth", optional=True),
        regularizer=_part(REGULARIZERS, regularizer, "regularizer", optional=True),
        **options,
    )
    return pruner.attach(optimizer)
