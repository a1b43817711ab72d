"""Shared pieces of the entry points: one-line errors, key=value settings with their --help, the
summary.json every command writes (strict JSON: never NaN), the Hydra apps' loggers, and the one
rule by which every command finds a config file (`config_file`) in the config directories of its
search path (`config_dirs`: the user's --config-dir / hydra.searchpath, then the project's
configs/)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
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
    write_json(path, summary)
    return path


# ---- JSON without NaN ---------------------------------------------------------------------------


def json_safe(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """`obj` with every non-finite float (NaN, inf; numpy's too) replaced by None, and the key paths
    replaced ("test/x/rmse", "outputs.vel.level[3]"). numpy scalars and arrays become plain
    Python values."""
    import math

    import numpy as np

    bad: list[str] = []

    def walk(v: Any, at: str) -> Any:
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float):
            if math.isfinite(v):
                return v
            bad.append(at or "(the value)")
            return None
        if isinstance(v, Mapping):
            return {k: walk(x, f"{at}.{k}" if at else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{at}[{i}]") for i, x in enumerate(v)]
        return v

    return walk(obj, where), bad


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as strict JSON (atomically): a value that is legitimately absent is None in
    `obj` already; a non-finite number that slipped through (a diverged prediction) is written as
    null too, and a warning names each such key, so no command ever writes NaN or Infinity (which
    strict JSON parsers refuse) nor fails at the end of a long run over one."""
    clean, bad = json_safe(obj)
    if bad:
        shown_keys = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        logging.getLogger("twin-ml").warning(
            f"{Path(path).name}: non-finite values written as null: {shown_keys}"
        )
    atomic_write_json(path, clean)
    return Path(path)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A folder to write a command's outputs into, published as `out` only when the block ends
    without an error: a new `out` is the folder renamed; an existing one gets its files replaced
    one by one. On an error the staged files are removed, and so are the parent folders this made:
    a failed command leaves no empty or half-written output directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} is a file, not a directory")
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir {str(out)!r} cannot be created ({e.strerror})") from None
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield stage
        if out.is_dir():
            for f in sorted(stage.iterdir()):
                os.replace(f, out / f.name)
            stage.rmdir()
        else:
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for p in made:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


# ---- config directories and config files --------------------------------------------------------

_CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
_CONFIG_PATH_FLAGS = ("--config-path", "-cp")
_SEARCHPATH_KEYS = ("hydra.searchpath", "+hydra.searchpath", "++hydra.searchpath")


def _flag_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """The values of `--flag VALUE` / `--flag=VALUE` in argv."""
    out = []
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                out.append(argv[i + 1])
            elif arg.startswith(flag + "="):
                out.append(arg[len(flag) + 1 :])
    return out


def _search_dir(entry: str, base: Path) -> Path | None:
    """A Hydra search-path entry (file://DIR, pkg://pkg.module, or a bare DIR) as a folder."""
    scheme, sep, rest = entry.partition("://")
    if not sep:
        scheme, rest = "file", entry
    if scheme == "file":
        path = Path(rest).expanduser()
        return path if path.is_absolute() else base / path
    if scheme == "pkg":
        import importlib.resources

        try:
            found = importlib.resources.files(rest.replace("/", ".").rstrip("."))
        except (ImportError, TypeError, ValueError):
            return None
        return Path(str(found)) if Path(str(found)).is_dir() else None
    return None  # structured:// and other schemes hold no YAML files


def original_cwd() -> Path:
    """The directory the command was started in (Hydra's, should hydra.job.chdir move the job)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd())
    return Path.cwd()


def config_dirs(argv: list[str] | None = None) -> list[Path]:
    """Every config directory of a command's search path, the user's first, then the primary one
    (the project's configs/, or --config-path's). Inside a Hydra app: Hydra's own search path
    (hydra.runtime.config_sources); else from argv (default sys.argv): --config-dir/-cd DIR,
    --config-path/-cp DIR and hydra.searchpath=[file://DIR,...], as Hydra reads them."""
    from hydra.core.hydra_config import HydraConfig

    base = original_cwd()
    user: list[Path] = []
    primary = Path(CONFIG_DIR)
    if argv is None and HydraConfig.initialized():
        for src in HydraConfig.get().runtime.config_sources:
            if src.schema not in ("file", "pkg") or src.provider == "hydra":
                continue
            path = _search_dir(f"{src.schema}://{src.path}", base)
            if path is None:
                continue
            if src.provider == "main":
                primary = path
            else:
                user.append(path)
    else:
        argv = sys.argv[1:] if argv is None else argv
        for value in _flag_values(argv, _CONFIG_PATH_FLAGS):
            # Hydra: absolute, or relative to the folder of the entry point's file (training/)
            path = Path(value).expanduser()
            primary = path if path.is_absolute() else (ROOT / "training" / path).resolve()
        user += [base / Path(v).expanduser() for v in _flag_values(argv, _CONFIG_DIR_FLAGS)]
        for arg in argv:
            key, sep, value = arg.partition("=")
            if sep and key in _SEARCHPATH_KEYS:
                from hydra.core.override_parser.overrides_parser import OverridesParser

                try:
                    entries = OverridesParser.create().parse_overrides([arg])[0].value()
                except Exception:  # Hydra itself reports a malformed override
                    continue
                for entry in entries if isinstance(entries, list) else [entries]:
                    path = _search_dir(str(entry), base)
                    if path is not None:
                        user.append(path)
    out: list[Path] = []
    for path in [*user, primary]:
        path = Path(os.path.abspath(path))
        if path not in out:
            out.append(path)
    return out


def _names(dirs: list[Path], group: str) -> list[str]:
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def _searched(dirs: list[Path], group: str) -> str:
    return ", ".join(str(d / group) for d in dirs)


def config_file(
    group: str, value: str, *, setting: str | None = None, dirs: list[Path] | None = None
) -> Path:
    """The YAML file a setting names, by one rule for every command: a value that ends in
    .yaml/.yml or is an existing file (absolute, or relative to the directory the command started
    in) is that file, as given; otherwise it is a name, looked up as <dir>/<group>/<name>.yaml in
    each config directory of the search path (`config_dirs`: the user's first, then the
    project's). Errors name the setting (default: `group`) and list the names found."""
    setting = setting or group
    dirs = config_dirs() if dirs is None else [Path(d) for d in dirs]
    text = str(value).strip()
    if not text:
        raise ValueError(f"{setting} is empty; give a {group} name or a .yaml file")
    path = Path(text).expanduser()
    full = path if path.is_absolute() else original_cwd() / path
    if full.is_file():
        return full
    if path.suffix.lower() in (".yaml", ".yml") or len(path.parts) > 1:
        raise ValueError(f"{setting}={text!r}: no such file {full}")
    for d in dirs:
        found = d / group / f"{text}.yaml"
        if found.is_file():
            return found
    known = _names(dirs, group)
    raise ValueError(
        f"{setting}={text!r} is unknown; known {group}s: {', '.join(known) or 'none'} "
        f"(searched {_searched(dirs, group)}; or give a path to a .yaml file)"
    )


def check_group_choices(argv: list[str], groups: list[str]) -> None:
    """`group=choice` overrides must name a YAML in <dir>/<group>/ of a config directory of the
    search path (`config_dirs`: --config-dir, hydra.searchpath, the project's configs/): else one
    line that lists the names found and where. A missing --config-dir is one line too. A name
    found in more than one directory gets a warning that says which one Hydra takes (the project's
    before --config-dir's, which come before hydra.searchpath's).

    (Hydra's own message for this is a multi-line error; this one matches every other bad input.)
    """
    base = original_cwd()
    for value in _flag_values(argv, _CONFIG_DIR_FLAGS):
        if not (base / Path(value).expanduser()).is_dir():
            print(
                f"error: --config-dir {value!r}: no such directory {base / value}", file=sys.stderr
            )
            sys.exit(2)
    dirs = config_dirs(argv)
    hydra_order = [dirs[-1], *dirs[:-1]]  # Hydra looks in the primary directory first
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        for choice in value.split(","):  # a sweep (-m) lists several
            choice = choice.strip()
            if choice in ("null", ""):
                continue
            where = [d for d in hydra_order if (d / key / f"{choice}.yaml").is_file()]
            if not where:
                options = _names(dirs, key)
                print(
                    f"error: {key}={choice!r} is unknown; known {key} configs: "
                    f"{', '.join(options) or 'none'} (searched {_searched(dirs, key)})",
                    file=sys.stderr,
                )
                sys.exit(2)
            if len(where) > 1:
                print(
                    f"warning: {key}={choice!r} is in {len(where)} config directories; "
                    f"Hydra uses {where[0] / key / f'{choice}.yaml'}",
                    file=sys.stderr,
                )


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


def job_dir(default: str) -> str:
    """`out_dir`'s default (`${job_dir:...}` in configs/train.yaml): `default` for one run; in a
    sweep (-m), the job's own folder (hydra.sweep.dir/hydra.sweep.subdir), so jobs that differ in
    a setting the default does not name (a learning rate) never share a run directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN and not OmegaConf.is_missing(hc.runtime, "output_dir"):
            return str(hc.runtime.output_dir)
    return default


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("show"):
        OmegaConf.register_new_resolver("show", shown)
    if not OmegaConf.has_resolver("job_dir"):  # configs/train.yaml's out_dir, composed anywhere
        OmegaConf.register_new_resolver("job_dir", job_dir)


_register_resolvers()
