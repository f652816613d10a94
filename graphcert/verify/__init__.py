"""Deciding VNN-LIB properties: falsify, bound the unsafe margins, branch and bound over input boxes or ReLUs.

`verify(model, spec)` answers `holds` (every conjunct of the unsafe set is refuted on every input box),
`violated` (a counterexample that onnxruntime confirms on the original model), `unknown` (the search gave up)
or `timeout`. Bounds come from a bound graph with the property's rows folded in (`bounds`), run on a batch of
boxes at once; boxes that bounds cannot decide are split and re-bounded, and attacked meanwhile
(`input_bab`). Inputs with few dimensions are split as boxes; beyond BRANCH_DIMENSIONS the search splits ReLU
units instead (`relu_bab`). `competition` reads and writes the competition's files.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..alpha_settings import BRANCH_BETA, VERIFY_ALPHA, AlphaSettings
from ..errors import InputError, SpecError
from .competition import (COMPETITION_WORDS, STATUSES, InstanceResult, run_instances,  # noqa: F401
                          summarize, write_result)
from .resources import Budget, OutOfBudget, fewer_collections, parse_memory  # noqa: F401

# The search's modules load onnx, onnxruntime and torch: imported on first use (PEP 562), so that the command
# line starts its deadline guard and reads the property before paying for them.
_LAZY = {"outward_float32": "bounds", "spec_bounds": "bounds", "BRANCH_DIMENSIONS": "input_bab",
         "InputSplitSearch": "input_bab", "Network": "network", "Search": "search"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Result:
    status: str
    counterexample: tuple[np.ndarray, np.ndarray] | None
    seconds: float
    boxes: int = 0          # sub-boxes bounded
    reason: str = ""        # why the answer is unknown or timeout, with the best partial result


def verify(model_path: str | os.PathLike, spec_path: str | os.PathLike, timeout: float = 60.0,
           method: str = "crown", alpha: AlphaSettings = VERIFY_ALPHA, branching: str | None = None,
           beta: AlphaSettings | None = BRANCH_BETA, memory: int | None = None,
           started: float | None = None, rounding: str = "float32", threads: int | None = None) -> Result:
    """Decide whether the property holds on the model within `timeout` seconds (loading included); `alpha`
    tunes alpha-CROWN (methods alpha-crown, auto); `branching` ("inputs" or "relus") overrides the choice
    by input dimension; `beta` tunes the alpha-beta-CROWN bounds of ReLU domains (None: CROWN only);
    `memory` is the budget in bytes (default: half of the memory available now); `started` is when the
    clock started (time.monotonic(), default now: the command line passes its process start); `rounding`
    "float32" (the default) proves `holds` for the model as it runs in float32 (graphcert.rounding), "real"
    in real arithmetic (the competition's reading); `threads` is torch's thread count in the search (default:
    the cores no other task is running on when the search first needs torch, `resources.free_cores`).

    The deadline is checked between stages; a stage that cannot be interrupted (converting the model,
    creating an onnxruntime session) may overrun it here, which `resources.ProcessGuard` bounds for a process.
    """
    if not timeout > 0 or not np.isfinite(timeout):
        raise InputError(f"timeout must be a positive number of seconds, got {timeout}")
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise InputError(f"threads must be a whole number of at least 1, got {threads}")
    start = time.monotonic() if started is None else started
    deadline = start + timeout
    budget = Budget(memory)

    def ended(status: str, reason: str, boxes: int = 0) -> Result:
        return Result(status, None, time.monotonic() - start, boxes, reason)

    from ..vnnlib import load_property
    prop = load_property(spec_path)
    if time.monotonic() > deadline:
        return ended("timeout", "the deadline passed while reading the property")
    from .network import Network
    network = Network(model_path)   # onnx and onnxruntime only: the model is read before torch loads
    if (prop.n_inputs, prop.n_outputs) != (network.n_inputs, network.n_outputs):
        raise SpecError(f"{spec_path} declares {prop.n_inputs} inputs and {prop.n_outputs} outputs, but "
                        f"{model_path} has {network.n_inputs} inputs and {network.n_outputs} outputs")
    if time.monotonic() > deadline:
        return ended("timeout", "the deadline passed while loading the model")
    from .input_bab import InputSplitSearch
    from .search import Search
    if rounding not in ("float32", "real"):
        raise InputError(f"unknown rounding '{rounding}'; choose float32 or real")
    # torch loads when the search first needs it (an attack, alpha/beta-CROWN): `Search.use_torch` sets its threads
    search = Search(prop, network, deadline, budget, rounding, threads)
    try:
        with fewer_collections():
            status, counterexample, boxes = InputSplitSearch(search, method, alpha=alpha, branching=branching,
                                                             beta=beta).run()
    except OutOfBudget as exc:
        status, counterexample, boxes = search.finish("unknown", str(exc))
    finally:
        search.release_torch()
    return Result(status, counterexample, time.monotonic() - start, boxes, search.reason)
