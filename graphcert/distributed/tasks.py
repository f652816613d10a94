"""What every executor runs: a task, its outcome, and the per-process settings of a worker.

A task is a picklable top-level function with its arguments and a key that names it across runs (resume uses
the key). Executors know nothing about what a task computes: they start it, watch its time and memory, retry it
when its worker dies, and report an `Outcome`. An exception raised by the task is its answer (an error), not a
reason to retry, except MemoryError: memory depends on what else runs, so the task may succeed elsewhere.
"""
from __future__ import annotations

import os
import resource
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

# Worker processes compute with one thread each so that N workers on N cores do not fight for them; set before
# torch, numpy or onnxruntime start their thread pools (a worker's environment is fixed when it starts).
ONE_THREAD_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                         "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
# Diagnostics and tests: when set (in the process that runs the executor), every task start is appended to this
# file as "pid key attempt" by the process that runs the task.
TASK_LOG_ENV = "GRAPHCERT_TASK_LOG"
# A task is stopped this long after its own timeout (it is expected to honour the timeout itself; this is the
# backstop for a task stuck in native code): the larger of GRACE_SECONDS and GRACE_SHARE of the timeout.
GRACE_SECONDS, GRACE_SHARE = 10.0, 0.5
DEFAULT_RETRIES = 2


@dataclass(frozen=True)
class Task:
    key: str                              # unique within a run, stable across runs
    fn: Callable[..., Any]                # a top-level function (pickled by reference)
    args: tuple = ()
    timeout: float | None = None          # the task's own time limit, in seconds

    def hard_limit(self) -> float | None:
        """Seconds after which the executor stops the task's worker."""
        if self.timeout is None:
            return None
        return self.timeout + max(GRACE_SECONDS, GRACE_SHARE * self.timeout)


@dataclass
class Outcome:
    key: str
    value: Any = None
    error: str | None = None              # why the task has no value (its exception, or its worker's fate)
    timed_out: bool = False               # stopped by the executor after its hard time limit
    attempts: int = 1
    seconds: float = 0.0                  # wall time of the last attempt, in its worker
    cpu_seconds: float = 0.0              # CPU time of the last attempt (process time of the worker)
    worker: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Event:
    """What an executor reports while it runs: a task started, is retried (its worker died), or is done."""
    kind: str                             # "start", "retry" or "done"
    key: str
    outcome: Outcome | None = None        # for "done"
    reason: str = ""                      # for "retry"
    extra: dict = field(default_factory=dict)


def configure_worker(memory_mb: float | None) -> None:
    """One compute thread for torch and onnxruntime, and a cap on the process's data segment (allocations past it
    raise MemoryError instead of pushing the machine into the OOM killer)."""
    os.environ.update(ONE_THREAD_ENV)
    import torch
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (a reused worker), or parallel work already started: the intra-op setting suffices
    from .. import runtime
    runtime.DEFAULT_THREADS = 1
    if memory_mb:
        limit = int(memory_mb * 2 ** 20)
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def task_log() -> str | None:
    """The task log path, read where the executor runs (workers may have been started with another environment)."""
    return os.environ.get(TASK_LOG_ENV) or None


def log_start(path: str | None, key: str, attempt: int) -> None:
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {key} {attempt}\n".encode())  # one write: lines never interleave
    finally:
        os.close(fd)


def execute(task: Task, attempt: int, log: str | None = None) -> Outcome:
    """Run one task in this process and capture its value or its error (the worker-side half of every executor)."""
    log_start(log, task.key, attempt)
    wall, cpu = time.monotonic(), time.process_time()
    try:
        value, error = task.fn(*task.args), None
    except MemoryError:
        value, error = None, "out of memory (MemoryError)"
    except Exception as exc:  # the task's answer is its error; the worker survives
        value, error = None, describe_error(exc)
    return Outcome(task.key, value, error, attempts=attempt, seconds=time.monotonic() - wall,
                   cpu_seconds=time.process_time() - cpu, worker=str(os.getpid()))


def describe_error(exc: BaseException) -> str:
    from ..errors import GraphcertError
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, GraphcertError):
        return text or type(exc).__name__
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    place = f" at {os.path.basename(where[0].filename)}:{where[0].lineno}" if where else ""
    return f"{type(exc).__name__}{place}: {text}" if text else f"{type(exc).__name__}{place}"


def is_memory_error(outcome: Outcome) -> bool:
    return outcome.error is not None and outcome.error.startswith("out of memory")
