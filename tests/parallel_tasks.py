"""Helpers of the parallel-run tests: tasks that worker processes import by name, reading the task log, killing
a worker in the middle of a task, and small instance files drawn from the shared benchmarks."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from conftest import VNNCOMP, shared_path

# ACAS Xu instances with their verdicts at a timeout of a few seconds (truth.csv agrees with every decided one).
# The slow ones hold but are hard for any verifier: alpha,beta-CROWN times out on both at 60 s on this CPU
# (reference-abcrown-cpu.csv), so at a few seconds graphcert stops at its timeout however much faster it gets
# (an instance slow only for today's graphcert, 4_7 prop_1, began to hold within 3 s on a faster CI machine).
ACAS_QUICK = [("ACASXU_run2a_1_1_batch_2000.onnx", "prop_1.vnnlib", "holds"),
              ("ACASXU_run2a_3_5_batch_2000.onnx", "prop_2.vnnlib", "violated"),
              ("ACASXU_run2a_2_8_batch_2000.onnx", "prop_4.vnnlib", "holds"),
              ("ACASXU_run2a_5_4_batch_2000.onnx", "prop_2.vnnlib", "violated")]
ACAS_SLOW = ("ACASXU_run2a_4_2_batch_2000.onnx", "prop_2.vnnlib", "timeout")
ACAS_SLOW_TOO = ("ACASXU_run2a_1_1_batch_2000.onnx", "prop_6.vnnlib", "timeout")


def sleep_then(value, seconds: float):
    time.sleep(seconds)
    return value


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def allocate(megabytes: int) -> int:
    return int(np.ones(megabytes * 2 ** 20 // 8).sum())


def fail(message: str):
    raise ValueError(message)


def acas_instances(path: Path, rows, timeout: float, decided_timeout: float = 30.0) -> Path:
    """An instances file of ACAS Xu (onnx, vnnlib, verdict) rows with absolute paths: `timeout` seconds for the
    rows expected to time out, a generous `decided_timeout` for the others (they take well under a second alone,
    but a cold worker on a loaded machine may take seconds)."""
    folder = shared_path("benchmarks", "vnncomp2021", "acasxu")
    path.write_text("".join(f"{folder / o},{folder / v},{timeout if verdict == 'timeout' else decided_timeout}\n"
                            for o, v, verdict in rows))
    return path


def shared_test_family() -> Path:
    return shared_path("benchmarks", "vnncomp2021", "test", "test_instances.csv")


def logged_starts(log: Path) -> list[tuple[int, str, int]]:
    """(pid, task key, attempt) of every task start in the task log."""
    if not log.exists():
        return []
    starts = []
    for line in log.read_text().splitlines():
        pid, rest = line.split(" ", 1)
        key, attempt = rest.rsplit(" ", 1)
        starts.append((int(pid), key, int(attempt)))
    return starts


def kill_worker_of(log: Path, key_part: str, after: float = 1.0, give_up: float = 120.0) -> threading.Thread:
    """A thread that waits until the task whose key contains `key_part` starts, then SIGKILLs its worker process
    `after` seconds into the task; it records the pid it killed in `thread.killed`."""
    def run():
        deadline = time.monotonic() + give_up
        while time.monotonic() < deadline:
            for pid, key, attempt in logged_starts(log):
                if key_part in key and attempt == 1:
                    time.sleep(after)
                    os.kill(pid, signal.SIGKILL)
                    thread.killed = pid
                    return
            time.sleep(0.05)
    thread = threading.Thread(target=run, daemon=True)
    thread.killed = None
    thread.start()
    return thread


def results_rows(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "onnx,vnnlib,status,seconds"
    return [line.split(",") for line in lines[1:]]


__all__ = ["ACAS_QUICK", "ACAS_SLOW", "ACAS_SLOW_TOO", "VNNCOMP", "acas_instances", "allocate", "fail", "kill_self", "kill_worker_of",
           "logged_starts", "results_rows", "shared_test_family", "sleep_then"]


def interrupt_then_resume(command: list[str], env: dict, log_dir: Path, out: Path, rows, at_least: int,
                          start_seconds: float = 120) -> tuple[set, str]:
    """Run `command` (a verify --instances run writing `out`), SIGTERM it once `at_least` results are in, check
    it stopped as an interruption, then run it again with --resume; the finished instances of the first run and
    the second run's stderr. Each run logs its task starts to log_dir/first.log and log_dir/second.log."""
    from graphcert.distributed.tasks import TASK_LOG_ENV
    env = dict(env, **{TASK_LOG_ENV: str(log_dir / "first.log")})
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + start_seconds
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < at_least):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    finished = {(r[0], r[1]) for r in results_rows(out)}
    assert at_least - 1 <= len(finished) < len(rows)
    env[TASK_LOG_ENV] = str(log_dir / "second.log")
    done = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    redone = {tuple(key.split("#")[0].split(",")) for _, key, _ in logged_starts(log_dir / "second.log")}
    assert not redone & finished and len(redone) == len(rows) - len(finished)
    assert [(os.path.basename(r[0]), r[2]) for r in results_rows(out)] == [(o, v) for o, _, v in rows]
    assert f"{len(finished)} resumed" in done.stderr
    return finished, done.stderr
