"""ONNX's operator conformance suite (the backend node tests) through graphcert's bound passes.

The node tests come from the installed `onnx` package: `onnx.backend.test.case.node.collect_testcases()`
builds every test (model and data sets from onnx's reference implementation) in memory, so nothing needs to be
downloaded or generated on disk. A test is in scope when every graph input is a floating-point tensor. Each
in-scope test is converted by each method and lands in one class:

  sound      the bound graph runs; at eps = 0 its bounds contain the test's expected outputs (within the
             test's own tolerance), and at a small eps every sampled, corner and attacked point's output
             (onnxruntime on the original model) lies inside the bounds;
  UNSOUND    it converts but one of those checks fails;
  refused    a typed graphcert error (one line naming the op and why);
  crashed    any other exception, a timeout or a worker that died (memory).

Tests run in worker processes with a per-test timeout and an address-space limit, so one bad test cannot
hang the run or exhaust memory.

    python benchmarks/onnx_node_suite.py [--methods ibp,crown] [--jobs 2] [--timeout 60] [--only REGEX]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import time
import traceback
from collections import Counter, defaultdict
from multiprocessing.connection import wait

import numpy as np

FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64, 16: None}  # 16: bfloat16 (no numpy type)
EPSILON = 0.01
SAMPLES, CORNERS, ATTACK_STEPS = 24, 16, 24
MEMORY_LIMIT = 3 << 30


# ---- the test cases ----------------------------------------------------------------------------------

def collect() -> dict:
    import warnings

    from onnx.backend.test.case import node
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases()
    return {c.name: c for c in cases if c.model is not None}


def in_scope(case) -> bool:
    inputs = case.model.graph.input
    return len(inputs) > 0 and all(i.type.HasField("tensor_type") and i.type.tensor_type.elem_type in FLOAT_TYPES
                                   for i in inputs)


def primary_op(case, cases: dict) -> str:
    """The op a test is about: its single node, or for an `_expanded` test the op of the test it expands."""
    name = case.name
    if "_expanded" in name:
        base = cases.get(name.replace("_expanded_ver18", "").replace("_expanded", ""))
        if base is not None and len(base.model.graph.node) == 1:
            return base.model.graph.node[0].op_type + " (expanded)"
    ops = [n.op_type for n in case.model.graph.node]
    return ops[0] if len(set(ops)) == 1 else "+".join(sorted(set(ops)))


def _array(x):
    from onnx import numpy_helper
    return np.asarray(x) if isinstance(x, np.ndarray | np.generic) else numpy_helper.to_array(x)


# ---- one test, one method ----------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# Inputs that set an op's output shape (Resize's roi, scales and sizes; Upsample's scales; OneHot's depth): the
# suite makes them constants holding the test's values, as a deployed model has them, since a perturbed output
# shape is no bound at all. Every other float input is perturbed.
SHAPE_PARAMETERS = {"Resize": (1, 2, 3), "Upsample": (1,), "OneHot": (1,)}


class _Case:
    def __init__(self, name, model, data_sets, rtol, atol):
        self.name, self.model, self.data_sets, self.rtol, self.atol = name, model, data_sets, rtol, atol


def with_shape_parameters_fixed(case):
    """The case with every graph input a node reads as a shape parameter turned into a constant holding the first
    data set's value (the data sets that feed other values there are dropped)."""
    from onnx import numpy_helper
    graph = case.model.graph
    parameters = {node.input[k] for node in graph.node for k in SHAPE_PARAMETERS.get(node.op_type, ())
                  if k < len(node.input)}
    names = [i.name for i in graph.input]
    fixed = [k for k, n in enumerate(names) if n in parameters]
    if not fixed or not case.data_sets:
        return case
    first = [_array(case.data_sets[0][0][k]) for k in fixed]
    kept = [(list(given), expected) for given, expected in case.data_sets
            if all(np.array_equal(_array(given[k]), v) for k, v in zip(fixed, first))]
    model = type(case.model)()
    model.CopyFrom(case.model)
    del model.graph.input[:]
    model.graph.input.extend([i for k, i in enumerate(graph.input) if k not in fixed])
    model.graph.initializer.extend([numpy_helper.from_array(np.asarray(v), names[k]) for k, v in zip(fixed, first)])
    data_sets = [([x for k, x in enumerate(given) if k not in fixed], expected) for given, expected in kept]
    return _Case(case.name, model, data_sets, case.rtol, case.atol)


def run_case(case, method: str) -> dict:
    """Convert `case` by `method` and check the bound graph; returns {"status", "detail"}."""
    from graphcert import api
    from graphcert.errors import GraphcertError
    from graphcert.export import to_proto
    case = with_shape_parameters_fixed(case)
    try:
        # As `convert` writes it: a float16/bfloat16/float64 model's graph takes and returns that type.
        bound = to_proto(api.bound_graph(api.load(case.model), method, native_types=True))
    except GraphcertError as exc:
        return {"status": "refused", "detail": _one_line(exc)}
    except Exception as exc:
        return {"status": "crashed", "detail": _one_line(exc), "where": _where(exc)}
    try:
        problem = check(case, _float32_interface(bound))
    except Exception as exc:
        return {"status": "crashed", "detail": "bound graph: " + _one_line(exc), "where": _where(exc)}
    if problem:
        return {"status": "UNSOUND", "detail": problem}
    return {"status": "sound", "detail": ""}


def _float32_interface(proto):
    """onnxruntime's Python API cannot feed or fetch bfloat16 arrays: give the bound graph's bfloat16 inputs
    and outputs a float32 interface by exact casts (every bfloat16 is a float32; the test data is bfloat16)."""
    from onnx import TensorProto, helper
    bf16 = TensorProto.BFLOAT16
    if not any(v.type.tensor_type.elem_type == bf16 for v in list(proto.graph.input) + list(proto.graph.output)):
        return proto
    out = type(proto)()
    out.CopyFrom(proto)
    graph, entry, exit_ = out.graph, [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type == bf16:
            inner = value.name + "__bf16"
            for node in graph.node:
                node.input[:] = [inner if n == value.name else n for n in node.input]
            entry.append(helper.make_node("Cast", [value.name], [inner], to=bf16))
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for value in graph.output:
        if value.type.tensor_type.elem_type == bf16:
            inner = value.name + "__bf16"
            for node in graph.node:
                node.output[:] = [inner if n == value.name else n for n in node.output]
                node.input[:] = [inner if n == value.name else n for n in node.input]
            exit_.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT))
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = entry + list(graph.node) + exit_
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "graphcert" in f.filename or "passes" in f.filename]
    frame = (ours or frames or [None])[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""


def _session(proto):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


class ReferenceSession:
    """onnx's reference evaluator behind onnxruntime's `run(names, feeds)`, for a bound graph onnxruntime cannot
    load because the model's own node has no kernel there at its opset (onnxruntime fails on the model too)."""

    def __init__(self, proto, error):
        from onnx.reference import ReferenceEvaluator
        self.evaluator = ReferenceEvaluator(proto)
        self.error = error

    def run(self, names, feeds):
        return self.evaluator.run(names, feeds)


def check(case, bound) -> str:
    """'' when sound on every data set, else what failed."""
    inputs = [i.name for i in case.model.graph.input]
    outputs = [o.name for o in case.model.graph.output]
    bounded = [o for o in outputs if any(b.name == f"{o}_lower" for b in bound.graph.output)]
    if not bounded:
        return ""  # no output depends on the inputs: nothing to bound
    eps_inputs = [i.name for i in bound.graph.input if i.name.endswith("epsilon")]
    single = eps_inputs == ["epsilon"]
    eps_types = {i.name: _no_bfloat16(np.zeros(0, onnx_helper().tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))).dtype
                 for i in bound.graph.input if i.name in eps_inputs}
    try:
        session = _session(bound)
    except Exception as exc:  # onnxruntime lacks a kernel of the model's own opset (the original fails alike)
        session = ReferenceSession(bound, exc)
    try:
        original = _session(case.model)
    except Exception:
        original = None  # onnxruntime cannot run the op itself: only eps = 0 against expected outputs
    wanted = [f"{o}_{s}" for o in bounded for s in ("lower", "upper")]
    rtol, atol = max(case.rtol, 1e-5), max(case.atol, 1e-5)
    rng = np.random.default_rng(0)
    out_types = {o.name: o.type.tensor_type.elem_type for o in case.model.graph.output}
    for given, expected in case.data_sets:
        given = [_no_bfloat16(np.asarray(_array(x))) for x in given]
        feeds = dict(zip(inputs, given))

        def bounds_at(eps):
            extra = {}
            for name, x in zip(inputs, given):
                key = "epsilon" if single else f"{name}_epsilon"
                extra[key] = np.full((1,) * np.ndim(x), eps, dtype=eps_types[key])
            values = session.run(wanted, {**feeds, **extra})
            return {o: (values[2 * k].astype(np.float64), values[2 * k + 1].astype(np.float64))
                    for k, o in enumerate(bounded)}

        # eps = 0: the bounds hold the reference output.
        for out, value in zip(outputs, expected):
            if out not in bounded or not isinstance(value, np.ndarray | np.generic | onnx_tensor_type()):
                continue
            lower, upper = bounds_at(0.0)[out]
            problem = _outside(_array(value), lower, upper, rtol, atol, "eps=0 expected output")
            if problem:
                return f"{out}: {problem}"
        if original is not None:
            try:
                original.run(bounded, feeds)
            except Exception:  # an output type numpy cannot hold (int4): eps = 0 only
                original = None
        if original is None:
            continue
        box = bounds_at(EPSILON)
        for where, points in _points(rng, given, original, inputs, box, bounded, out_types):
            values = _decoded(original.run(bounded, {k: np.asarray(v) for k, v in zip(inputs, points)}),
                              [out_types[o] for o in bounded])
            for out, value in zip(bounded, values):
                problem = _outside(value, *box[out], rtol, atol, f"eps={EPSILON} {where}")
                if problem:
                    return f"{out}: {problem}"
    return ""


def _decoded(values, elem_types):
    """onnxruntime returns 8-bit float outputs as their raw bytes (uint8): read them as the numbers they are."""
    import ml_dtypes
    from onnx import TensorProto as T
    numbers = {T.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn, T.FLOAT8E4M3FNUZ: ml_dtypes.float8_e4m3fnuz,
               T.FLOAT8E5M2: ml_dtypes.float8_e5m2, T.FLOAT8E5M2FNUZ: ml_dtypes.float8_e5m2fnuz,
               T.FLOAT8E8M0: ml_dtypes.float8_e8m0fnu}
    return [np.asarray(v).view(numbers[t]).astype(np.float32) if t in numbers and np.asarray(v).dtype == np.uint8
            else v for v, t in zip(values, elem_types)]


def _no_bfloat16(x):
    return x.astype(np.float32) if x.dtype.name == "bfloat16" else x


def onnx_helper():
    from onnx import helper
    return helper


def onnx_tensor_type():
    from onnx import TensorProto
    return TensorProto


def _outside(value, lower, upper, rtol, atol, where) -> str:
    value = np.asarray(value)
    if value.dtype.kind not in "fiub":
        return ""
    value = value.astype(np.float64)
    try:
        lower, upper = np.broadcast_to(lower, value.shape), np.broadcast_to(upper, value.shape)
    except ValueError:
        return f"bounds of shape {np.shape(lower)} for an output of shape {value.shape}"
    tolerance = atol + rtol * np.abs(np.where(np.isfinite(value), value, 0.0))
    same_inf = np.isinf(value) & ((value == lower) | (value == upper))
    inside = ((lower - tolerance <= value) & (value <= upper + tolerance)) | same_inf | np.isnan(value)
    if np.all(inside):
        return ""
    k = np.flatnonzero(~inside)[0]
    return f"{where}: value {value.flat[k]:.6g} outside [{lower.flat[k]:.6g}, {upper.flat[k]:.6g}]"


def _points(rng, given, original, inputs, box, bounded, out_types):
    """Random points, corners and a random-search attack on each bound of the L-inf ball around `given`."""
    floats = [np.issubdtype(x.dtype, np.floating) for x in given]

    def draw(kind):
        out = []
        for x, f in zip(given, floats):
            if not f:
                out.append(x)
                continue
            u = rng.uniform(-1, 1, x.shape) if kind == "random" else rng.choice([-1.0, 1.0], x.shape)
            out.append((x.astype(np.float64) + EPSILON * u).astype(x.dtype))
        return out

    for _ in range(SAMPLES):
        yield "random point", draw("random")
    for _ in range(CORNERS):
        yield "corner", draw("corner")
    # Random-search attack: keep a move when it brings some output closer to (or past) its bound.
    for out in bounded:
        lower, upper = box[out]
        for sign in (1.0, -1.0):
            current = draw("random")
            best = _score(original, inputs, current, out, lower, upper, sign, out_types[out])
            for _ in range(ATTACK_STEPS):
                candidate = [np.clip(c + (EPSILON * 0.5 * rng.choice([-1.0, 0.0, 1.0], c.shape)).astype(c.dtype),
                                     x - EPSILON, x + EPSILON).astype(x.dtype) if f else c
                             for c, x, f in zip(current, given, floats)]
                score = _score(original, inputs, candidate, out, lower, upper, sign, out_types[out])
                if score >= best:
                    current, best = candidate, score
            yield "attacked point", current


def _score(session, inputs, points, out, lower, upper, sign, out_type) -> float:
    value = _decoded(session.run([out], {k: np.asarray(v) for k, v in zip(inputs, points)}), [out_type])[0]
    value = value.astype(np.float64)
    gap = (value - upper) if sign > 0 else (lower - value)
    gap = np.where(np.isfinite(gap), gap, -np.inf)
    return float(np.max(gap)) if gap.size else -np.inf


# ---- workers with a timeout and a memory limit -------------------------------------------------------

def _worker(conn, methods):
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    cases = collect()
    conn.send("ready")
    while True:
        name = conn.recv()
        if name is None:
            return
        result = {}
        for method in methods:
            try:
                result[method] = run_case(cases[name], method)
            except MemoryError:
                result[method] = {"status": "crashed", "detail": "MemoryError"}
        conn.send((name, result))


class Pool:
    def __init__(self, jobs, methods, timeout):
        self.methods, self.timeout = methods, timeout
        self.slots = [self._spawn() for _ in range(jobs)]

    def _spawn(self):
        parent, child = mp.Pipe()
        process = mp.get_context("fork").Process(target=_worker, args=(child, self.methods), daemon=True)
        process.start()
        parent.recv()
        return {"conn": parent, "process": process, "name": None, "since": 0.0}

    def run(self, names, on_result):
        queue = list(names)
        while queue or any(s["name"] for s in self.slots):
            for slot in self.slots:
                if slot["name"] is None and queue:
                    slot["name"], slot["since"] = queue.pop(0), time.time()
                    slot["conn"].send(slot["name"])
            busy = [s for s in self.slots if s["name"]]
            ready = wait([s["conn"] for s in busy], timeout=1.0)
            for slot in busy:
                if slot["conn"] in ready:
                    try:
                        name, result = slot["conn"].recv()
                    except EOFError:
                        name, result = slot["name"], self._dead("worker died (out of memory?)")
                        self._replace(slot)
                    on_result(name, result)
                    slot["name"] = None
                elif time.time() - slot["since"] > self.timeout:
                    on_result(slot["name"], self._dead(f"timeout after {self.timeout:.0f} s"))
                    self._replace(slot)
                    slot["name"] = None
        for slot in self.slots:
            slot["conn"].send(None)

    def _dead(self, why):
        return {m: {"status": "crashed", "detail": why} for m in self.methods}

    def _replace(self, slot):
        slot["process"].kill()
        slot["process"].join()
        slot.update(self._spawn())


# ---- report ------------------------------------------------------------------------------------------

STATUSES = ["sound", "UNSOUND", "refused", "crashed"]


def report(results: dict, ops: dict, methods, out=sys.stdout) -> None:
    total = len(results)
    print(f"\n{total} in-scope tests (every graph input floating point)\n", file=out)
    print(f"{'method':8s} " + " ".join(f"{s:>9s}" for s in STATUSES) + f" {'converted':>9s}", file=out)
    for m in methods:
        counts = Counter(r[m]["status"] for r in results.values())
        converted = counts["sound"] + counts["UNSOUND"]
        print(f"{m:8s} " + " ".join(f"{counts[s]:9d}" for s in STATUSES) + f" {converted:9d}", file=out)
    by_op = defaultdict(list)
    for name, r in results.items():
        by_op[ops[name]].append(r)
    print("\nper op: sound/tests for each method; first refusal or crash", file=out)
    for op in sorted(by_op):
        rows = by_op[op]
        cells = [f"{sum(r[m]['status'] == 'sound' for r in rows)}/{len(rows)}" for m in methods]
        bad = [r[m] for r in rows for m in methods if r[m]["status"] != "sound"]
        note = f"{bad[0]['status']}: {bad[0]['detail'][:110]}" if bad else ""
        print(f"  {op:38s} " + " ".join(f"{c:>7s}" for c in cells) + f"  {note}", file=out)
    for status in ("UNSOUND", "crashed"):
        listed = [(n, m, r[m]) for n, r in sorted(results.items()) for m in methods if r[m]["status"] == status]
        if listed:
            print(f"\n{status}:", file=out)
            for name, m, r in listed:
                print(f"  {m:6s} {name}: {r['detail'][:160]} {r.get('where', '')}", file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ibp,crown")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per test, all methods together")
    parser.add_argument("--only", default=None, help="regex on test names")
    parser.add_argument("--json", default=None, help="write per-test results here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    methods = args.methods.split(",")
    cases = collect()
    names = sorted(n for n, c in cases.items() if in_scope(c) and (not args.only or re.search(args.only, n)))
    ops = {n: primary_op(cases[n], cases) for n in names}
    results = {}
    started = time.time()

    def record(name, result):
        results[name] = result
        if len(results) % 50 == 0:
            print(f"  {len(results)}/{len(names)} tests, {time.time() - started:.0f} s", file=sys.stderr)

    Pool(args.jobs, methods, args.timeout).run(names, record)
    report(results, ops, methods)
    print(f"\n{time.time() - started:.0f} s wall", file=sys.stderr)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"ops": ops, "results": results}, f, indent=1, sort_keys=True)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
