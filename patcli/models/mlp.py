"""A plain multilayer perceptron: the default model (64-256-256-10 on digits)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import ConfigError
from . import MODELS

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@MODELS.register("mlp")
@dataclass
class MLP:
    """Hidden widths, activation and dropout; input and output sizes come from the dataset."""

    hidden: list[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    dropout: float = 0.0

    def validate(self, prefix: str) -> None:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"{prefix}.hidden", f"{self.hidden} is not allowed; allowed: a non-empty list of widths >= 1")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{prefix}.activation", f"{self.activation!r} is not allowed; allowed: {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout", f"{self.dropout} is out of range; allowed: 0 <= value < 1")

    def build(self, meta: dict[str, Any]) -> nn.Module:
        if "vocab_size" in meta:  # token ids are no feature vectors (the mirror of gpt's own check)
            raise ConfigError("model", "model=mlp classifies feature vectors; allowed for a language-modelling dataset: "
                                       "model=gpt (or a model of your own)")
        widths = [math.prod(meta["input_shape"]), *self.hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[self.activation]()]
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
        layers.append(nn.Linear(widths[-1], meta["num_classes"]))
        return nn.Sequential(*layers)
