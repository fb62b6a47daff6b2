"""Name → class registries for methods, initialisers, optimisers and rank schedules.

Each registry is filled by the modules of one package: `Registry.load_package` imports
every submodule, so adding a method is one new file that decorates its class with
`@REGISTRY.register("name")`.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The choices that look most like `name` (case-insensitive), best first."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    hits += [c for c in choices if name.lower() in c.lower() and c.lower() not in hits]
    return [lowered.get(h, h) for h in hits][:n]


def unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    """'unknown method 'lorra'; did you mean: lora? Known: ...' — the one wording for every registry."""
    choices = sorted(choices)
    hint = close_matches(name, choices)
    msg = f"unknown {kind} {name!r}"
    if hint:
        msg += f"; did you mean: {', '.join(hint)}?"
    return msg + f" Known {kind}s: {', '.join(choices) or '(none)'}."


class Registry(Generic[T]):
    """A named collection of classes or factories of one kind, e.g. adapter methods."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def load_package(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> T:
        self.load_package()
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(unknown_name_message(self.kind, name, self._items)) from None

    def names(self) -> list[str]:
        self.load_package()
        return sorted(self._items)

    def items(self) -> list[tuple[str, Any]]:
        self.load_package()
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        self.load_package()
        return name in self._items
