"""Building a source FMU: compile its C sources for this platform into an FMI 2.0 .fmu.

Build the example FMU (C source in twin_ml/physics/fmus/damped_oscillator/) with the machine's C
compiler against the FMI headers FMPy ships::

    python -m twin_ml.physics.fmu_build twin_ml/physics/fmus/damped_oscillator \\
        data/fmu/damped_oscillator.fmu

(A module of its own: `python -m` on a module the package imports would run it twice.)
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from twin_ml._io import atomic_write_bytes
from twin_ml.physics.fmu import FMUError, binary_name, model_description

USAGE = "usage: python -m twin_ml.physics.fmu_build SOURCE_DIR OUT.fmu"
TIMEOUT = 300.0  # seconds the compiler may take


def build_fmu(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    cc: str | None = None,
    timeout: float = TIMEOUT,
) -> Path:
    """Compile a source FMU folder (modelDescription.xml and sources/*.c, the files its
    SourceFiles list) for this platform with the C compiler `cc` (default: $CC, else cc) against
    the FMI headers FMPy ships, and write the .fmu (modelDescription.xml, sources/, binaries/)
    to `out` atomically. Returns `out`. Every failure (no compiler, a compile error, a compiler
    that runs past `timeout` seconds, a file that cannot be read or written) is an FMUError."""
    source, out = Path(source), Path(out)
    try:
        return _build(source, out, cc or os.environ.get("CC") or "cc", timeout)
    except OSError as e:
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        raise FMUError(
            f"building {str(source)!r} into {str(out)!r} failed:{where} {e.strerror or e}"
        ) from None


def _build(source: Path, out: Path, cc: str, timeout: float) -> Path:
    import fmpy

    xml = source / "modelDescription.xml"
    if not xml.is_file():
        raise FMUError(f"source: {str(source)!r} has no modelDescription.xml")
    md = model_description(_zip({"modelDescription.xml": xml.read_bytes()}), repr(str(source)))
    if md.modelExchange is None:
        raise FMUError(f"source: {str(source)!r} declares no model-exchange interface")
    files = [
        f for b in md.buildConfigurations for s in b.sourceFileSets for f in s.sourceFiles
    ] or sorted(p.name for p in (source / "sources").glob("*.c"))
    if not files:
        raise FMUError(f"source: {str(source)!r} lists no source files and has no sources/*.c")
    headers = Path(fmpy.__file__).parent / "c-code"
    with tempfile.TemporaryDirectory(prefix="twin-ml-fmu-build-") as tmp:
        lib = Path(tmp) / binary_name(md)
        lib.parent.mkdir(parents=True)
        cmd = [cc, "-shared", "-fPIC", "-O2", "-I", str(headers), "-I", str(source / "sources")]
        cmd += [str(source / "sources" / f) for f in files] + ["-o", str(lib), "-lm"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise FMUError(f"cc: no C compiler {cc!r} found (set CC)") from None
        except subprocess.TimeoutExpired:
            raise FMUError(
                f"compiling {str(source)!r} with {cc!r} did not finish within {timeout:g} s "
                "(stopped); check the compiler, or build the FMU with its own tool"
            ) from None
        except OSError as e:
            raise FMUError(f"cc: cannot run the C compiler {cc!r} ({e.strerror or e})") from None
        if r.returncode != 0:
            raise FMUError(f"compiling {str(source)!r} failed:\n{r.stderr.strip()[-3000:]}")
        members = {"modelDescription.xml": xml.read_bytes(), binary_name(md): lib.read_bytes()}
    for p in sorted((source / "sources").rglob("*")):
        if p.is_file():
            members[f"sources/{p.relative_to(source / 'sources').as_posix()}"] = p.read_bytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, _zip(members))
    return out


def _zip(members: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible bytes
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        print(build_fmu(args[0], args[1]))
    except FMUError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
