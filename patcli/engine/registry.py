"""Name → class registries, so adding a scorer/schedule/allocator is one class plus one YAML file."""

from __future__ import annotations

import dataclasses
import hashlib
import functools
import inspect
import numbers
import types
import typing
from typing import Any, Callable, Generic, TypeVar

import numpy as np

T = TypeVar("T")


class ParamError(ValueError):
    """An engine part's parameter out of its allowed range; ``field`` names it (the config adds the prefix)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


SEED_LIMIT = 2**63  # seeds torch, numpy and Python all take


def stream_seed(seed: int, *tags: object) -> int:
    """A generator seed for one named random stream of a run: seed + k, or the seed itself, would replay the stream
    that initialised the model (torch.manual_seed(seed)) or another seed's stream."""
    digest = hashlib.sha256(":".join(map(str, (seed, *tags))).encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_LIMIT


def check_seed(seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise ParamError("seed", f"{seed} is out of range; allowed: 0 <= seed < 2**63")


class UnknownName(ValueError, KeyError):
    """A name no entry has: a ValueError as the engine's other argument errors are (and a KeyError, as a lookup)."""

    def __str__(self) -> str:  # the message as written, not quoted as a KeyError's key would be
        return str(self.args[0])


class Registry(Generic[T]):
    """A dictionary of named classes with a decorator to fill it and an error that lists what exists."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cls.name = name  # type: ignore[attr-defined]
            if dataclasses.is_dataclass(cls):
                cls.__init__ = _type_checked(cls, f"{self.kind} {name!r}")  # type: ignore[method-assign]
            self._entries[name] = cls
            return cls

        return add

    def get(self, name: str) -> type[T]:
        if name not in self._entries:
            raise UnknownName(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def _type_checked(cls: type, label: str) -> Callable:
    """``cls.__init__`` that first checks each argument against its field's type hint: the engine built in Python
    refuses a wrong type with a TypeError naming the argument, as the CLI's config does, before any range check
    compares a string with a number."""
    init = cls.__init__
    signature = inspect.signature(init)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a hint only a type checker resolves (a name imported under TYPE_CHECKING): not checked
        return init

    @functools.wraps(init)
    def checked(self, *args, **kwargs) -> None:
        for field, value in signature.bind(self, *args, **kwargs).arguments.items():
            hint = hints.get(field)
            if field != "self" and hint is not None and not _is_a(value, hint):
                raise TypeError(f"{label}: {field} must be {_describe(hint)}, got {value!r}")
        init(self, *args, **kwargs)

    return checked


def _is_a(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):  # list[float], tuple[float, ...]: each element too
        element = next((arg for arg in typing.get_args(hint) if arg is not Ellipsis), None)
        return isinstance(value, (list, tuple, np.ndarray)) and (
            element is None or all(_is_a(item, element) for item in value))
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        element = next((arg for arg in typing.get_args(hint) if arg is not Ellipsis), None)
        plural = {int: "ints", float: "numbers", str: "strings", bool: "booleans"}.get(element)
        return f"a list of {plural}" if plural else "a list"
    return {int: "an int", float: "a number", str: "a string", bool: "true or false", type(None): "None"}.get(
        hint, getattr(typing.get_origin(hint), "__name__", str(hint)))
