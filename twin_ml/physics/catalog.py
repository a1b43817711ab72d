"""One registry for the closed set of physics systems: by registered name or by import path."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

from twin_ml.physics.registration import SYSTEMS as _SYSTEMS
from twin_ml.physics.registration import register_system as register_system
from twin_ml.physics.system import PhysicsSystem


def list_systems() -> list[str]:
    """Registered system names (the shipped ones, plus any a user module registered)."""
    import twin_ml.physics.systems  # noqa: F401  (registers the shipped systems)

    return sorted(_SYSTEMS)


def _import(module: str):
    """`importlib.import_module`, with the working directory on the path (a console script's
    sys.path does not hold it; `python -m` and `python script.py` users expect their own
    modules)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    return importlib.import_module(module)


def system_class(name: str) -> type[PhysicsSystem]:
    """The class for a registered name, or an import path ``pkg.module:Class`` /
    ``pkg.module.Class``."""
    known = list_systems()
    if name in _SYSTEMS:
        return _SYSTEMS[name]
    if "." in name or ":" in name:
        module, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
        try:
            cls = getattr(_import(module), attr)
        except Exception as e:  # not found, or the user's module fails on import: one line
            raise KeyError(
                f"system {name!r}: cannot import {attr!r} from {module!r} ({type(e).__name__}: {e})"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, PhysicsSystem)):
            raise KeyError(f"system {name!r} is not a PhysicsSystem subclass")
        if not cls.name:
            cls.name = name  # an unregistered class is addressed by its import path
        return cls
    raise KeyError(
        f"unknown system {name!r}; known systems: {', '.join(known)} "
        "(or an import path pkg.module:Class)"
    )


def system_from_description(desc: Mapping[str, Any]) -> PhysicsSystem:
    """Rebuild the system a dataset, run or exported model describes (`PhysicsSystem.describe()`:
    its registered `name`, its `class` import path and its constructor `options`).

    A registered name is used when it is known in this process; otherwise the class is imported
    from its recorded path, so a system defined in the user's own module is found again by every
    later command and by the server without importing that module first. Import paths resolve on
    `sys.path` plus the working directory (as `python -m` would).
    """
    name, path = desc.get("name"), desc.get("class")
    options = dict(desc.get("options") or {})
    if not path and name and ("." in name or ":" in name):
        path = name  # recorded before the class path was: an unregistered system's name is one
    if name and name in list_systems():  # registered: shipped, or its module already imported
        return _SYSTEMS[name](**options)
    if not path:
        raise KeyError(
            f"unknown system {name!r} and no import path recorded for it; known systems: "
            f"{', '.join(list_systems())}"
        )
    try:
        cls = system_class(path)
    except KeyError as e:
        raise KeyError(
            f"{e.args[0]}; the system {name!r} was recorded with the class {path!r}: run from "
            "the directory that holds its module, or put that folder on PYTHONPATH"
        ) from None
    if name and cls.name != name and cls.name in _SYSTEMS and name not in (path, _dotted(path)):
        raise KeyError(
            f"system {name!r}: its recorded class {path!r} is now registered as {cls.name!r}"
        )
    return cls(**options)


def _dotted(path: str) -> str:
    """`pkg.module:Class` spelled `pkg.module.Class` (both address a class)."""
    return path.replace(":", ".")


def make_system(name: str, **options: Any) -> PhysicsSystem:
    """Build a system by registered name or import path; `options` go to its constructor.

    >>> make_system("pendulum").parameter_names
    ['length', 'damping', 'mass']
    """
    return system_class(name)(**options)
