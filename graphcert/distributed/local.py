"""Executors on this machine: serial (in this process) and a pool of worker processes.

The pool is written out rather than taken from concurrent.futures: a ProcessPoolExecutor whose worker dies
breaks as a whole and fails every pending task, while here the dead worker's task goes back to the queue (up to
`retries` times), a fresh worker takes its place, and the other workers carry on. Each worker runs one task at
a time with one compute thread and a capped data segment (`tasks.configure_worker`); a task past its hard time
limit has its worker killed and is reported as timed out.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import wait
from typing import Iterator

from .tasks import (DEFAULT_RETRIES, ONE_THREAD_ENV, Event, Outcome, Task, configure_worker, execute, is_memory_error,
                    task_log)

POLL_SECONDS = 0.5


class SerialExecutor:
    """Every task in this process, in order (no hard time limit and no retries: nothing can stop or replace us)."""

    workers = 1

    def describe(self) -> str:
        return "this process"

    def run(self, tasks: list[Task]) -> Iterator[Event]:
        log = task_log()
        for task in tasks:
            yield Event("start", task.key)
            yield Event("done", task.key, execute(task, 1, log))


# Workers are forked by multiprocessing's fork server, a clean single-threaded process that imports these modules
# once (torch, onnxruntime, graphcert: seconds), so a worker starts in milliseconds and inherits no thread pool
# or lock of ours. The server's environment is ours when the first worker starts, with ONE_THREAD_ENV.
PRELOAD = ["graphcert.distributed.local", "graphcert.verify", "graphcert.certify"]


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


class ProcessExecutor:
    """`workers` worker processes on this machine."""

    def __init__(self, workers: int, retries: int = DEFAULT_RETRIES, memory_mb: float | None = None):
        self.workers, self.retries, self.memory_mb = workers, retries, memory_mb

    def describe(self) -> str:
        return f"{self.workers} local worker process{'es' if self.workers != 1 else ''}"

    def run(self, tasks: list[Task]) -> Iterator[Event]:
        queue = collections.deque((task, 1) for task in tasks)
        pool: list[_Worker] = []
        context = _context()
        log = task_log()
        try:
            while queue or any(w.task for w in pool):
                pool = [w for w in pool if w.alive() or w.task]
                idle = [w for w in pool if not w.task]
                while queue and (idle or len(pool) < self.workers):
                    worker = idle.pop() if idle else _Worker.start(context, self.memory_mb)
                    if worker not in pool:
                        pool.append(worker)
                    worker.assign(*queue.popleft(), log)
                busy = [w for w in pool if w.task]
                wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=POLL_SECONDS)
                for worker in busy:
                    yield from self._check(worker, queue)
        finally:
            for worker in pool:
                worker.stop()

    def _check(self, worker: "_Worker", queue) -> Iterator[Event]:
        task, attempt = worker.task, worker.attempt
        message = worker.receive()
        if message == "started":
            yield Event("start", task.key, extra={"worker": worker.process.pid})
            message = worker.receive()
        if isinstance(message, Outcome):
            worker.task = None
            if is_memory_error(message) and attempt <= self.retries:
                yield Event("retry", task.key, reason=message.error)
                queue.appendleft((task, attempt + 1))
                worker.stop()  # its heap may be fragmented past the budget: start afresh
                return
            yield Event("done", task.key, message)
            return
        if message is _DEAD or not worker.alive():
            reason = worker.death()
            worker.task = None
            worker.stop()
            if attempt <= self.retries:
                yield Event("retry", task.key, reason=reason)
                queue.appendleft((task, attempt + 1))  # the next idle worker (never the dead one) takes it
            else:
                yield Event("done", task.key, Outcome(task.key, error=f"{reason} ({attempt} attempts)",
                                                      attempts=attempt, worker=str(worker.process.pid)))
            return
        limit = task.hard_limit()
        if limit is not None and worker.started is not None and time.monotonic() - worker.started > limit:
            seconds = time.monotonic() - worker.started
            worker.task = None
            worker.stop()
            yield Event("done", task.key, Outcome(
                task.key, error=f"stopped after {seconds:.0f} s, past its {task.timeout:g} s time limit",
                timed_out=True, attempts=attempt, seconds=seconds, worker=str(worker.process.pid)))


_DEAD = object()


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, process, conn):
        self.process, self.conn = process, conn
        self.task: Task | None = None
        self.attempt = 0
        self.started: float | None = None

    @classmethod
    def start(cls, context, memory_mb):
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_worker_main, args=(child_end, memory_mb), daemon=True)
        with _environment(ONE_THREAD_ENV):  # the fork server (started by the first start()) keeps this environment
            process.start()
        child_end.close()
        return cls(process, parent_end)

    def assign(self, task: Task, attempt: int, log: str | None) -> None:
        self.task, self.attempt, self.started = task, attempt, None
        self.conn.send((task, attempt, log))

    def alive(self) -> bool:
        return self.process.is_alive()

    def receive(self):
        """The next message if one is waiting, None if not, _DEAD if the pipe broke."""
        try:
            if not self.conn.poll():
                return None
            message = self.conn.recv()
        except (EOFError, OSError):
            return _DEAD
        if message == "started":
            self.started = time.monotonic()
        return message

    def death(self) -> str:
        self.process.join(timeout=5)
        code = self.process.exitcode
        pid = self.process.pid
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory, or killed)" if -code == signal.SIGKILL else ""
            return f"its worker (pid {pid}) died of {name}{hint}"
        return f"its worker (pid {pid}) exited with code {code}"

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)
            self.process.join(timeout=0.2 if self.task is None else 0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        with contextlib.suppress(OSError):
            self.conn.close()


@contextlib.contextmanager
def _environment(values: dict):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker_main(conn, memory_mb) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    _die_with_parent()
    configure_worker(memory_mb)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task, attempt, log = message
        conn.send("started")
        outcome = execute(task, attempt, log)
        try:
            conn.send(outcome)
        except Exception as exc:  # the value does not pickle: report that instead of dying
            conn.send(Outcome(task.key, error=f"its result cannot be sent back ({type(exc).__name__})",
                              attempts=attempt, seconds=outcome.seconds, worker=outcome.worker))


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent dies, so a killed run leaves no orphan computing."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)
