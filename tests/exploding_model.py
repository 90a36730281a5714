"""A user model for sweep tests (``model=custom model._target_=exploding_model.Exploding``): its forward raises in
training when told to, so one job of a sweep fails at run time while its config is valid (and its sizes pass the
planning check, a forward pass without gradients)."""

from __future__ import annotations

import torch
from torch import nn


class Exploding(nn.Module):
    def __init__(self, explode: bool = False) -> None:
        super().__init__()
        self.explode = explode
        self.linear = nn.Linear(64, 10)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.explode and torch.is_grad_enabled():
            raise RuntimeError("exploded on purpose")
        return self.linear(inputs)
