"""`verify --instances` as tasks: one VNN-LIB instance per task, results in the competition-style CSV.

The results CSV (`onnx,vnnlib,status,seconds`, one row per instance) is the journal: rows are appended as
instances finish and the file is rewritten in the instances file's order at the end; `--resume` keeps the rows
there and runs only the missing instances. An instance whose worker is stopped after its hard time limit is a
`timeout`; one that fails (its error, or a worker lost more often than the retry limit) is `error: <reason>`.
"""
from __future__ import annotations

import os

from ..errors import InputError
from ..verify.competition import InstanceResult, read_instances
from .journal import Journal, occurrence_key
from .runner import RunSummary, run_tasks
from .tasks import Outcome, Task

HEADER = "onnx,vnnlib,status,seconds"
# In a worker with a memory cap, verify's own budget (which sizes its batches) is this share of the cap: the rest
# is the process's baseline (torch, onnxruntime, the model) and allocator slack.
BUDGET_SHARE_OF_CAP = 0.75


def verify_instance(onnx_path: str, spec_path: str, timeout: float, method: str, alpha, memory=None,
                    rounding: str = "float32", threads: int | None = None) -> str:
    """The task: the verdict of one instance (an error propagates and becomes the instance's `error` row);
    `memory`: the verify call's budget in bytes (default: half of the memory available)."""
    from ..verify import verify
    return verify(onnx_path, spec_path, timeout, method, alpha, memory=memory, rounding=rounding,
                  threads=threads).status


def instance_tasks(folder: str, rows: list[list[str]], method: str, alpha, timeout_scale: float,
                   memory=None, rounding: str = "float32", threads: int | None = None) -> list[Task]:
    tasks, seen = [], {}
    for onnx_name, spec_name, timeout, *_ in rows:
        base = f"{onnx_name},{spec_name}"
        seen[base] = seen.get(base, 0) + 1
        seconds = float(timeout) * timeout_scale
        tasks.append(Task(occurrence_key(base, seen[base]), verify_instance,
                          (os.path.join(folder, onnx_name), os.path.join(folder, spec_name), seconds, method, alpha,
                           memory, rounding, threads),
                          timeout=seconds))
    return tasks


def status_of(outcome: Outcome) -> str:
    if outcome.ok:
        return outcome.value
    if outcome.timed_out:
        return "timeout"
    return f"error: {outcome.error}"


class InstanceCodec:
    header = HEADER

    @staticmethod
    def encode(task: Task, outcome: Outcome) -> str:
        onnx_name, spec_name = task.key.split("#")[0].split(",", 1)
        status = status_of(outcome).replace(",", ";").replace("\n", " ")
        return f"{onnx_name},{spec_name},{status},{outcome.seconds:.3f}"

    @staticmethod
    def key(line: str) -> str | None:
        parts = line.split(",")
        if len(parts) < 4:
            return None
        try:
            float(parts[-1])
        except ValueError:
            return None
        return f"{parts[0]},{parts[1]}"

    @staticmethod
    def final(line: str) -> bool:
        return True  # an instance's answer, error or not, is what a serial run would have written

    @staticmethod
    def decode(line: str) -> tuple[str, float]:
        parts = line.split(",")
        return ",".join(parts[2:-1]), float(parts[-1])


def run_instances(csv_path, out_csv=None, method: str = "crown", progress: bool = True, timeout_scale: float = 1.0,
                  limit: int | None = None, alpha=None, executor=None, resume: bool = False, memory=None,
                  rounding: str = "float32", threads: int | None = None):
    """Verify every instance of a competition instances file on `executor` (serial by default); the results in
    input order and the run's summary."""
    from ..alpha import VERIFY_ALPHA
    from . import SerialExecutor
    if resume and out_csv is None:
        raise InputError("--resume needs --out RESULTS.csv: the results file to resume from")
    cap = getattr(executor, "memory_mb", None)
    if cap:  # verify sizes its batches to its budget: keep that within the worker's hard cap, with headroom
        within = int(cap * 2 ** 20 * BUDGET_SHARE_OF_CAP)
        memory = within if memory is None else min(memory, within)
    folder, rows = read_instances(csv_path, limit)
    tasks = instance_tasks(folder, rows, method, alpha or VERIFY_ALPHA, timeout_scale, memory, rounding, threads)
    journal = Journal(out_csv, InstanceCodec, _header_check(out_csv)) if out_csv is not None else None
    lines, summary = run_tasks(tasks, executor or SerialExecutor(), InstanceCodec.encode, journal, resume,
                               progress, unit="instance")
    results = []
    for task, line, row in zip(tasks, lines, rows):
        status, seconds = InstanceCodec.decode(line)
        results.append(InstanceResult(row[0], row[1], status, seconds, task.timeout))
    return results, summary


def _header_check(path):
    def check(first: str) -> None:
        if first.strip() != HEADER:
            raise InputError(f"cannot resume from {path}: its first line is not '{HEADER}' (not a results file of "
                             f"verify --instances); remove it, or drop --resume")
    return check
