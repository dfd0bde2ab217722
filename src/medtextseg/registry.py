"""Name -> object registries that a new file joins by itself.

A package whose modules register things (methods, pre-training modules, networks) calls
:func:`import_submodules` in its ``__init__``: every module of it is imported once, each
registers what it defines, and nothing lists the files anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping ``name -> T`` filled by :meth:`add` (in registration order).

    Args:
        kind: what is registered ("method", "network"), for messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` as ``name``.

        Raises:
            ValueError: ``name`` is registered already (two files claim one name).
        """
        old = self._items.get(name)
        if old is not None and not _same_class(old, item):
            raise ValueError(f"{self.kind} {name!r} is registered twice: by {self._items[name]!r} and {item!r}")
        self._items[name] = item
        return item

    def get_or_raise(self, name: str) -> T:
        """The item registered as ``name``.

        Raises:
            ValueError: unknown name (the message lists the registered ones).
        """
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._items)})"


def _same_class(a: object, b: object) -> bool:
    # A module imported again (importlib.reload, a test that re-imports) defines its class
    # anew: that is the same registration, not a second file claiming the name.
    return isinstance(a, type) and isinstance(b, type) and (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of ``package`` (its ``__name__`` and ``__path__``), sorted by name."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")


__all__ = ["Registry", "import_submodules"]
