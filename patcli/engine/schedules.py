"""Sparsity schedules: the target sparsity at optimizer step t and the steps at which masks change.

Step t counts optimizer steps from 0. Masks change at steps ``begin <= t <= end`` with
``(t - begin) % frequency == 0``, and always at ``end`` itself, so the final target is reached exactly even when
``end - begin`` is not a multiple of ``frequency`` (the bug in TF-MOT#684). ``begin``/``end`` are steps when given
as ints and fractions of the run's total steps when given as floats.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .registry import ParamError, Registry

SCHEDULES: Registry["Schedule"] = Registry("schedule")


class ScheduleError(ValueError):
    """A schedule that cannot run in the given number of steps; carries the offending config key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def as_int_or_float(value: object, key: str, expected: str) -> int | float:
    """A Python int or float from any integer or real number (numpy's too: ``epochs * np.int64(batches)``)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ScheduleError(key, f"expected {expected}, got {value!r}")


def to_step(value: int | float, total_steps: int, key: str) -> int:
    """An int is a step; a float in [0, 1] is a fraction of the run, clamped to its last step."""
    value = as_int_or_float(value, key, "a step (int) or a fraction of the run (float)")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ScheduleError(key, f"fraction {value} must be within 0.0 <= value <= 1.0")
        return min(int(round(value * total_steps)), total_steps - 1)
    if value < 0:
        raise ScheduleError(key, f"step {value} must be >= 0")
    if value > total_steps - 1:
        raise ScheduleError(key, f"step {value} is after the run's last step {total_steps - 1} (it has {total_steps} steps)")
    return value


def to_length(value: int | float, total_steps: int, key: str) -> int:
    """A phase's length: an int is a number of steps, at most the run's; a float in (0, 1] a fraction of the run (at
    least one step)."""
    value = as_int_or_float(value, key, "a number of steps (int) or a fraction of the run (float)")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ScheduleError(key, f"fraction {value} must be within 0.0 < value <= 1.0")
        return min(max(int(round(value * total_steps)), 1), total_steps)
    if not 1 <= value <= total_steps:
        raise ScheduleError(key, f"{value} steps is out of range; allowed: 1 to the run's {total_steps} steps, or a "
                                 "fraction of the run")
    return value


@dataclass
class Schedule:
    """Base schedule: subclasses give ``curve(p)`` for progress p in [0, 1]."""

    begin: int | float = 0
    end: int | float = 0.75
    initial_sparsity: float = 0.0
    final_sparsity: float = field(default=0.0, init=False)
    frequency: int = field(default=1, init=False)
    begin_step: int = field(default=0, init=False)
    end_step: int = field(default=0, init=False)

    def bind(self, total_steps: int, final_sparsity: float, frequency: int) -> "Schedule":
        """Resolve fractions against the run length; a run that would stop before ``end`` is rejected."""
        if total_steps < 1:
            raise ScheduleError("trainer.max_steps", "the run has no optimizer steps")
        if frequency < 1:
            raise ScheduleError("pruning.frequency", f"must be >= 1, got {frequency}")
        self.final_sparsity = float(final_sparsity)
        self.frequency = int(frequency)
        self.begin_step = to_step(self.begin, total_steps, "schedule.begin")
        self.end_step = to_step(self.end, total_steps, "schedule.end")
        if self.end_step < self.begin_step:
            raise ScheduleError("schedule.end", f"step {self.end_step} comes before schedule.begin (step {self.begin_step}); "
                                                f"allowed: a step >= {self.begin_step} or a fraction of the run at or after begin's")
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity:
            raise ScheduleError(
                "schedule.initial_sparsity",
                f"{self.initial_sparsity} must be within 0 <= value <= pruning.sparsity ({self.final_sparsity})",
            )
        return self

    def progress(self, t: int) -> float:
        if t < self.begin_step:
            return 0.0
        if self.end_step == self.begin_step:
            return 1.0
        return min(max((t - self.begin_step) / (self.end_step - self.begin_step), 0.0), 1.0)

    def target(self, t: int) -> float:
        """Target sparsity at step t (0 before ``begin``)."""
        if t < self.begin_step:
            return 0.0
        p = self.progress(t)
        # exactly the final target at the end: s_i + (s_f - s_i)·1 can land one ulp off and round the count the other way
        return self.final_sparsity if p >= 1.0 else self.curve(p)

    def curve(self, p: float) -> float:
        raise NotImplementedError

    def is_update_step(self, t: int) -> bool:
        if not self.begin_step <= t <= self.end_step:
            return False
        return (t - self.begin_step) % self.frequency == 0 or t == self.end_step

    lifts_masks = False  # True: masks_enforced is False in some phases (alternating)

    def masks_enforced(self, t: int) -> bool:
        """Whether pruned weights are held at zero at step t; only phase-based schedules lift masks."""
        return True

    def update_stride(self) -> int | None:
        """Steps between mask updates from ``begin`` (each schedule's last one falls at ``end``); None for a rule of
        one's own (``is_update_step`` overridden), whose steps are found one by one."""
        return self.frequency if type(self).is_update_step is Schedule.is_update_step else None

    def update_steps(self) -> list[int]:
        """Every step whose mask update the schedule asks for, listed by stride: walking a long run step by step
        (trainer.epochs=10**20) never ended."""
        stride = self.update_stride()
        if stride is None:
            return [t for t in range(self.begin_step, self.end_step + 1) if self.is_update_step(t)]
        return [*range(self.begin_step, self.end_step, stride), self.end_step]

    def update_count(self) -> int:
        """len(update_steps()), counted without listing them."""
        stride = self.update_stride()
        if stride is None:
            return len(self.update_steps())
        return -(-(self.end_step - self.begin_step) // stride) + 1


AGP_POWER = 3.0  # Zhu & Gupta's cubic ramp


@SCHEDULES.register("oneshot")
@dataclass
class OneShot(Schedule):
    """Prune to the final target once, at ``begin``."""

    end: int | float = field(default=0, init=False)  # always ``begin``: not a parameter

    def bind(self, total_steps: int, final_sparsity: float, frequency: int) -> "Schedule":
        self.end = self.begin
        return super().bind(total_steps, final_sparsity, frequency)

    def curve(self, p: float) -> float:
        return self.final_sparsity


@SCHEDULES.register("constant")
@dataclass
class Constant(Schedule):
    """The final target at every update from ``begin`` on: one-shot pruning at ``begin`` with masks that only grow;
    with reversal or regrowth the later updates re-choose which weights are kept."""

    def curve(self, p: float) -> float:
        return self.final_sparsity


@SCHEDULES.register("linear")
@dataclass
class Linear(Schedule):
    """s_i + (s_f - s_i)·p."""

    def curve(self, p: float) -> float:
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * p


@SCHEDULES.register("cubic")
@dataclass
class Cubic(Schedule):
    """s_i + (s_f - s_i)·p³, as the source article writes it: prunes slowly at first."""

    def curve(self, p: float) -> float:
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * p**3


@SCHEDULES.register("agp")
@dataclass
class AGP(Schedule):
    """Automated gradual pruning (Zhu & Gupta 2017; TF-MOT PolynomialDecay): s_f + (s_i - s_f)·(1 - p)^power."""

    power: float = AGP_POWER

    def __post_init__(self) -> None:
        check_power(self.power)

    def curve(self, p: float) -> float:
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** self.power


def check_power(power: float) -> None:
    if not 0 < power < math.inf:  # inf is one-shot in disguise (and no JSON number in the record)
        raise ParamError("power", f"{power} is out of range; allowed: 0 < value < inf")


@SCHEDULES.register("polynomial")
@dataclass
class Polynomial(AGP):
    """AGP with a configurable power (TF-MOT's name for it)."""


@SCHEDULES.register("exponential")
@dataclass
class Exponential(Schedule):
    """Density decays geometrically: 1 - s = (1 - s_i)·((1 - s_f)/(1 - s_i))^p."""

    def curve(self, p: float) -> float:
        density_initial, density_final = 1.0 - self.initial_sparsity, 1.0 - self.final_sparsity
        return 1.0 - density_initial * (density_final / density_initial) ** p


@SCHEDULES.register("alternating")
@dataclass
class Alternating(Schedule):
    """The article's odd/even scheme, ≈ AC/DC (Peste et al. 2021): compressed and decompressed phases alternate.

    After a dense warm-up (until ``begin``), compressed phases of ``compressed`` steps — masks chosen afresh from
    all weights at the target the ``ramp`` schedule gives where the phase ends (so the first phase is already
    sparse; read where it starts, it would be dense), and enforced — alternate with
    decompressed phases of ``decompressed`` steps in which every weight trains. The last ``final`` steps are one
    compressed phase at the final target (fine-tuning). Momentum and Adam moments of pruned weights are reset at
    the start of each compressed phase. Lengths are steps (int) or fractions of the run (float).
    """

    begin: int | float = 0.1
    end: int | float = field(default=0.0, init=False)  # where the final phase starts: set by ``final``
    compressed: int | float = 0.1
    decompressed: int | float = 0.05
    final: int | float = 0.25
    ramp: str = "agp"
    power: float = AGP_POWER
    monotone = False
    lifts_masks = True
    resets_optimizer_state = True

    def __post_init__(self) -> None:
        check_power(self.power)
        if self.ramp not in ("agp", "linear", "cubic", "constant", "exponential"):
            raise ParamError("ramp", f"{self.ramp!r} is not allowed; allowed: agp, linear, cubic, constant, exponential")
        for key in ("compressed", "decompressed", "final"):
            if getattr(self, key) <= 0:  # a phase of no steps: the schedule would not alternate, or not end compressed
                raise ParamError(key, f"{getattr(self, key)} is out of range; allowed: a step count >= 1 or a fraction "
                                      "of the run > 0")
        if self.ramp != "agp" and self.power != AGP_POWER:  # the other ramps have fixed shapes: it would be ignored
            raise ParamError("power", f"{self.power} is used only by ramp=agp; allowed with ramp={self.ramp}: {AGP_POWER} (the default)")

    def bind(self, total_steps: int, final_sparsity: float, frequency: int) -> "Schedule":
        final_steps = to_length(self.final, total_steps, "schedule.final")
        self.end = total_steps - final_steps  # masks reach the final target where the final phase starts
        warm_up = to_step(self.begin, total_steps, "schedule.begin")
        if self.end <= warm_up:
            raise ScheduleError(
                "schedule.final",
                f"the final phase ({final_steps} steps) starts at step {self.end}, not after the warm-up "
                f"(schedule.begin = step {warm_up})",
            )
        super().bind(total_steps, final_sparsity, frequency)
        self.compressed_steps = to_length(self.compressed, total_steps, "schedule.compressed")
        self.decompressed_steps = to_length(self.decompressed, total_steps, "schedule.decompressed")
        params = {"power": self.power} if self.ramp == "agp" else {}
        self._ramp = SCHEDULES.get(self.ramp)(begin=self.begin_step, end=self.end_step, initial_sparsity=self.initial_sparsity, **params)
        self._ramp.bind(total_steps, final_sparsity, frequency)
        return self

    def curve(self, p: float) -> float:
        return self._ramp.curve(p)

    def target(self, t: int) -> float:
        """The ramp read where this compressed phase ends, so even the first phase is sparse."""
        if t < self.begin_step:
            return 0.0
        return self._ramp.target(min(t + self.compressed_steps, self.end_step))

    def phase(self, t: int) -> str:
        """dense (warm-up) | compressed | decompressed, for optimizer step t."""
        if t < self.begin_step:
            return "dense"
        if t >= self.end_step:
            return "compressed"
        cycle = self.compressed_steps + self.decompressed_steps
        return "compressed" if (t - self.begin_step) % cycle < self.compressed_steps else "decompressed"

    def is_update_step(self, t: int) -> bool:
        if t == self.end_step:
            return True
        cycle = self.compressed_steps + self.decompressed_steps
        return self.begin_step <= t < self.end_step and (t - self.begin_step) % cycle == 0

    def masks_enforced(self, t: int) -> bool:
        return self.phase(t) == "compressed"

    def update_stride(self) -> int | None:  # each compressed phase starts with an update, the final one at end
        own = type(self).is_update_step is Alternating.is_update_step
        return self.compressed_steps + self.decompressed_steps if own else None


@SCHEDULES.register("fixed")
@dataclass
class Fixed(Schedule):
    """Masks set before training (a post-training prune, or ``Pruner.update_masks``) are enforced, never changed."""

    end: int | float = 0

    def curve(self, p: float) -> float:
        return self.final_sparsity

    def is_update_step(self, t: int) -> bool:
        return False

    def update_stride(self) -> int | None:
        return None  # no update at all: found one by one, from begin to end
