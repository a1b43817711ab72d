"""Atomic writes and hashes: nothing is ever half-written (temp file in the same folder, then
rename).

A write that fails for lack of space (a full disk, a quota, or the process's file-size limit)
raises `StorageFull`, an OSError whose message names the file and says what to do; the temp file
is removed, and the file it would have replaced is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# ENOSPC: disk full, EDQUOT: quota, EFBIG: over RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write
# fails)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same arrays give the same bytes
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class StorageFull(OSError):
    """A write that ran out of space: the disk, a quota, or the file-size limit. Nothing was
    half-written; the command can run again once there is space (long jobs resume)."""

    def __str__(self) -> str:
        return (
            f"cannot write {self.filename}: {self.strerror} "
            "(the disk is full, or a quota or the file-size "
            "limit is reached); nothing was half-written: free space and run the same command again"
        )


def no_space(err: BaseException) -> bool:
    """Whether `err` is a failed write for lack of space (also pyarrow's, which puts the errno in
    its message only)."""
    if not isinstance(err, OSError):
        return False
    if err.errno in _NO_SPACE:
        return True
    found = re.search(r"\[errno (\d+)\]", str(err), re.IGNORECASE)
    return bool(found) and int(found.group(1)) in _NO_SPACE


def storage_full(err: OSError, path: str | os.PathLike) -> StorageFull:
    """`err` (a write that ran out of space) as a StorageFull naming `path`."""
    code = err.errno if err.errno in _NO_SPACE else errno.ENOSPC
    return StorageFull(code, os.strerror(code), str(path))


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Around a write of `path` by any writer (ours, pyarrow's, BentoML's copy): running out of
    space raises StorageFull naming `path`; other errors pass as they are."""
    try:
        yield
    except OSError as e:
        if no_space(e) and not isinstance(e, StorageFull):
            raise storage_full(e, path) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with writing(path):
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(
                tmp, 0o666 & ~_UMASK
            )  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp, path)
            fsync_dir(path.parent)  # make the rename itself durable
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Temp files a killed writer left in `folder` (`.<name>.*.tmp`, as `atomic_write_bytes` names
    them). Only for a folder with one writer (a run or dataset directory), at its start."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_figure(fig, path: str | os.PathLike, **savefig_kw: Any) -> Path:
    """A matplotlib figure as PNG, written atomically (rendered in memory, then written)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kw)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under `root`, and root itself: what a rename is about to
    publish is on disk before it."""
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A standard .npz (readable by np.load) with deterministic bytes: no timestamps, fixed
    order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()
