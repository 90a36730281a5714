"""Models: a registry of small built-in architectures, or any ``nn.Module`` named by ``_target_``."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from torch import nn

from ..config import ConfigError, NamedConfig, parse
from ..engine.registry import Registry

MODELS: Registry[Any] = Registry("model")

from . import cnn, gpt, mlp  # noqa: E402,F401  (registers)


def build_model(config: NamedConfig, meta: dict[str, Any]) -> nn.Module:
    """Instantiate the model a config names, sized by the dataset's ``meta`` (input shape, classes, vocabulary)."""
    if "_target_" in config.params:
        return build_own_model(config.params)
    if config.name not in MODELS:
        raise ConfigError("model", f"unknown model {config.name!r}; allowed: {', '.join(MODELS.names())}")
    spec = parse(MODELS.get(config.name), config.params, "model")
    return spec.build(meta)


def build_own_model(params: dict[str, Any]) -> nn.Module:
    """A user's own ``nn.Module`` class, named by ``_target_`` and called with the other keys as plain values.

    Only a subclass of ``nn.Module`` is called, and no nested ``_target_`` or other Hydra directive is honoured:
    a saved config (read again by ``patcli export``, ``load_pruned`` or a baseline's dense run) could otherwise
    name ``torch.load`` or a file deletion to run, as Hydra's ``instantiate`` would.
    """
    target, kwargs = params["_target_"], {k: v for k, v in params.items() if k != "_target_"}
    directive = _directive(kwargs)
    if directive:
        raise ConfigError(f"model.{directive}", "Hydra directives are not followed here; allowed: plain values "
                                                "(numbers, strings, lists, mappings) for the class's arguments")
    cls = _import(str(target))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError("model._target_", f"{target} is not an nn.Module class; allowed: the dotted path of a subclass "
                                            "of torch.nn.Module")
    try:
        return cls(**kwargs)
    except Exception as error:  # a user's class: report its own message on one line
        raise ConfigError("model._target_", f"could not build {target}: {error.__class__.__name__}: {error}") from error


def _directive(values: Any, path: str = "") -> str | None:
    """The first Hydra directive key (``_target_``, ``_args_``, ``_partial_``, ...) anywhere in ``values``."""
    if isinstance(values, dict):
        for key, value in values.items():
            name = f"{path}{key}"
            if str(key).startswith("_") and str(key).endswith("_"):
                return name
            found = _directive(value, f"{name}.")
            if found:
                return found
    elif isinstance(values, list):
        return next(filter(None, (_directive(v, f"{path}{i}.") for i, v in enumerate(values))), None)
    return None


def _import(path: str) -> Any:
    """The object a dotted path names (``pkg.module.Class`` or a nested ``pkg.module.Outer.Inner``); an import that
    fails inside the user's module says why (Hydra's own message drops the cause)."""
    parts = path.split(".")
    if len(parts) < 2:
        raise ConfigError("model._target_", f"{path!r} is not a dotted path; allowed: package.module.Class")
    if parts[0] in sys.stdlib_module_names:  # no model lives there, and importing some (antigravity, this) acts
        raise ConfigError("model._target_", f"{parts[0]} is a standard-library module, not imported for a model; "
                                            "allowed: the dotted path of your own nn.Module subclass")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes
        module_name = ".".join(parts[:split])
        try:
            found: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name + ".").startswith(error.name + "."):
                continue  # this prefix is no module: a shorter one may be, with classes inside
            raise ConfigError("model._target_", f"importing {module_name} failed: {error}") from error
        except Exception as error:
            raise ConfigError("model._target_", f"importing {module_name} failed: {error.__class__.__name__}: {error}") from error
        for attribute in parts[split:]:
            if not hasattr(found, attribute):
                raise ConfigError("model._target_", f"{module_name} has no {'.'.join(parts[split:])!r}")
            found = getattr(found, attribute)
        return found
    raise ConfigError("model._target_", f"no module {parts[0]!r} to import {path} from; allowed: a class importable from "
                                        "where patcli runs")
