"""Competition I/O: result files, instances CSVs (onnx, vnnlib, timeout) and their summaries."""
from __future__ import annotations

import csv
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..alpha import VERIFY_ALPHA, AlphaSettings
from ..errors import GraphcertError, InputError
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


def run_instances(csv_path: str | os.PathLike, out_csv: str | os.PathLike | None = None, method: str = "crown",
                  progress: bool = True, timeout_scale: float = 1.0, limit: int | None = None,
                  alpha: AlphaSettings = VERIFY_ALPHA, memory: int | None = None,
                  isolate: bool = True) -> list[InstanceResult]:
    """Verify every (onnx, vnnlib, timeout) row of a competition instances file; paths are relative to it.

    With `isolate` (the default) each instance runs in a process of its own (`isolate.run_isolated`): its
    deadline and memory budget (`memory` bytes, default half of what is available) are guarded, a crash
    becomes that instance's `error: crash ...` status, and its peak memory is recorded.
    """
    from tqdm import tqdm

    from . import Result, verify  # the package's verify(), which imports this module
    from .isolate import run_isolated
    from .resources import Budget
    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise InputError(f"instances file not found: {csv_path}")
    folder = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="") as handle:
        rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
    if any(len(r) < 3 for r in rows):
        raise InputError(f"{csv_path}: every row needs onnx, vnnlib and timeout columns")
    rows = rows[:limit] if limit is not None else rows
    results = []
    bar = tqdm(rows, disable=not progress, unit="instance")
    for onnx_name, spec_name, timeout, *_ in bar:
        bar.set_description(f"{os.path.basename(onnx_name)} {os.path.basename(spec_name)}")
        seconds = float(timeout) * timeout_scale
        started = time.monotonic()
        budget = Budget(memory)

        def job():
            return verify(os.path.join(folder, onnx_name), os.path.join(folder, spec_name), seconds, method, alpha,
                          memory=budget.total, started=started)

        if isolate:
            outcome = run_isolated(job, started + seconds, budget,
                                   lambda status, reason: Result(status, None, time.monotonic() - started,
                                                                 reason=reason))
            kind, value, peak = outcome.kind, outcome.value, outcome.peak_bytes
        else:
            try:
                kind, value, peak = "result", job(), 0
            except GraphcertError as exc:
                kind, value, peak = "error", str(exc).splitlines()[0], 0
        if kind == "result":
            status, reason, counterexample = value.status, value.reason, value.counterexample
        else:
            status, reason, counterexample = f"error: {'crash ' if kind == 'crash' else ''}{value}", "", None
        results.append(InstanceResult(onnx_name, spec_name, status, time.monotonic() - started, seconds,
                                      peak / (1 << 20), reason, counterexample))
    if out_csv is not None:
        lines = ["onnx,vnnlib,status,seconds,peak_mb"] + [
            f"{r.onnx},{r.vnnlib},{r.status.replace(',', ';')},{r.seconds:.3f},{r.peak_mb:.0f}" for r in results]
        atomic_write(("\n".join(lines) + "\n").encode(), out_csv)
    return results


def summarize(results: list[InstanceResult]) -> dict:
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    counts["error"] = sum(r.status.startswith("error") for r in results)
    counts["median_seconds"] = statistics.median([r.seconds for r in results]) if results else 0.0
    return counts
