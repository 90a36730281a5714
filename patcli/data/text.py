"""Character-level language modelling: the installed Python standard library's sources, or a user's text file.

Text becomes windows of ``block_size`` characters (targets shifted by one), split by position into train /
validation / test so no window straddles two splits. The encoded corpus is cached on disk after the first build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..config import ConfigError
from .base import DATASETS, DataBundle, Split


UNKNOWN = "\x00"  # characters outside the vocabulary map here
MAX_UNKNOWN = 0.01  # a larger share of characters mapped to UNKNOWN is warned about


def cache_dir() -> Path:
    """PATCLI_CACHE, else $XDG_CACHE_HOME/patcli, else ~/.cache/patcli; an empty variable counts as unset."""
    if os.environ.get("PATCLI_CACHE"):
        return Path(os.environ["PATCLI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "patcli"


def read_cache(path: Path, notes: list[str]) -> tuple[torch.Tensor, list[str]] | None:
    """The cached encoding, or None; what went wrong is added to ``notes`` (the data's warnings, for every run log)."""
    if not os.path.isfile(path):  # never raises, unlike pathlib: an unreadable folder is said when writing
        return None
    try:
        cached = torch.load(path, weights_only=True)
        return cached["ids"], json.loads(bytes(cached["vocab"].tolist()).decode())
    except Exception as error:  # a damaged cache is only a cache: rebuild it
        notes.append(f"rebuilt the damaged dataset cache {path} ({error.__class__.__name__})")
        return None


def write_cache(path: Path, ids: torch.Tensor, vocab: list[str], notes: list[str]) -> None:
    """Atomically (a temporary file, then a rename); a folder that cannot be written only means no cache (said in
    ``notes``: each run then encodes the text again)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    vocab_bytes = torch.tensor(list(json.dumps(vocab).encode()), dtype=torch.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            torch.save({"ids": ids, "vocab": vocab_bytes}, file)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch's writer reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        notes.append(f"the dataset is not cached: {path.parent} is not a usable folder ({error.__class__.__name__}: "
                     f"{getattr(error, 'strerror', None) or error}); set PATCLI_CACHE to a writable folder to cache it")


def cached_encoding(name: str, text: Callable[[], str], max_vocab: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The encoded corpus from the cache file ``name``, else encoded from ``text()`` and cached; and what went wrong
    with the cache."""
    path, notes = cache_dir() / f"{name}.pt", []
    cached = read_cache(path, notes)
    if cached is not None:
        return *cached, notes
    ids, vocab = encode(text(), max_vocab)
    write_cache(path, ids, vocab, notes)
    return ids, vocab, notes


def read_stdlib(max_chars: int) -> str:
    """The standard library's .py files in sorted path order, concatenated up to ``max_chars`` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def encode(text: str, max_vocab: int) -> tuple[torch.Tensor, list[str]]:
    """Characters → ids; the ``max_vocab - 1`` most frequent characters keep their own id (ties by code point)."""
    counts: dict[str, int] = {}
    for char in text:
        counts[char] = counts.get(char, 0) + 1
    kept = sorted(sorted(counts, key=lambda c: (-counts[c], c))[: max_vocab - 1])
    vocab = [UNKNOWN, *kept]
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index.get(c, 0) for c in text], dtype=torch.uint8 if len(vocab) <= 256 else torch.int32)
    return ids, vocab


def windows(ids: torch.Tensor, block_size: int) -> Split:
    n = (ids.numel() - 1) // block_size
    inputs = ids[: n * block_size].long().reshape(n, block_size)
    targets = ids[1 : n * block_size + 1].long().reshape(n, block_size)
    return Split(inputs, targets)


@dataclass
class CharCorpus:
    """Shared settings of the character-level corpora."""

    block_size: int = 64
    max_chars: int = 2_000_000
    max_vocab: int = 128
    val_fraction: float = 0.05
    test_fraction: float = 0.05

    def validate(self, prefix: str) -> None:
        if not 8 <= self.block_size <= 4096:
            raise ConfigError(f"{prefix}.block_size", f"{self.block_size} is out of range; allowed: 8..4096")
        if not 2 <= self.max_vocab <= 65536:
            raise ConfigError(f"{prefix}.max_vocab", f"{self.max_vocab} is out of range; allowed: 2..65536")
        if self.max_chars < 10 * self.block_size:
            raise ConfigError(f"{prefix}.max_chars", f"{self.max_chars} is too small; allowed: >= 10 × block_size")
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, key) < 0.5:
                raise ConfigError(f"{prefix}.{key}", f"{getattr(self, key)} is out of range; allowed: 0 < value < 0.5")

    def encoded(self) -> tuple[torch.Tensor, list[str], str | None, list[str]]:
        """(ids, vocabulary, fingerprint of the text or None, the cache's warnings), from the cache when this build
        was made before."""
        raise NotImplementedError

    def load(self) -> DataBundle:
        ids, vocab, fingerprint, warnings = self.encoded()
        n = ids.numel()
        val_start = int(n * (1.0 - self.val_fraction - self.test_fraction))
        test_start = int(n * (1.0 - self.test_fraction))
        self.check_splits(n, {"training": val_start, "validation": test_start - val_start, "test": n - test_start})
        unknown = int((ids == 0).sum()) / n
        if unknown > MAX_UNKNOWN:
            warnings.append(f"{100 * unknown:.1f}% of the characters map to the unknown id: dataset.max_vocab="
                            f"{self.max_vocab} keeps only the {self.max_vocab - 1} most frequent, and predicting the "
                            "unknown id makes the loss look better than it is; raise dataset.max_vocab (allowed: up to 65536)")
        return DataBundle(
            name=self.name,
            task="language_modeling",
            train=windows(ids[:val_start], self.block_size),
            val=windows(ids[val_start:test_start], self.block_size),
            test=windows(ids[test_start:], self.block_size),
            meta={"vocab_size": len(vocab), "block_size": self.block_size, "input_shape": [self.block_size],
                  "num_classes": len(vocab)},
            fingerprint=fingerprint,
            warnings=warnings,
        )

    def check_splits(self, n: int, sizes: dict[str, int]) -> None:
        """Every split needs two blocks of characters (a window and its shifted targets, with room): an empty training
        split would otherwise surface later as a run of 0 steps, blaming the trainer."""
        need = 2 * self.block_size
        fix = {"training": "lower dataset.val_fraction or dataset.test_fraction",
               "validation": "raise dataset.val_fraction (below 0.5)", "test": "raise dataset.test_fraction (below 0.5)"}
        for split, size in sizes.items():
            if size < need:
                raise ConfigError("dataset", f"the {split} split has {size} of the text's {n} characters "
                                             f"({max(size - 1, 0) // self.block_size} windows of dataset.block_size="
                                             f"{self.block_size}; dataset.val_fraction={self.val_fraction}, "
                                             f"dataset.test_fraction={self.test_fraction}); allowed: at least {need} "
                                             f"characters (2 × block_size) in every split: {fix[split]}, lower "
                                             "dataset.block_size, or use a longer text")


@DATASETS.register("pysrc")
@dataclass
class PythonSources(CharCorpus):
    """The installed standard library's ``.py`` sources (tests excluded), deterministic order, first ``max_chars``."""

    def encoded(self) -> tuple[torch.Tensor, list[str], None, list[str]]:
        stdlib = sysconfig.get_paths()["stdlib"]  # and the exact Python: an update in place rewrites its sources
        key = hashlib.sha256(f"{stdlib}|{sys.version}|{self.max_chars}|{self.max_vocab}".encode()).hexdigest()[:16]
        ids, vocab, notes = cached_encoding(f"{self.name}-{key}", lambda: read_stdlib(self.max_chars), self.max_vocab)
        return ids, vocab, None, notes


@DATASETS.register("text")
@dataclass
class TextFile(CharCorpus):
    """A user's own UTF-8 text file (``dataset.path``)."""

    path: str | None = None
    from_a_file: ClassVar[bool] = True  # runs and caches are keyed on its content (base.data_fingerprint)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not self.path:
            raise ConfigError(f"{prefix}.path", "missing; allowed: the path of a UTF-8 text file")
        if not os.path.isfile(self.path):  # pathlib raises for a name too long or a folder it may not read
            raise ConfigError(f"{prefix}.path", f"{self.path} is not a file; allowed: the path of a UTF-8 text file")

    def text(self) -> str:
        """The first ``max_chars`` characters, read without reading the rest of the file. Bytes that are not UTF-8 are
        an error only within those characters (the decoder reads ahead). A byte order mark stays a character: runs
        are keyed on the text read, and dropping it would make older runs on such a file look like another file."""
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as file:
                text = file.read(self.max_chars)
        except OSError as error:
            raise ConfigError("dataset.path", f"{self.path} cannot be read ({error.strerror or error}); allowed: "
                                              "a readable UTF-8 text file") from error
        try:  # an undecodable byte was read as a lone surrogate, which cannot be encoded back
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ConfigError("dataset.path", f"{self.path} is not UTF-8 text (a byte that is not UTF-8 at character "
                                              f"{error.start}); allowed: a UTF-8 text file") from None
        return text

    def file_state(self) -> tuple | None:
        """What tells, without reading it, that the file changed since this process loaded it (ctime: even a copy
        with its modification time restored changes it)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns

    def encoded(self) -> tuple[torch.Tensor, list[str], str, list[str]]:
        """Keyed on the text itself: the cache cannot return another file's data, whatever its size and times."""
        text = self.text()
        fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
        key = hashlib.sha256(f"{fingerprint}|{self.max_vocab}".encode()).hexdigest()[:16]
        ids, vocab, notes = cached_encoding(f"{self.name}-{key}", lambda: text, self.max_vocab)
        return ids, vocab, fingerprint, notes
