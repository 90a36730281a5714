"""Engine parts that cannot work together, checked alike for the CLI and for a Pruner built in Python."""

from __future__ import annotations

from .patterns import CHANNEL_MODES
from .regrowth import Regrowth
from .regularizers import Regularizer
from .schedules import Schedule


class CombinationError(ValueError):
    """Two parts that cannot work together; ``key`` is the CLI option to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def name_of(part) -> str:
    """A registered part's name; a user's own subclass, never registered, goes by its class name."""
    return getattr(part, "name", type(part).__name__)


def check_combination(schedule: Schedule, mode: str, masking: str, regrowth: Regrowth, regularizer: Regularizer | None,
                      scorer=None, allocation=None) -> None:
    """Raise CombinationError saying why, in one line; ``mode`` is the pattern's name (unstructured, nm, neurons, ...).

    ``scorer``/``allocation`` (None: the default) are refused where the run would not use them: the record would name
    a recipe that never ran.
    """
    schedule_name, regrowth_name = name_of(schedule), name_of(regrowth)
    scorer_name = "magnitude" if scorer is None else name_of(scorer)
    if regrowth.replaces_schedule:
        if mode != "unstructured":  # first: pruning=nm sets the allocation itself (uniform), which is no user's choice
            raise CombinationError("regrowth", f"regrowth={regrowth_name} drops and regrows single weights; allowed with "
                                   f"pruning=unstructured (got pruning={mode})")
        if scorer_name != "magnitude":
            raise CombinationError("scorer", f"regrowth={regrowth_name} drops the smallest weights by magnitude; allowed "
                                   f"with scorer=magnitude (got scorer={scorer_name})")
        if allocation is not None and name_of(allocation) != "global":
            raise CombinationError("allocation", f"regrowth={regrowth_name} spreads the sparsity over layers by "
                                   f"regrowth.init (erk or random); allowed: allocation=global, the default, which it "
                                   f"leaves unused (got allocation={name_of(allocation)})")
        if schedule_name != "constant":
            raise CombinationError("regrowth", f"regrowth={regrowth_name} is sparse at the target from the first step and "
                                   f"decides its own updates; allowed with schedule=constant (got schedule={schedule_name})")
        if masking != "inplace":
            raise CombinationError("pruning.masking", f"regrowth={regrowth_name} regrows weights at zero, which a dense "
                                   "copy would overwrite; allowed with pruning.masking=inplace")
    if regrowth_name == "reversal" and schedule_name == "alternating":
        raise CombinationError("regrowth", "regrowth=reversal and schedule=alternating both lift masks, in different "
                               "ways; allowed: one of them")
    if regularizer is None:
        return
    if scorer_name != "magnitude":
        raise CombinationError("scorer", f"regularizer={name_of(regularizer)} zeroes weights by its penalty and closes "
                               f"by magnitude; allowed with scorer=magnitude (got scorer={scorer_name})")
    if regrowth_name != "none":
        raise CombinationError("regularizer", f"regularizer={name_of(regularizer)} masks what it zeroes, which regrowth="
                               f"{regrowth_name} would undo; allowed with regrowth=none")
    if masking != "inplace":
        raise CombinationError("regularizer", "the proximal step acts on the weights themselves; allowed with "
                               "pruning.masking=inplace")
    if name_of(regularizer) == "group_lasso" and mode not in CHANNEL_MODES:
        raise CombinationError("regularizer", "regularizer=group_lasso shrinks whole channels; allowed with "
                               f"pruning=neurons, filters or heads (got pruning={mode})")
    if name_of(regularizer) == "lasso" and mode != "unstructured":
        raise CombinationError("regularizer", "regularizer=lasso shrinks single weights; allowed with "
                               f"pruning=unstructured (got pruning={mode}; use group_lasso for channels)")
