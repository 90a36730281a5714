"""The dataset contract: tensors per split and what a model needs to know to fit them."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..config import ConfigError, NamedConfig, parse
from ..engine.registry import Registry

DATASETS: Registry[Any] = Registry("dataset")


@dataclass
class Split:
    """Inputs and targets of one split, in memory (every built-in dataset is a few MB at most)."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device) -> "Split":
        return Split(self.inputs.to(device), self.targets.to(device))

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches, shuffled when a generator is given; the last short batch is kept."""
        n = len(self)
        order = torch.randperm(n, generator=generator).to(self.inputs.device) if generator is not None else None
        for start in range(0, n, batch_size):
            if order is None:
                yield self.inputs[start : start + batch_size], self.targets[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield self.inputs[idx], self.targets[idx]


@dataclass
class DataBundle:
    """A dataset ready for training: splits plus the facts a model is built from (``meta``)."""

    name: str
    task: str
    train: Split
    val: Split
    test: Split
    meta: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None  # sha256 of the text a user's file gave; None for built-in data
    # what is wrong with the data, said in every run's log that uses it: a load is cached and reused by later runs
    warnings: list[str] = field(default_factory=list)

    @property
    def primary_metric(self) -> tuple[str, bool]:
        """(metric name, higher is better)."""
        return ("accuracy", True) if self.task == "classification" else ("loss", False)


def _frozen(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _cached_load(name: str, frozen_params: str, file_state: Any = None) -> DataBundle:
    cls = DATASETS.get(name)
    spec = parse(cls, json.loads(frozen_params), "dataset")
    return spec.load()


def load_dataset(config: NamedConfig) -> DataBundle:
    """Build (or reuse, within one process) the dataset a config names.

    A dataset read from a user's file is reused only while the file looks unchanged (``file_state``), so a process
    that runs again after an edit sees the edit; ``config.fingerprint`` keeps what this config's data was.
    """
    if config.name not in DATASETS:
        raise ConfigError("dataset", f"unknown dataset {config.name!r}; allowed: {', '.join(DATASETS.names())}")
    spec = parse(DATASETS.get(config.name), config.params, "dataset")
    state = spec.file_state() if hasattr(spec, "file_state") else None
    data = _cached_load(config.name, _frozen(config.params), state)
    config.fingerprint = data.fingerprint
    return data


def data_fingerprint(config: NamedConfig) -> str | None:
    """The content hash of the data a config reads from a user's file (loading it if this config has not yet);
    None for built-in data, whose config alone says what it is."""
    cls = DATASETS.get(config.name) if config.name in DATASETS else None
    if config.fingerprint is None and getattr(cls, "from_a_file", False):
        load_dataset(config)
    return config.fingerprint
