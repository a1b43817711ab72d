"""Shared pieces of the entry points: one-line errors, key=value settings with their --help, the
summary.json every command writes, and the Hydra apps' loggers."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from twin_ml._io import StorageFull, atomic_write_json, no_space, storage_full

# The checkout the entry points run from (an editable install), its configs/ tree, and the real
# benchmark datasets' folder (data/real/<name>/, see twin_ml.data.real).
ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(ROOT / "configs")
REAL_DATA_DIR = ROOT / "data" / "real"


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


@dataclass(frozen=True)
class Setting:
    """A key=value setting of a command that is not a Hydra app: its default (None: unset) and
    what it means, in one line (shown by --help)."""

    default: str | None
    help: str = ""
    required: bool = False


HELP_FLAGS = ("-h", "--help")


def defaults(settings: Mapping[str, Setting]) -> dict[str, str | None]:
    """{key: default} of a settings table."""
    return {k: s.default for k, s in settings.items()}


def key_values(argv: list[str], settings: Mapping[str, Setting], doc: str) -> dict[str, Any]:
    """`key=value` settings over the defaults (for commands that are not Hydra apps); unknown keys
    are one error that lists the known ones. -h or --help prints the command's help (`doc`, then
    a line per setting: name, default, meaning) and exits 0."""
    if any(arg in HELP_FLAGS for arg in argv):
        try:
            print(help_text(settings, doc), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader is gone, which is no error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    cfg = defaults(settings)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in settings:
            raise ValueError(
                f"unknown setting {arg!r}; settings: {', '.join(f'{k}=...' for k in settings)}"
            )
        cfg[key] = value
    return cfg


def help_text(settings: Mapping[str, Setting], doc: str = "") -> str:
    """The command's description, then its settings a line each: name, default, meaning."""
    rows = []
    for name, setting in settings.items():
        default = "(required)" if setting.required else setting.default
        rows.append((name, "-" if default in (None, "") else default, setting.help))
    w_name = max(len(r[0]) for r in rows)
    w_default = max(len(r[1]) for r in rows)
    lines = [doc.strip(), ""] if doc.strip() else []
    lines.append("settings (key=value; default, meaning):")
    lines += [f"  {n:<{w_name}}  {d:<{w_default}}  {m}".rstrip() for n, d, m in rows]
    return "\n".join(lines)


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


def loggers(cfg, out_dir: Path) -> list | bool:
    """The run's Lightning loggers from cfg.logger (False: none). wandb runs offline, its files
    under the run directory, unless the environment says otherwise."""
    import hydra

    if not cfg.get("logger"):
        return False
    if "wandb" in cfg.logger:
        for k, sub in (
            ("WANDB_DIR", ""),
            ("WANDB_CACHE_DIR", "wandb-cache"),
            ("WANDB_CONFIG_DIR", "wandb-config"),
        ):
            os.environ.setdefault(k, str(out_dir / sub) if sub else str(out_dir))
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
    return [hydra.utils.instantiate(c) for c in cfg.logger.values()]


def shown(value: Any) -> str:
    """A config value as the Hydra apps' --help shows it (`${show:${key}}` in configs/hydra/help/):
    as an override would spell it (null, true), a section as {...}."""
    from omegaconf import DictConfig, ListConfig

    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (DictConfig, dict)):
        return "{...}" if value else "{}"
    if isinstance(value, (ListConfig, list)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("show"):
        OmegaConf.register_new_resolver("show", shown)


_register_resolvers()
