"""Package names that load on first use (a module `__getattr__`, PEP 562), so importing a
package does not import what its names need until one is touched."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, table: Mapping[str, str], namespace: dict) -> Callable[[str], Any]:
    """The `__getattr__` of `package` whose public names come from the modules `table` maps them
    to; a name loaded once is put into the package's `namespace` (later lookups skip this)."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
