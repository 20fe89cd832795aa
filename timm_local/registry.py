"""The one table behind each extension point: methods by name, family adapters by model class, dataset
recipes by name.

Each table maps a key to what a user may add, and they share three things: registering (a later entry
under the same key replaces the earlier one, so a notebook can redefine its method), removing, and a
lookup whose failure is a one-line error naming the known keys, in the table's own words. A table is a
``dict``, so reading it (``in``, ``.get``, iteration) is plain Python. timm's registry is not reused:
it registers model constructors only (entrypoints with pretrained tags), not arbitrary classes.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, Iterable, Optional, TypeVar

__all__ = ["Registry"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Registry(dict, Generic[K, V]):
    """A dict of one kind of extension with the error its lookup raises for an unknown key.

    Args:
        unknown: builds the lookup's error from the key as the user gave it and the sorted known keys
            (default: a ``KeyError`` naming both).
        entries: the initial ``(key, value)`` pairs (a built-in table).
        normalise: the key a user's spelling stands for (``Fashion-MNIST`` -> ``fashion_mnist``); applied by
            :meth:`lookup` only, so stored keys are always the canonical ones.
    """

    def __init__(self, unknown: Optional[Callable[[Any, list[str]], Exception]] = None,
                 entries: Iterable[tuple[K, V]] = (), normalise: Optional[Callable[[Any], K]] = None) -> None:
        super().__init__(entries)
        self._unknown = unknown or _unknown_key
        self._normalise = normalise

    def register(self, key: K, value: V) -> V:
        """Add ``value`` under ``key``, replacing what was there; returns ``value`` (for decorators)."""
        self[key] = value
        return value

    def unregister(self, key: K) -> None:
        """Remove ``key`` if present (undoing a :meth:`register` in a test or a notebook)."""
        self.pop(key, None)

    def names(self) -> list[str]:
        """The keys, sorted: what an error message or a ``list_*`` function shows."""
        return sorted(str(key) for key in self)

    def lookup(self, key: Any) -> V:
        """The entry of ``key`` (after normalising it), or the registry's one-line error naming the known keys."""
        canonical = self._normalise(key) if self._normalise is not None else key
        if canonical not in self:
            raise self._unknown(key, self.names())
        return self[canonical]


def _unknown_key(key: Any, known: list[str]) -> Exception:
    return KeyError(f"unknown key {key!r}; known: {', '.join(known)}")
