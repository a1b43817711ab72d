"""The table of registered physics systems and the decorator that fills it.

Kept apart from the catalog (the lookups: by name, by import path, from a description): the
shipped systems register themselves here on import, and the catalog imports them lazily to list
them, so registration never needs an import back into the catalog.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twin_ml.physics.system import PhysicsSystem

# registered name -> class (the shipped systems once twin_ml.physics.systems is imported, plus any
# a user module registered)
SYSTEMS: dict[str, type[PhysicsSystem]] = {}
S = TypeVar("S", bound=type[PhysicsSystem])


def register_system(name: str) -> Callable[[S], S]:
    """Class decorator: make a PhysicsSystem subclass available as ``system.name=<name>``."""

    def deco(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, PhysicsSystem)):
            raise TypeError(
                f"@register_system({name!r}) decorates PhysicsSystem subclasses, got {cls!r}"
            )
        known = SYSTEMS.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ValueError(
                f"system name {name!r} is already registered by "
                f"{known.__module__}.{known.__qualname__}"
            )
        cls.name = name
        SYSTEMS[name] = cls
        return cls

    return deco
