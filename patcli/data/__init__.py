"""Offline datasets: a registry of small built-in ones plus loaders for users' own files.

Every dataset is split once into train / val / test tensors. Validation serves every choice made during or
about a run; test is evaluated once, at the end.
"""

from __future__ import annotations

from .base import DATASETS, DataBundle, Split, data_fingerprint, load_dataset
from . import digits, text  # noqa: F401  (registers)

__all__ = ["DATASETS", "DataBundle", "Split", "data_fingerprint", "load_dataset"]
