"""Running many independent tasks (verification instances, shards of a data set) serially, on worker processes
of this machine, or on a Ray cluster, with nothing lost and nothing repeated.

- `tasks`: a task and its outcome; per-worker settings (one compute thread, a memory cap).
- `local`: the serial executor and a pool of worker processes that survives a killed worker.
- `ray_pool`: the same on Ray (optional: `pip install 'graphcert[ray]'`).
- `journal`: the results file, appended line by line with fsync, resumable, rewritten in input order at the end.
- `runner`: runs tasks on an executor into a journal with one progress bar and a summary.
- `instances`, `shards`: what `verify --instances` and `certify` run as tasks (no maths here: they call
  `graphcert.verify.verify` and `graphcert.certify.certify`).
"""
from __future__ import annotations

from ..errors import InputError
from .local import ProcessExecutor, SerialExecutor
from .runner import RunSummary, run_tasks
from .tasks import DEFAULT_RETRIES, Outcome, Task

# The default memory cap of one task, in MB (the data segment of its worker process).
DEFAULT_TASK_MEMORY_MB = 4096


def make_executor(workers: int | None = None, ray: str | None = None, retries: int = DEFAULT_RETRIES,
                  memory_mb: float | None = DEFAULT_TASK_MEMORY_MB):
    """Serial (no workers, no Ray), `workers` local processes, or Ray: `ray` is "local" (the cluster this process
    is connected to, or one started for the run), "auto" or an address."""
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if retries < 0:
        raise InputError(f"--retries must be >= 0, got {retries}")
    if memory_mb is not None and memory_mb <= 0:
        raise InputError(f"--task-memory must be > 0 MB, got {memory_mb:g}")
    if ray is not None:
        from .ray_pool import RayExecutor
        return RayExecutor(None if ray == "local" else ray, workers, retries, memory_mb)
    if workers is None:
        return SerialExecutor()
    return ProcessExecutor(workers, retries, memory_mb)


__all__ = ["DEFAULT_RETRIES", "DEFAULT_TASK_MEMORY_MB", "Outcome", "ProcessExecutor", "RunSummary",
           "SerialExecutor", "Task", "make_executor", "run_tasks"]
