"""Importance per weight (higher = keep). Gradient-based scores accumulate between mask updates on the device.

``observe`` runs before every optimizer step, while ``.grad`` holds the gradient at the weights the forward used;
it launches a few ``_foreach`` kernels and never syncs with the host. Each accumulating scorer holds one float
tensor per prunable weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .masks import tensor_bytes
from .registry import Registry, check_seed, stream_seed

SCORERS: Registry["Scorer"] = Registry("scorer")


@dataclass
class Scorer:
    """Base scorer: magnitude-free defaults for the accumulation hooks."""

    needs_grad = False
    takes_missing_grads = False  # False: a weight without a gradient at a step is observed with a zero gradient
    signed = False  # scores may be negative, and their sign matters (a channel sums them rather than taking a norm)

    def observe(self, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """See one step's gradients (only called when ``needs_grad``)."""

    def scores(self, weights: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Scores shaped like ``weights``, in tensors the caller may overwrite: fresh ones, or ``out`` (buffers shaped
        and typed like the weights, reused across updates) where the scorer can write there."""
        raise NotImplementedError

    def reset(self) -> None:
        """Start a new accumulation window (after each mask update)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def state_bytes(self) -> int:
        """Bytes of the tensors this scorer holds between mask updates (a scorer of one's own: its state's)."""
        return tensor_bytes(self.state_dict().values())


@SCORERS.register("magnitude")
@dataclass
class Magnitude(Scorer):
    """|w|: the classic criterion (Han et al. 2015; Zhu & Gupta 2017)."""

    def scores(self, weights: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if out is None:
            return [w.detach().abs() for w in weights]
        return [torch.abs(w.detach(), out=o) for w, o in zip(weights, out)]


@SCORERS.register("random")
@dataclass
class Random(Scorer):
    """Uniform random scores: the control every criterion must beat. Seeded, so every process draws the same."""

    seed: int = 0
    _draws: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        check_seed(self.seed)

    def scores(self, weights: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(stream_seed(self.seed, "scorer.random", self._draws))
        self._draws += 1
        if out is not None:  # buffers are only handed out on CPU, where this generator draws
            return [torch.rand(w.shape, generator=generator, dtype=o.dtype, out=o) for w, o in zip(weights, out)]
        return [torch.rand(w.shape, generator=generator).to(w.device) for w in weights]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"draws": torch.tensor(self._draws)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._draws = int(state["draws"])


@dataclass
class Accumulating(Scorer):
    """Sums a per-step statistic of (w, g) since the last mask update, and averages it over the steps since.

    Counts live on the host: they are known without asking the device, so counting costs no kernel. A mask update
    closes the window, and a tensor's next gradient opens its new one (the steps of the window it had no gradient
    for count as zeros, as a layer used on some steps only should score): until then its scores stay the closed
    window's, so an update with no step since the last (``Pruner.finish`` right after one), or over a layer frozen
    since, ranks by what was seen, not by all-zero sums that would prune in index order.
    """

    needs_grad = True
    takes_missing_grads = True  # ``observe`` gets None for a weight without a gradient at this step
    _sums: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    _window: int = field(default=0, init=False, repr=False)  # steps since the last mask update
    _closed: list[bool] = field(default_factory=list, init=False, repr=False)  # no gradient since the last update
    _closed_counts: list[int] = field(default_factory=list, init=False, repr=False)  # steps of a closed tensor's window

    def accumulate(self, sums: list[torch.Tensor], weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Add this step's statistic into ``sums`` in place."""
        raise NotImplementedError

    def observe(self, weights: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        if not self._sums:
            self._sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
            self._closed, self._closed_counts = [False] * len(weights), [0] * len(weights)
        if True in self._closed and (opening := [i for i, g in enumerate(grads) if g is not None and self._closed[i]]):
            torch._foreach_zero_([self._sums[i] for i in opening])
            for i in opening:
                self._closed[i] = False
        if any(g is None for g in grads):  # a frozen or unused layer: only the others add to their sums
            live = [i for i, g in enumerate(grads) if g is not None]
            if live:
                self.accumulate([self._sums[i] for i in live], [weights[i] for i in live], [grads[i] for i in live])
        else:
            self.accumulate(self._sums, weights, grads)
        self._window += 1

    def mean(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self._sums:
            raise RuntimeError(f"scorer {self.name!r} needs gradients, but none were observed before the mask update")
        return [s / max(self._closed_counts[i] if self._closed[i] else self._window, 1) for i, s in enumerate(self._sums)]

    def reset(self) -> None:
        self._closed_counts = [c if closed else self._window for c, closed in zip(self._closed_counts, self._closed)]
        self._closed = [True] * len(self._sums)
        self._window = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self._sums:
            return {}
        return {"count": torch.tensor(float(self._window)), "closed": torch.tensor(self._closed),
                "closed_counts": torch.tensor(self._closed_counts, dtype=torch.float64),
                **{f"sum.{i}": s.clone() for i, s in enumerate(self._sums)}}

    def state_bytes(self) -> int:  # the accumulators held, without copying them as state_dict() does
        return tensor_bytes(self._sums)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "count" not in state:  # saved before its first step: nothing accumulated yet
            self._sums, self._window, self._closed, self._closed_counts = [], 0, [], []
            return
        self._sums = [state[f"sum.{i}"].clone() for i in range(sum(key.startswith("sum.") for key in state))]
        count, closed = int(state["count"]), state.get("closed", torch.tensor(False))
        if closed.dim():
            self._window, self._closed = count, closed.tolist()
            self._closed_counts = [int(c) for c in state["closed_counts"].tolist()]
        else:  # older states kept one window for every tensor (and before that, none closed lazily)
            self._window = 0 if bool(closed) else count
            self._closed, self._closed_counts = [bool(closed)] * len(self._sums), [count] * len(self._sums)


@SCORERS.register("gradient")
@dataclass
class Gradient(Accumulating):
    """First-order Taylor |w·g| (Molchanov et al. 2017), averaged over the steps since the last update."""

    def accumulate(self, sums: list[torch.Tensor], weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        products = torch._foreach_mul(weights, grads)
        torch._foreach_abs_(products)
        torch._foreach_add_(sums, products)

    def scores(self, weights: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        return self.mean(weights)


@SCORERS.register("movement")
@dataclass
class Movement(Accumulating):
    """−Σ w·g (Sanh et al. 2020): weights the optimizer pushes away from zero score high.

    The sum is not reset at mask updates: movement is a property of the whole fine-tuning trajectory.
    """

    signed = True

    def accumulate(self, sums: list[torch.Tensor], weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        torch._foreach_addcmul_(sums, weights, grads, value=-1.0)

    def scores(self, weights: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        self.mean(weights)  # raises if nothing was observed
        return [s.clone() for s in self._sums]

    def reset(self) -> None:
        pass  # the window never closes


@SCORERS.register("hessian")
@dataclass
class Hessian(Accumulating):
    """OBD saliency ½·F·w² with F the diagonal Fisher, estimated as the mean of squared mini-batch gradients.

    This is the *mini-batch* empirical Fisher, not the per-sample one. For a weight whose per-sample gradients have
    mean μ and variance σ², a squared mini-batch gradient averages μ² + σ²/B, the per-sample Fisher μ² + σ²: near
    convergence (μ ≈ 0) ours is the per-sample Fisher scaled by 1/B, the same for every weight, but a weight with a
    steady gradient (large μ²/σ²) ranks higher than the per-sample Fisher would rank it. We compute it because it
    costs one fused multiply-add per step on the gradients the step already has, for any layer type, where
    per-sample gradients cost B backward passes or per-layer hooks.
    """

    def accumulate(self, sums: list[torch.Tensor], weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        torch._foreach_addcmul_(sums, grads, grads)

    def scores(self, weights: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        fisher = self.mean(weights)
        return [0.5 * f * w.detach().float() ** 2 for f, w in zip(fisher, weights)]
