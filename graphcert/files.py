"""Writing outputs safely: atomic replacement, plain-sentence errors, and never overwriting an input.

Every command writes through `atomic_write` (a reader never sees half a file; a failed write leaves the old file
alone) and checks its outputs against its inputs with `refuse_overwrite` before any work starts, so a typo such
as `--out MODEL.onnx` costs nothing. Inputs are compared as files (device and inode), which catches the same file
reached through a symlink, a hard link or another spelling of the path.
"""
from __future__ import annotations

import errno
import os
import tempfile
from typing import Iterable

from .errors import InputError

PathLike = str | os.PathLike


def _existing(paths: Iterable[PathLike | None]) -> list[str]:
    return [os.fspath(p) for p in paths if p is not None and os.path.exists(p)]


def refuse_overwrite(outputs: Iterable[PathLike | None], inputs: Iterable[PathLike | None]) -> None:
    """InputError when any output path is (or links to) one of the input files, or is a folder."""
    inputs = _existing(inputs)
    for output in outputs:
        if output is None:
            continue
        output = os.fspath(output)
        if os.path.isdir(output):
            raise InputError(f"output {output} is a folder; give a file name")
        if not os.path.exists(output):
            continue
        for source in inputs:
            if os.path.samefile(output, source):
                same = "" if os.path.abspath(output) == os.path.abspath(source) else f" (the same file as {source})"
                raise InputError(f"refusing to overwrite the input {output}{same}; choose another output path")


def _plain(exc: OSError, path: str) -> InputError:
    """An OSError as a sentence about the user's path, not about our temporary file."""
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
               errno.ENOSPC: "no space left on the device", errno.EISDIR: "it is a folder",
               errno.ENAMETOOLONG: "the name is too long", errno.EDQUOT: "disk quota exceeded"}
    reason = reasons.get(exc.errno, (exc.strerror or str(exc)).lower())
    return InputError(f"cannot write {path}: {reason}; choose another output path")


def atomic_write(data: bytes, path: PathLike) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"output folder does not exist: {folder}; create it first")
    if os.path.isdir(path):
        raise InputError(f"output {path} is a folder; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".graphcert-", suffix=".tmp")
    except OSError as exc:
        raise _plain(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        raise _plain(exc, path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
