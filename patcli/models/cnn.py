"""A small conv net with BatchNorm for 8×8 digit images: the filter-pruning model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import ConfigError
from . import MODELS


@MODELS.register("cnn")
@dataclass
class CNN:
    """conv3×3-BN-ReLU blocks (``channels``), max-pooling after the second, global average pooling, a linear head.

    Flat inputs are reshaped to the dataset's ``image_shape``, so the digits default (flat 64) works as is.
    """

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])

    def validate(self, prefix: str) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"{prefix}.channels", f"{self.channels} is not allowed; allowed: a non-empty list of widths >= 1")

    def build(self, meta: dict[str, Any]) -> nn.Module:
        if "vocab_size" in meta:
            raise ConfigError("model", "model=cnn classifies images; allowed for a language-modelling dataset: model=gpt "
                                       "(or a model of your own)")
        image = meta.get("image_shape") or meta["input_shape"]
        if len(image) != 3:
            raise ConfigError("model", f"model=cnn needs image data (channels, height, width); the dataset gives {image}")
        flat = len(meta["input_shape"]) == 1 and meta["input_shape"][0] == math.prod(image)
        layers: list[nn.Module] = [nn.Unflatten(1, tuple(image))] if flat else []
        width = image[0]
        for i, out in enumerate(self.channels):
            layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            width = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, meta["num_classes"])]
        return nn.Sequential(*layers)
