"""Name → class registries, so adding a scorer/schedule/allocator is one class plus one YAML file."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class ParamError(ValueError):
    """An engine part's parameter out of its allowed range; ``field`` names it (the config adds the prefix)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
            self._entries[name] = cls
            return cls

        return add

    def get(self, name: str) -> type[T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
