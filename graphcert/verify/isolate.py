"""One verify call in a process of its own: its deadline and memory budget guarded, its peak memory measured.

`run_isolated(job, deadline, budget)` forks; the child runs `job()` under a `ProcessGuard` (which answers
`timeout` or `unknown` and exits when the deadline plus a grace or the budget passes) and sends the outcome
through a pipe; the parent reads it, kills a child that still has not answered a second after the deadline,
and reads the child's peak resident memory from the kernel (wait4). Where fork is missing the job runs here.
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import GraphcertError
from .resources import Budget, ProcessGuard, size

# A supervised child that has begun answering when its deadline (plus grace) passes gets this long to finish.
ANSWER_SECONDS = 0.4
# A child that has not answered this long after its deadline (its guard failed too) is killed.
KILL_AFTER = 1.0


@dataclass
class Outcome:
    kind: str            # "result", "error" (bad input, one line) or "crash" (a bug: the exception's text)
    value: object        # the job's return value, or the message
    peak_bytes: int      # the child's peak resident memory (0 when not measured)


def run_isolated(job: Callable[[], object], deadline: float, budget: Budget | None,
                 on_guard: Callable[[str, str], object]) -> Outcome:
    """job() in a forked child; `on_guard(status, reason)` builds the value the child reports when its guard
    ends it (a timeout or a memory overrun)."""
    if not hasattr(os, "fork"):
        return _run_here(job)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        _child(job, deadline, budget, on_guard, write_end)
    os.close(write_end)
    payload = _read_all(read_end, pid, deadline + KILL_AFTER)
    _, status, usage = os.wait4(pid, 0)
    peak = usage.ru_maxrss * 1024
    if payload:
        kind, value = pickle.loads(payload)
        return Outcome(kind, value, peak)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return Outcome("result", on_guard("timeout", "killed: no answer a second after the deadline"), peak)
    return Outcome("crash", f"the verify process ended without an answer (wait status {status})", peak)


def _run_here(job) -> Outcome:
    try:
        return Outcome("result", job(), 0)
    except GraphcertError as exc:
        return Outcome("error", str(exc).splitlines()[0], 0)


def _child(job, deadline, budget, on_guard, write_end) -> None:
    def send(kind: str, value) -> None:
        data = pickle.dumps((kind, value))
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view):]

    code = 0
    try:
        with ProcessGuard(deadline, budget, lambda status, reason: send("result", on_guard(status, reason)),
                          exit_code=lambda status: 0):
            outcome = ("result", job())
    except GraphcertError as exc:
        outcome = ("error", str(exc).splitlines()[0])
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which records it as a crash)
        outcome, code = ("crash", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"), 1
    try:
        send(*outcome)
    finally:
        os._exit(code)


def _read_all(fd: int, pid: int, kill_at: float) -> bytes:
    """Everything the child writes until it closes the pipe; SIGKILL once `kill_at` passes."""
    chunks = []
    try:
        while True:
            wait = kill_at - time.monotonic()
            if wait <= 0:
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        pickle.loads(data)
    except Exception:  # noqa: BLE001 (a child killed mid-write leaves a partial message)
        return b""
    return data


# Set in the child of `supervise`: the pipe on which it tells the parent that it has begun to answer.
_ANSWERING_FD: int | None = None


def claim_answer() -> None:
    """In a supervised child, tell the parent that this process is answering now: a parent whose deadline
    passes meanwhile then lets it finish instead of answering too (one verdict per run, the child's, with its
    partial result). Elsewhere nothing."""
    global _ANSWERING_FD
    if _ANSWERING_FD is not None:
        os.write(_ANSWERING_FD, b"1")
        os.close(_ANSWERING_FD)
        _ANSWERING_FD = None


def supervise(deadline: float, budget: Budget | None, answer: Callable[[str, str], None],
              exit_code: Callable[[str], int], grace: float = 0.5, interval: float = 0.05) -> int | None:
    """Split this process in two: the child returns None and does the work; the parent returns the exit code
    once the child ends, or, if the child passes `deadline + grace` or its memory budget first, kills it,
    calls `answer(status, reason)` and returns `exit_code(status)`.

    The parent holds no model and runs no Python while the child works, so unlike a thread (which needs the
    GIL, and a C extension's import or kernel can hold that for seconds) it keeps the deadline to the poll
    interval. Where fork is missing the work runs unsupervised here (None).
    """
    if not hasattr(os, "fork"):
        return None
    answering, claimed = os.pipe()
    pid = os.fork()
    if pid == 0:
        global _ANSWERING_FD
        os.close(answering)
        _ANSWERING_FD = claimed
        return None
    os.close(claimed)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 128 + os.WTERMSIG(status)
        reason = ""
        if time.monotonic() > deadline + grace:
            verdict, reason = "timeout", "the deadline passed inside a stage that cannot be interrupted"
        elif budget is not None and _resident_of(pid) > budget.total:
            verdict, reason = "unknown", f"resident memory passed the memory budget of {budget}"
        if reason:
            # Freeze it at once (freeing a large process after SIGKILL takes a while on a busy machine), answer,
            # then kill it without waiting: the caller exits and the kernel reaps the child.
            os.kill(pid, signal.SIGSTOP)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done and os.WIFEXITED(status):   # it finished (and answered) just before
                return os.waitstatus_to_exitcode(status)
            if verdict == "timeout" and select.select([answering], [], [], 0)[0]:
                # It is printing its own answer (a busy machine delayed it): let it end, briefly.
                os.kill(pid, signal.SIGCONT)
                ended = _wait_for(pid, ANSWER_SECONDS)
                if ended is not None:
                    return ended
            answer(verdict, f"{reason} (peak resident memory {size(_peak_of(pid))})")
            os.kill(pid, signal.SIGKILL)
            return exit_code(verdict)
        time.sleep(interval)


def _wait_for(pid: int, seconds: float) -> int | None:
    """The exit code of the child if it ends within `seconds`, else None."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 128 + os.WTERMSIG(status)
        time.sleep(0.01)
    return None


def _resident_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_of(pid: int) -> int:
    """A process's peak resident memory (VmHWM), 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
