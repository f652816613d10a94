"""Competition I/O: result files, instances CSVs (onnx, vnnlib, timeout) and their summaries."""
from __future__ import annotations

import csv
import os
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..alpha_settings import VERIFY_ALPHA, AlphaSettings
from ..errors import InputError
from ..files import atomic_write

if TYPE_CHECKING:
    from . import Result

STATUSES = ("holds", "violated", "unknown", "timeout")
COMPETITION_WORDS = {"holds": "unsat", "violated": "sat", "unknown": "unknown", "timeout": "timeout"}


def write_result(result: Result, path: str | os.PathLike) -> None:
    """The competition's result file: unsat, sat with the counterexample, unknown or timeout."""
    lines = [COMPETITION_WORDS[result.status]]
    if result.status == "violated" and result.counterexample is not None:
        x, y = result.counterexample
        pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x)] + [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y)]
        lines.append("(" + "\n ".join(pairs) + ")")
    atomic_write(("\n".join(lines) + "\n").encode(), path)


@dataclass
class InstanceResult:
    onnx: str
    vnnlib: str
    status: str
    seconds: float
    timeout: float
    peak_mb: float = 0.0       # the verify process's peak resident memory (0: not measured)
    reason: str = ""           # why unknown or timeout, or the crash
    counterexample: tuple | None = None


def read_instances(csv_path: str | os.PathLike, limit: int | None = None) -> tuple[str, list[list[str]]]:
    """The folder an instances file's paths are relative to, and its (onnx, vnnlib, timeout, ...) rows."""
    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise InputError(f"instances file not found: {csv_path}")
    with open(csv_path, newline="") as handle:
        rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
    if any(len(r) < 3 for r in rows):
        raise InputError(f"{csv_path}: every row needs onnx, vnnlib and timeout columns")
    for r in rows:
        try:
            float(r[2])
        except ValueError:
            raise InputError(f"{csv_path}: timeout '{r[2]}' of {r[0]} {r[1]} is not a number") from None
    return os.path.dirname(os.path.abspath(csv_path)), rows[:limit] if limit is not None else rows


def run_instances(csv_path: str | os.PathLike, out_csv: str | os.PathLike | None = None, method: str = "crown",
                  progress: bool = True, timeout_scale: float = 1.0, limit: int | None = None,
                  alpha: AlphaSettings = VERIFY_ALPHA, executor=None, resume: bool = False,
                  memory: int | None = None, rounding: str = "float32") -> list[InstanceResult]:
    """Verify every (onnx, vnnlib, timeout) row of a competition instances file (paths relative to it), serially
    or on `executor` (graphcert.distributed), streaming rows into `out_csv`; `resume` keeps the rows there;
    `rounding` "real" reads the properties in real arithmetic, as the competition does."""
    from ..distributed.instances import run_instances as run
    return run(csv_path, out_csv, method, progress, timeout_scale, limit, alpha, executor, resume, memory,
               rounding)[0]


def summarize(results: list[InstanceResult]) -> dict:
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    counts["error"] = sum(r.status.startswith("error") for r in results)
    counts["median_seconds"] = statistics.median([r.seconds for r in results]) if results else 0.0
    return counts
