"""The results file of a run: one line per finished task, appended as tasks finish, never lost, never repeated.

Each line is written with a single write() and flushed to disk (fsync) before the next task is counted as done,
so a run killed at any moment leaves whole lines of every finished task (a torn last line, possible only if the
machine itself fails, is dropped on resume). `--resume` reads the lines already there and skips their tasks;
when the run ends (or is interrupted) the file is rewritten in input order, atomically (temporary file, then
rename). What a line says is the caller's business: a `Codec` writes and reads it.
"""
from __future__ import annotations

import os
from typing import Callable, Protocol

from ..errors import InputError
from ..files import atomic_write


class Codec(Protocol):
    header: str                                   # the first line of the file

    def key(self, line: str) -> str | None: ...   # the task a line answers (None: not a result line)

    def final(self, line: str) -> bool: ...       # False: redo this task on resume (say, a failed shard)


class Journal:
    def __init__(self, path: str | os.PathLike, codec: Codec, check_header: Callable[[str], None] | None = None):
        self.path, self.codec, self.check_header = os.fspath(path), codec, check_header
        self.lines: dict[str, str] = {}

    def open(self, resume: bool) -> dict[str, str]:
        """Start the file (afresh, or keeping its finished lines with `resume`); the lines kept, by key."""
        if resume and os.path.exists(self.path):
            self.lines = self._read()
        elif resume:
            self.lines = {}
        self._rewrite(list(self.lines))
        return dict(self.lines)

    def append(self, key: str, line: str) -> None:
        data = (line.rstrip("\n") + "\n").encode()
        self.lines[key] = line.rstrip("\n")  # first: an interrupt during the write still keeps it for finish()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self, order: list[str]) -> None:
        """Rewrite the file in input order (keys not finished are left out)."""
        self._rewrite([key for key in order if key in self.lines])

    def _rewrite(self, keys: list[str]) -> None:
        body = [self.codec.header] + [self.lines[key] for key in keys]
        atomic_write(("\n".join(body) + "\n").encode(), self.path)

    def _read(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot resume from {self.path}: {exc}") from None
        rows = text.split("\n")
        complete = rows[:-1]  # text after the last newline is a torn write: redo that task
        if not complete:
            return {}
        if self.check_header is not None:
            self.check_header(complete[0])
        elif complete[0] != self.codec.header:
            raise InputError(f"cannot resume from {self.path}: its first line is not '{self.codec.header}'; "
                             f"it was not written by this command (remove it, or drop --resume)")
        lines, seen = {}, {}
        for line in complete[1:]:
            base = self.codec.key(line)
            if base is None or not self.codec.final(line):
                continue
            seen[base] = seen.get(base, 0) + 1
            lines[occurrence_key(base, seen[base])] = line
        return lines


def occurrence_key(base: str, occurrence: int) -> str:
    """Keys of repeated rows (the same instance listed twice) stay distinct: the n-th occurrence gets #n."""
    return base if occurrence == 1 else f"{base}#{occurrence}"
