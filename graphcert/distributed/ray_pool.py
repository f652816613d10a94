"""The executor on a Ray cluster: every task a Ray task of one CPU.

Ray is optional (`pip install 'graphcert[ray]'`). Retries are ours, not Ray's (`max_retries=0`), so that a lost
worker, a node that died or Ray's out-of-memory killer count against the same per-task limit as on the local
pool and the final error names the reason. At most as many tasks are in flight as the cluster has CPUs (or
`workers`), so the progress bar's "running" is honest and a task's time limit counts from about its start.
Model and data paths are read by the workers: on a cluster of several machines they must exist on every node
(a shared file system).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Iterator

from ..errors import InputError
from .tasks import (DEFAULT_RETRIES, ONE_THREAD_ENV, Event, Outcome, Task, configure_worker, execute, is_memory_error,
                    task_log)

INSTALL_HINT = "pip install 'graphcert[ray]' (in a clone: pip install -e '.[ray]')"
# A cluster started for one run: small, since graphcert passes file names and small results, not arrays.
OBJECT_STORE_BYTES = 200 * 2 ** 20
POLL_SECONDS = 0.5


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class RayExecutor:
    """Tasks on the Ray cluster at `address` ("auto", host:port or ray://...), or, with address None, on the
    cluster this process is already connected to or a local one started for the run (`workers` CPUs)."""

    def __init__(self, address: str | None = None, workers: int | None = None, retries: int = DEFAULT_RETRIES,
                 memory_mb: float | None = None):
        import_ray()
        self.address, self.workers, self.retries, self.memory_mb = address, workers, retries, memory_mb

    def describe(self) -> str:
        where = self.address or "a local Ray cluster"
        return f"{where} ({self.workers} tasks at a time)" if self.workers else where

    def run(self, tasks: list[Task]) -> Iterator[Event]:
        ray = import_ray()
        started_here = self._connect(ray)
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_execute)
        capacity = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.workers = capacity
        log = task_log()
        queue = list(reversed([(task, 1) for task in tasks]))  # pop() takes the next in input order
        flight: dict = {}  # ref -> (task, attempt, submitted at)
        try:
            while queue or flight:
                while queue and len(flight) < capacity:
                    task, attempt = queue.pop()
                    flight[remote.remote(task, attempt, self.memory_mb, log)] = (task, attempt, time.monotonic())
                    yield Event("start", task.key)
                ready, _ = ray.wait(list(flight), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    task, attempt, _ = flight.pop(ref)
                    yield from self._finished(ray, ref, task, attempt, queue)
                yield from self._stop_overdue(ray, flight)
        finally:
            # A cluster started for this run goes down with its workers; cancelling first races tasks that are
            # completing and can abort Ray's core worker ("Tried to complete task that was not pending").
            for ref in flight if not started_here else ():
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()

    def _connect(self, ray) -> bool:
        """Connect (or start a local cluster); True when this run started the connection and should close it."""
        if ray.is_initialized():
            return False
        env = {"env_vars": dict(ONE_THREAD_ENV)}
        # ray.init installs its own SIGTERM handler (exit 15 at once); keep the caller's, so SIGTERM still ends
        # the run like Ctrl-C: tasks cancelled, the results file left whole and resumable.
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if on_main_thread else None
        try:
            if self.address:
                ray.init(address=self.address, runtime_env=env, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         object_store_memory=OBJECT_STORE_BYTES, runtime_env=env)
        except Exception as exc:  # Ray raises ConnectionError, ValueError, RuntimeError...: say which cluster
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"cannot start or join {where}: {first}") from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return True

    def _finished(self, ray, ref, task: Task, attempt: int, queue) -> Iterator[Event]:
        try:
            outcome = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return
        except ray.exceptions.RayError as exc:  # the worker or its node died, or Ray's OOM killer stopped it
            reason = f"its Ray worker failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})"
            if attempt <= self.retries:
                yield Event("retry", task.key, reason=reason)
                queue.append((task, attempt + 1))
            else:
                yield Event("done", task.key, Outcome(task.key, error=f"{reason} ({attempt} attempts)",
                                                      attempts=attempt))
            return
        if is_memory_error(outcome) and attempt <= self.retries:
            yield Event("retry", task.key, reason=outcome.error)
            queue.append((task, attempt + 1))
            return
        yield Event("done", task.key, outcome)

    def _stop_overdue(self, ray, flight: dict) -> Iterator[Event]:
        now = time.monotonic()
        for ref, (task, attempt, submitted) in list(flight.items()):
            limit = task.hard_limit()
            if limit is not None and now - submitted > limit:
                ray.cancel(ref, force=True)
                del flight[ref]
                yield Event("done", task.key, Outcome(
                    task.key, error=f"stopped after {now - submitted:.0f} s, past its {task.timeout:g} s time limit",
                    timed_out=True, attempts=attempt, seconds=now - submitted))


def _ray_execute(task: Task, attempt: int, memory_mb: float | None, log: str | None) -> Outcome:
    configure_worker(memory_mb)
    return execute(task, attempt, log)
