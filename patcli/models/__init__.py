"""Models: a registry of small built-in architectures, or any ``nn.Module`` named by ``_target_``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ConfigError, NamedConfig, parse
from ..engine.registry import Registry

MODELS: Registry[Any] = Registry("model")

from . import cnn, gpt, mlp  # noqa: E402,F401  (registers)


def build_model(config: NamedConfig, meta: dict[str, Any]) -> nn.Module:
    """Instantiate the model a config names, sized by the dataset's ``meta`` (input shape, classes, vocabulary)."""
    if "_target_" in config.params:
        from hydra.utils import instantiate

        try:
            model = instantiate(config.params)
        except Exception as error:  # a user's class: report its own message on one line
            raise ConfigError("model._target_", f"could not build {config.params['_target_']}: {error}") from error
        if not isinstance(model, nn.Module):
            raise ConfigError("model._target_", f"{config.params['_target_']} did not return an nn.Module")
        return model
    if config.name not in MODELS:
        raise ConfigError("model", f"unknown model {config.name!r}; allowed: {', '.join(MODELS.names())}")
    spec = parse(MODELS.get(config.name), config.params, "model")
    return spec.build(meta)
