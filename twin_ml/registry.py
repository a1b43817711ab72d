"""The BentoML model store as the model registry (torch-free: the server uses it).

A stored model is a BentoML model directory holding ``model.onnx``, ``manifest.json`` (the ONNX
file's manifest plus the sha256 of every file) and the evaluation report. The manifest's own
sha256 sits in the BentoML model's metadata (model.yaml), so a swapped manifest is caught too.

Addressing: ``NAME:VERSION``, ``NAME:latest`` (BentoML's newest) or ``NAME:<stage>`` (the version
promoted to that stage, e.g. ``production``). Stages are pointers kept in
``<BENTOML_HOME>/twin-ml/stages.json``; promoting never rewrites a stored model.

Writes never leave a half-stored model, and concurrent writers stay consistent. A model is built in
``<BENTOML_HOME>/twin-ml/staging/`` (BentoML's own layout, every file fsynced) and enters the store
by one rename of its directory, under an exclusive lock on ``<BENTOML_HOME>/twin-ml/store.lock``
(fcntl): inside the lock a version that exists is refused, so of two exports of one NAME:VERSION
exactly one lands and the other gets "already in the store". The ``latest`` pointer and the stage
pointers change under the same lock, each written atomically. A writer killed mid-way leaves no
model in the store: its staging folder is removed by the next save (its writer's lock is gone),
and BentoML's own build folder in the system temp folder by the save itself, unless killed. The
store lists only complete models, and skips a broken one (e.g. written by other tools).

`verify` recomputes every hash and refuses a tampered, truncated, missing or swapped file before
anything reads it; `onnx_path` verifies first. `onnx_bytes` reads the ONNX file once and checks the
hash of those very bytes: a server that keeps them has no window between check and open, and a
file replaced or truncated later never reaches it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twin_ml._io import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    sha256_bytes,
    sha256_file,
    writing,
)
from twin_ml.contract.card import READABLE, CardError, ModelCard

log = logging.getLogger(__name__)

STAGES = ("staging", "production", "archived")
ONNX_FILE, MANIFEST_FILE = "model.onnx", "manifest.json"
# an FMU system's .fmu, stored with its model (twin-export): the model carries its physics
SYSTEM_FMU = "system.fmu"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


class RegistryError(Exception):
    """A model is missing, cannot be addressed as given, or failed its integrity check."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 63:
        raise RegistryError(
            f"model name {name!r} is not allowed: use lowercase letters, digits, '-', '_' and '.' "
            "(at most 63 characters, starting and ending with a letter or digit)"
        )
    return name


def check_new(name: str, version: str, stage: str | None = None) -> None:
    """Refuse, before any work, a version that exists, reads as a stage or 'latest', or a bad
    stage."""
    check_name(name)
    if not isinstance(version, str) or not _NAME.match(version) or version in (*STAGES, "latest"):
        raise RegistryError(
            f"version {version!r} is not allowed: lowercase letters, digits, '-', '_' and '.', "
            f"and not 'latest' or a stage ({', '.join(STAGES)})"
        )
    if stage is not None and stage not in STAGES:
        raise RegistryError(f"stage {stage!r} is unknown; stages: {', '.join(STAGES)}")
    if (_models_dir() / name / version).exists():  # complete or not, the version is taken
        raise RegistryError(
            f"{name}:{version} is already in the store; pick another version (or leave it unset)"
        )


def new_version(weights_sha256: str) -> str:
    """A sortable, unique-enough version: UTC time + the weights' hash prefix."""
    return f"{_dt.datetime.now(_dt.UTC):%Y%m%d%H%M%S}-{weights_sha256[:8]}"


def _bentoml():
    os.environ.setdefault(
        "BENTOML_DO_NOT_TRACK", "True"
    )  # no usage reports: commands never need the network
    import bentoml

    return bentoml


def _home() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def _stages_path() -> Path:
    return _home() / "twin-ml" / "stages.json"


def _models_dir() -> Path:
    _bentoml()
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store_dir.get())


@contextlib.contextmanager
def _store_lock():
    """The store's one writer lock: a model's commit, `latest` and the stage pointers change
    under it (read-modify-write, never interleaved with another process's)."""
    path = _home() / "twin-ml" / "store.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sweep_staging(root: Path) -> None:
    """Remove staging folders whose writer is gone. Called under the store lock, under which a
    writer also creates its folder and locks its `.writer.lock` (held while it lives): a folder
    whose lock file can be locked, or that has none (its writer died before making it), is dead."""
    for d in root.iterdir() if root.is_dir() else []:
        lock = d / ".writer.lock"
        try:
            with open(lock) as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while the writer lives
                shutil.rmtree(d, ignore_errors=True)  # still holding it
        except BlockingIOError:
            continue
        except FileNotFoundError:
            shutil.rmtree(d, ignore_errors=True)


def _stages() -> dict[str, dict[str, str]]:
    p = _stages_path()
    return json.loads(p.read_text()) if p.exists() else {}


def _stages_of(bm, stages: dict[str, dict[str, str]] | None = None) -> list[str]:
    """The stages that point at the stored model `bm`."""
    stages = _stages() if stages is None else stages
    return [s for s, v in stages.get(bm.tag.name, {}).items() if v == bm.tag.version]


def save(
    name: str,
    version: str,
    onnx_bytes: bytes,
    card: ModelCard,
    *,
    extra_files: dict[str, Path] | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    """Store a model; returns its tag NAME:VERSION. `extra_files`: store name -> local file."""
    bentoml = _bentoml()
    from bentoml._internal.models.model import ModelStore
    from bentoml.exceptions import BentoMLException

    check_new(name, version)
    blobs = {
        ONNX_FILE: onnx_bytes,
        **{fname: Path(src).read_bytes() for fname, src in (extra_files or {}).items()},
    }
    files = {
        fname: sha256_bytes(b) for fname, b in blobs.items()
    }  # the hashes of the bytes written below
    stored = card.model_copy(update={"files": files})
    manifest_bytes = (stored.dumps(store=True, indent=2) + "\n").encode()
    meta = {"manifest_sha256": sha256_bytes(manifest_bytes), "format": card.format}
    staging = _home() / "twin-ml" / "staging"
    with _store_lock():  # a sweep and a new writer's claim on its folder never interleave
        staging.mkdir(parents=True, exist_ok=True)
        _sweep_staging(staging)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-{version}-", dir=staging))
        writer = open(work / ".writer.lock", "a")
        fcntl.flock(
            writer, fcntl.LOCK_EX
        )  # held while this process lives: sweeps leave `work` alone
    scratch = None  # BentoML's own build folder (in the system temp folder), removed below
    try:
        try:  # BentoML builds the model (model.yaml and all) and saves it to a store inside `work`
            with (
                writing(work),
                bentoml.models.create(  # `work`: BentoML's copy into it
                    f"{name}:{version}",
                    labels=labels or {},
                    metadata=meta,
                    _model_store=ModelStore(work / "models"),
                ) as bm,
            ):
                scratch = Path(bm.path)
                for fname, b in {**blobs, MANIFEST_FILE: manifest_bytes}.items():
                    with writing(scratch / fname):
                        (scratch / fname).parent.mkdir(parents=True, exist_ok=True)
                        (scratch / fname).write_bytes(b)
        except BentoMLException as e:
            raise RegistryError(f"storing {name}:{version} failed: {e}") from None
        built = work / "models" / name / version
        fsync_tree(built)  # whole on disk before it becomes visible
        _commit(built, name, version)
    finally:
        writer.close()
        shutil.rmtree(work, ignore_errors=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return f"{name}:{version}"


def _commit(built: Path, name: str, version: str) -> None:
    """Move a built model into the store (one rename) and point `latest` at the newest version."""
    bentoml = _bentoml()
    target = _models_dir() / name / version
    with _store_lock():
        # the compare of the compare-and-swap: the lock makes it and the rename one step
        if target.exists():
            raise RegistryError(
                f"{name}:{version} is already in the store; "
                "pick another version (or leave it unset)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(built, target)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise RegistryError(
                    f"{_models_dir()} is on another file system than {built.parent}: keep "
                    "BENTOML_HOME's models/ and twin-ml/ folders on one file system"
                ) from None
            raise
        fsync_dir(target.parent)  # the rename itself, durable
        # from here on the model is stored; `latest` is a convenience pointer, and failing to move
        # it (a full disk) must not make a rerun of the export meet "already in the store"
        latest = target.parent / "latest"
        try:
            current = latest.read_text().strip() if latest.exists() else ""
            mine = bentoml.models.get(f"{name}:{version}").info.creation_time
            try:
                newer = (
                    bool(current)
                    and bentoml.models.get(f"{name}:{current}").info.creation_time > mine
                )
            except Exception:
                # `latest` names a version that is gone or broken: this one replaces it
                newer = False
            if not newer:
                atomic_write_bytes(latest, version.encode())
        except OSError as e:
            log.warning(
                f"{name}:{version} is stored, but {name}:latest still names "
                f"{current or 'nothing'}: {e}"
            )


def resolve(ref: str):
    """The BentoML model for NAME:VERSION, NAME:latest or NAME:<stage>."""
    bentoml = _bentoml()
    from bentoml.exceptions import BentoMLException, NotFound

    if not isinstance(ref, str) or ref.count(":") != 1:
        raise RegistryError(
            f"model reference {ref!r}: use NAME:VERSION, NAME:latest or NAME:<stage> "
            f"({', '.join(STAGES)})"
        )
    name, version = ref.split(":")
    check_name(name)
    if version in STAGES:
        pinned = _stages().get(name, {}).get(version)
        if not pinned:
            raise RegistryError(
                f"no version of {name} is promoted to {version}; "
                f"twin-models promote {name}:VERSION --stage {version}"
            )
        version = pinned
    try:
        return bentoml.models.get(f"{name}:{version}")
    except NotFound:
        known = sorted(str(m.tag) for m in _complete_models() if m.tag.name == name)
        raise RegistryError(
            f"model {name}:{version} is not in the store; known: {', '.join(known) or 'none'}"
        ) from None
    except BentoMLException as e:  # a folder without a readable model.yaml
        raise RegistryError(
            f"model {name}:{version} is damaged in the store ({e}); remove it with "
            f"`bentoml models delete {name}:{version}`"
        ) from None


def verify(ref: str) -> ModelCard:
    """Recompute the hash of the manifest and of every file it lists; the card if all match."""
    return _verify(resolve(ref))


def _verify(bm, held: dict[str, bytes] | None = None) -> ModelCard:
    """The model card, once it and every file it lists match their hashes. `held`: store name ->
    bytes already read; those bytes are checked instead of the file on disk."""
    held = held or {}
    d = Path(bm.path)
    mpath = d / MANIFEST_FILE
    if not mpath.exists():
        raise RegistryError(f"{bm.tag}: {MANIFEST_FILE} is missing")
    raw = mpath.read_bytes()
    want = (bm.info.metadata or {}).get("manifest_sha256")
    if sha256_bytes(raw) != want:
        raise RegistryError(
            f"{bm.tag}: {MANIFEST_FILE} does not match the sha256 recorded at save time; "
            "refusing it"
        )
    try:
        card = ModelCard.from_json(raw)
    except CardError as e:
        raise RegistryError(f"{bm.tag}: {e}") from None
    if ONNX_FILE not in (card.files or {}):  # unchecked bytes must never pass as verified
        raise RegistryError(
            f"{bm.tag}: {MANIFEST_FILE} lists no sha256 for {ONNX_FILE}; refusing it"
        )
    for fname, sha in card.files.items():
        p = d / fname
        if fname not in held and not p.exists():
            raise RegistryError(f"{bm.tag}: {fname} is missing")
        if (sha256_bytes(held[fname]) if fname in held else sha256_file(p)) != sha:
            raise RegistryError(
                f"{bm.tag}: {fname} does not match its sha256 in {MANIFEST_FILE} "
                "(tampered, truncated or swapped); refusing it"
            )
    return with_stored_fmu(card, d)


def with_stored_fmu(card: ModelCard, folder: Path) -> ModelCard:
    """`card`, its FMU system pointed at the copy stored with the model (SYSTEM_FMU, hashed in
    the card's files) where the recorded .fmu is gone or changed: on another machine, in a Bento,
    after the file moved. /calibrate and live twins rebuild the system from it; FMUSystem still
    refuses a file whose sha256 is not the recorded one. Any other card: as it is."""
    options = card.system.options
    if SYSTEM_FMU not in (card.files or {}) or "fmu" not in options:
        return card
    recorded = Path(str(options["fmu"]))
    if recorded.is_file() and sha256_file(recorded) == options.get("sha256"):
        return card
    system = card.system.model_copy(
        update={"options": {**options, "fmu": str(folder / SYSTEM_FMU)}}
    )
    return card.model_copy(update={"system": system})


def onnx_path(ref: str) -> tuple[Path, ModelCard]:
    """(the verified ONNX file, its card): nothing reads the file before the check passed."""
    bm = resolve(ref)  # resolved once: NAME:latest / NAME:<stage> may move meanwhile
    return Path(bm.path) / ONNX_FILE, _verify(bm)


def onnx_bytes(ref: str) -> tuple[bytes, ModelCard]:
    """(the ONNX model's bytes, its card), the sha256 checked on those very bytes: keep them
    and open sessions from them (`twin_ml._ort.session(bytes)`), and whatever happens to the file
    afterwards cannot reach the caller."""
    bm = resolve(ref)  # resolved once: NAME:latest / NAME:<stage> may move meanwhile
    path = Path(bm.path) / ONNX_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(f"{bm.tag}: {ONNX_FILE} is missing") from None
    card = _verify(bm, {ONNX_FILE: raw})
    return raw, card


def promote(ref: str, stage: str) -> str:
    """Point NAME:<stage> at the (verified) model `ref`; returns NAME:VERSION."""
    if stage not in STAGES:
        raise RegistryError(f"stage {stage!r} is unknown; stages: {', '.join(STAGES)}")
    bm = resolve(ref)
    _verify(bm)
    with (
        _store_lock()
    ):  # concurrent promotions and commits: read-modify-write under the store's lock
        stages = _stages()
        stages.setdefault(bm.tag.name, {})[stage] = bm.tag.version
        atomic_write_json(_stages_path(), stages)
    return str(bm.tag)


def _complete_models() -> list:
    """Every stored model whose model.yaml BentoML can read; a broken folder (another tool's
    interrupted write) is logged and skipped, so one of them cannot hide the rest."""
    bentoml = _bentoml()
    from bentoml.exceptions import BentoMLException

    root, out = _models_dir(), []
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for ver_dir in sorted(p for p in name_dir.iterdir() if p.is_dir()):
            try:
                out.append(bentoml.models.get(f"{name_dir.name}:{ver_dir.name}"))
            except BentoMLException as e:
                log.warning(f"skipping {name_dir.name}:{ver_dir.name}: not a complete model ({e})")
    return out


def list_models() -> list[dict[str, Any]]:
    """One row per stored twin-ml model, newest first."""
    stages = _stages()
    rows = []
    for bm in _complete_models():
        if (bm.info.metadata or {}).get("format") not in READABLE:
            continue
        pinned = _stages_of(bm, stages)
        rows.append(
            {
                "tag": str(bm.tag),
                "system": bm.info.labels.get("system", ""),
                "kind": bm.info.labels.get("kind", ""),
                "stages": pinned,
                "created": bm.info.creation_time.isoformat(timespec="seconds"),
            }
        )
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def show(ref: str) -> dict[str, Any]:
    """The stored card of `ref` (verified) as JSON, with its tag and stages."""
    bm = resolve(ref)
    card = _verify(bm)
    return {
        "tag": str(bm.tag),
        "stages": _stages_of(bm),
        "path": str(bm.path),
        **card.to_json(store=True),
    }
