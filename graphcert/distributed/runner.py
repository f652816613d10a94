"""Running a list of tasks on an executor: results streamed to the journal, one progress bar, a summary.

`run_tasks` is what `verify --instances` and sharded `certify` share. It skips the tasks the journal already
holds (resume), feeds the rest to the executor, appends each finished task's line as it arrives, and returns every
task's line in input order, so the caller's answer does not depend on which worker finished first.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from .journal import Journal
from .tasks import Outcome, Task


@dataclass
class RunSummary:
    where: str
    tasks: int = 0
    resumed: int = 0                 # already in the results file, not run again
    done: int = 0                    # finished in this run (with a value or an error)
    failed: int = 0                  # finished with an error
    retried: int = 0                 # attempts lost with their worker
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0     # until the first task started (starting workers, or a Ray cluster)
    task_seconds: float = 0.0        # the tasks' own wall time, summed over this run's tasks
    task_cpu_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for the terminal: what ran where, how long, and what went wrong."""
        parts = [f"{self.done} of {self.tasks} tasks run on {self.where} in {self.wall_seconds:.1f} s "
                 f"({self.startup_seconds:.1f} s to start the first)"]
        if self.resumed:
            parts.append(f"{self.resumed} resumed from the results file")
        if self.done:
            speed = self.task_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
            parts.append(f"task time {self.task_seconds:.1f} s (CPU {self.task_cpu_seconds:.1f} s, "
                         f"{speed:.2f}x the wall time)")
        parts.append(f"{self.failed} failed, {self.retried} retried after a lost worker")
        return "; ".join(parts)


def run_tasks(tasks: list[Task], executor, encode: Callable[[Task, Outcome], str], journal: Journal | None = None,
              resume: bool = False, progress: bool = False, unit: str = "task") -> tuple[list[str], RunSummary]:
    """Run `tasks` (skipping those `journal` holds, with `resume`); every task's line, in input order."""
    keys = [task.key for task in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError("task keys must be unique")
    lines = journal.open(resume) if journal is not None else {}
    lines = {key: line for key, line in lines.items() if key in set(keys)}
    pending = [task for task in tasks if task.key not in lines]
    summary = RunSummary(executor.describe(), tasks=len(tasks), resumed=len(tasks) - len(pending))
    by_key = {task.key: task for task in pending}
    bar = _bar(len(tasks), summary.resumed, unit) if progress else None
    running: set[str] = set()
    start = time.monotonic()
    try:
        for event in executor.run(pending):
            if event.kind == "start":
                if not summary.startup_seconds:
                    summary.startup_seconds = time.monotonic() - start
                running.add(event.key)
            elif event.kind == "retry":
                running.discard(event.key)
                summary.retried += 1
                summary.errors.append(f"{event.key}: retried: {event.reason}")
            elif event.kind == "done":
                running.discard(event.key)
                outcome = event.outcome
                line = encode(by_key[event.key], outcome)
                if journal is not None:
                    journal.append(event.key, line)
                lines[event.key] = line
                summary.done += 1
                summary.task_seconds += outcome.seconds
                summary.task_cpu_seconds += outcome.cpu_seconds
                if not outcome.ok:
                    summary.failed += 1
                    summary.errors.append(f"{event.key}: {outcome.error}")
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.set_postfix_str(f"running {len(running)}, failed {summary.failed}, retried {summary.retried}",
                                    refresh=event.kind != "done")
    finally:
        summary.wall_seconds = time.monotonic() - start
        if bar is not None:
            bar.close()
        if journal is not None:
            journal.finish(keys)
    return [lines[key] for key in keys], summary


def _bar(total: int, initial: int, unit: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit=unit, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1)
