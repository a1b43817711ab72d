"""Shared pieces of the entry points: one-line errors, and the summary.json every command writes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from twin_ml._io import StorageFull, atomic_write_json, no_space, storage_full

# The configs/ tree of this checkout (the entry points run from an editable install of it).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def fail(err: BaseException, code: int = 2) -> NoReturn:
    """Print a one-line error a user can act on and exit non-zero (no traceback for bad input)."""
    while err.__cause__ is not None and type(err).__name__ == "InstantiationException":
        err = err.__cause__  # hydra wraps a constructor's own error; show that one
    if no_space(err) and not isinstance(
        err, StorageFull
    ):  # a writer other than ours (pyarrow, a logger)
        err = storage_full(err, getattr(err, "filename", None) or "an output file")
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def key_values(argv: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """`key=value` settings over `defaults` (for commands that are not Hydra apps); unknown keys
    are one error that lists the known ones."""
    cfg = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in defaults:
            raise ValueError(
                f"unknown setting {arg!r}; settings: {', '.join(f'{k}=...' for k in defaults)}"
            )
        cfg[key] = value
    return cfg


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    atomic_write_json(path, summary)
    return path


def check_group_choices(argv: list[str], groups: list[str]) -> None:
    """`group=choice` overrides must name a YAML in configs/<group>/: else one line that lists them.

    (Hydra's own message for this is a multi-line error; this one matches every other bad input.)
    """
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in groups:
            options = sorted(p.stem for p in (Path(CONFIG_DIR) / key).glob("*.yaml"))
            if value not in options:
                print(
                    f"error: {key}={value!r} is unknown; known {key} configs: {', '.join(options)}",
                    file=sys.stderr,
                )
                sys.exit(2)


def lightning_logs_once() -> None:
    """Lightning gives its loggers their own stderr handlers on import; under Hydra's logging (one
    stdout handler on the root) every Lightning line then printed twice. Hand them to the root,
    when it has a handler (hydra/job_logging=disabled leaves Lightning's own)."""
    import lightning  # noqa: F401  (the handlers are added on import)

    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
