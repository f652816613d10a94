"""Memory and time as verify's resources: the budget, what the process holds, and a guard that keeps promises.

The budget (`--memory`, default half of the memory available when verify starts) sizes every batch: bound
calls (`MemorySizer`, from the bytes one sample measurably costs), the branch-and-bound frontier and the
attack's boxes. `ProcessGuard` is the last line for a whole process: at the deadline (plus a grace) or past
the budget it writes the answer (`timeout` / `unknown`) and ends the process, so a stage that cannot be
interrupted (graph conversion, onnxruntime session creation, one long kernel) cannot break the promise.
Reads psutil when installed, /proc otherwise.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import threading
import time
from typing import Callable

from ..errors import InputError

log = logging.getLogger("graphcert.verify")

DEFAULT_SHARE = 0.5               # of the memory available at start, when --memory is not given
FALLBACK_AVAILABLE = 4 << 30      # when the platform says nothing
_UNITS = {"": 1 << 30, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


# A full cyclic collection scans every tracked object: once onnx, onnxruntime and torch are imported and bound
# graphs built, each takes about 0.1 s, and Python's default thresholds run 7-8 of them per verify call (eran relu
# idx 3054: 0.8 of 6.6 s). While a search runs, the objects alive when it starts (and once torch is imported:
# `freeze_heap`) are left out of collections, which also run less often.
SEARCH_GC_THRESHOLD = (10000, 10, 10)


@contextlib.contextmanager
def fewer_collections():
    """Cyclic garbage collection for the length of a search: what is alive now is frozen (never scanned again,
    still freed by reference counting), the thresholds raised; both restored on leaving."""
    previous = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*SEARCH_GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


def freeze_heap() -> None:
    """Leave the objects alive now (a large library just imported) out of later collections."""
    gc.freeze()


# Other runnable tasks are counted a few times, a few milliseconds apart, and the fewest seen is taken: a
# compute job stays runnable through all of them, a daemon's wake-up does not.
CORE_PROBES, CORE_PROBE_SECONDS = 5, 0.002


def free_cores() -> int:
    """The cores this process may use that no other task is running on now (at least 1): the thread count for
    verify's torch kernels. On an idle 2-core machine both (eran relu 9x200: a 110-domain beta call 0.49 ->
    0.30 s); beside other jobs one, since threads that wait for a descheduled sibling stall every kernel
    (mnistfc 256x2 beside other jobs: 1,500-2,600 domain bounds in 12 s with one thread, 60-700 with two).
    Reads /proc/loadavg's count of runnable tasks less this process's own; elsewhere every core. OMP_NUM_THREADS,
    when set, caps it (as it does torch's default)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    with contextlib.suppress(ValueError):
        cores = min(cores, max(1, int(os.environ.get("OMP_NUM_THREADS", cores))))
    others = cores
    for _ in range(CORE_PROBES):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
            running -= _own_running_threads()
        except (OSError, ValueError, IndexError):
            return cores
        others = min(others, running)
        if others <= 0:
            break
        time.sleep(CORE_PROBE_SECONDS)
    return max(1, cores - max(0, others))


def _own_running_threads() -> int:
    """This process's threads in the running state (a BLAS pool spins for a while after numpy loads)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                count += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:   # the thread ended meanwhile
            pass
    return count


def size(count: int) -> str:
    """Bytes for people: 1.5 GB, 300 MB, 12 kB."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} B"


def parse_memory(text: str | float | int) -> int:
    """'2GB', '512MB', '1.5g' or a number of GB -> bytes (binary units); a one-line error otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise InputError(f"memory budget {text!r}: give a size such as 4GB or 512MB")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not size >= 64 << 20:
        raise InputError(f"memory budget {text!r} is below 64MB, too little to load a model")
    return int(size)


def available_memory() -> int:
    """Bytes the system could give this process now (MemAvailable), or a fallback."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return FALLBACK_AVAILABLE


def resident_bytes() -> int:
    """This process's resident memory now."""
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # the peak: an upper bound


class Budget:
    """The bytes this verify call may hold in total (resident set)."""

    def __init__(self, total: int | None = None):
        self.total = int(total) if total is not None else int(DEFAULT_SHARE * (resident_bytes()
                                                                               + available_memory()))

    def free(self) -> int:
        return max(0, self.total - resident_bytes())

    def __repr__(self) -> str:
        return size(self.total)


class PeakSampler:
    """The peak resident memory while the block runs (sampled every `interval` seconds by a thread)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.before = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakSampler":
        self.before = self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.before)


def graph_bytes_per_sample(proto) -> int:
    """What running a graph on one sample may hold at most: every tensor onnx's shape inference sizes, summed
    (free dimensions, the batch, count 1; onnxruntime reuses buffers, so its peak is lower). Found before the
    graph runs: a CROWN graph whose backward passes start from identities over a wide layer (a 32x27x27
    convolution: 23,328 x 23,328 coefficients, 2.2 GB) shows here at tens of GB before it takes them."""
    import onnx
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:   # onnx raises its own InferenceError and ValidationError types; no estimate then
        return 0
    total = 0
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        count = 1
        for dim in tensor.shape.dim:
            count *= dim.dim_value if dim.HasField("dim_value") else 1
        total += count * _ITEM_BYTES.get(tensor.elem_type, 4)
    return total


_ITEM_BYTES = {11: 8, 7: 8, 10: 2, 16: 2, 9: 1, 2: 1, 3: 1}   # double, int64, float16, bfloat16, bool, uint8, int8


class OutOfBudget(Exception):
    """A stage cannot run within the memory budget: verify answers `unknown` with this reason."""


class MemorySizer:
    """How many samples one call of a bound function may take within the budget.

    The first call runs on `first` samples while the caller samples the peak resident memory (`record`);
    the largest growth per sample seen (never below `floor` bytes) then bounds every later call to `share`
    of the memory free at that time. Later calls keep measuring, so an estimate that was low is corrected.
    """

    def __init__(self, budget: Budget, floor: int, share: float = 0.5, first: int = 2, estimate: int = 0):
        """`estimate`: bytes per sample the graph may take by its shapes (`graph_bytes_per_sample`), which sizes
        the first call and refuses it when one sample would not fit what is free."""
        self.budget, self.per_sample, self.share, self.first = budget, max(1, int(floor)), share, first
        self.estimate = int(estimate)
        self.measured = False

    def limit(self) -> int:
        """The largest number of samples for the next call (at least 1)."""
        free = self.budget.free()
        need = self.per_sample if self.measured else max(self.per_sample, self.estimate)
        if need > free:
            raise OutOfBudget(f"one sample of a bound call needs {'' if self.measured else 'up to '}{size(need)} "
                              f"and {size(free)} of the memory budget ({self.budget}) is free")
        fits = max(1, int(self.share * free / need))
        return fits if self.measured else min(self.first, fits)

    def record(self, samples: int, growth: int) -> None:
        """A call on `samples` samples grew the resident memory by `growth` bytes at its peak."""
        if samples > 0:
            self.per_sample = max(self.per_sample, growth // samples)
            self.measured = True


class ProcessGuard:
    """Ends this process with an answer when it passes its deadline (+ grace) or its memory budget.

    `answer(status, reason)` writes the result (file, stdout) and must be quick; then the process exits
    with `exit_code(status)` without running other threads' cleanup (os._exit), which is what makes the
    deadline hold while the main thread is inside a C++ call. Only for processes that belong to one verify
    call (the command line, or the child `run_instances` starts per instance), never for a library caller.
    """

    def __init__(self, deadline: float, budget: Budget | None, answer: Callable[[str, str], None],
                 exit_code: Callable[[str], int], grace: float = 0.5, interval: float = 0.05):
        self.deadline, self.budget, self.answer, self.exit_code = deadline, budget, answer, exit_code
        self.grace, self.interval = grace, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="graphcert-guard")

    def __enter__(self) -> "ProcessGuard":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() > self.deadline + self.grace:
                self._end("timeout", "the deadline passed inside a stage that cannot be interrupted")
            if self.budget is not None and resident_bytes() > self.budget.total:
                self._end("unknown", f"resident memory passed the memory budget of {self.budget}")

    def _end(self, status: str, reason: str) -> None:
        if self._stop.is_set():
            return
        try:
            self.answer(status, reason)
        finally:
            os._exit(self.exit_code(status))
