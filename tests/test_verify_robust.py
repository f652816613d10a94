"""verify on networks it was not tuned on: residual nets exported with batch 1, many domains per bound call.

A residual conv net with BatchNorm whose classifier head reshapes to [1, -1] (as batch-1 exports do) must
branch on ReLUs with any number of domains per split-graph call, and give each domain the bounds it gets alone.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphcert.runtime import Session


def residual_network(seed: int = 0) -> onnx.ModelProto:
    """x [1, 1, 6, 6] -> Conv-BN-ReLU -> residual block (Conv-BN-ReLU-Conv-BN + skip, ReLU) -> Reshape [1, -1]
    -> Gemm-ReLU-Gemm -> y [1, 3]; the batch is fixed to 1 as in many exported models."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32 if array.dtype.kind == "f"
                                                         else array.dtype), name))
        return name

    def conv_bn(x, out, c_in, c_out, k):
        w = const(f"{out}_w", rng.normal(size=(c_out, c_in, 3, 3)) / np.sqrt(9 * c_in))
        nodes.append(helper.make_node("Conv", [x, w, const(f"{out}_b", rng.normal(size=c_out) * 0.1)], [f"{out}_c"],
                                      pads=[1, 1, 1, 1]))
        bn = [const(f"{out}_{p}", v) for p, v in (("scale", rng.uniform(0.5, 1.5, c_out)),
                                                  ("shift", rng.normal(size=c_out) * 0.1),
                                                  ("mean", rng.normal(size=c_out) * 0.2),
                                                  ("var", rng.uniform(0.5, 2.0, c_out)))]
        nodes.append(helper.make_node("BatchNormalization", [f"{out}_c", *bn], [out]))
        return out

    h = conv_bn("x", "stem", 1, 4, 3)
    nodes.append(helper.make_node("Relu", [h], ["stem_r"]))
    a = conv_bn("stem_r", "block_a", 4, 4, 3)
    nodes.append(helper.make_node("Relu", [a], ["block_ar"]))
    b = conv_bn("block_ar", "block_b", 4, 4, 3)
    nodes += [helper.make_node("Add", ["stem_r", b], ["skip"]), helper.make_node("Relu", ["skip"], ["skip_r"]),
              helper.make_node("Reshape", ["skip_r", const("flat_shape", np.array([1, -1], dtype=np.int64))],
                               ["flat"]),
              helper.make_node("Gemm", ["flat", const("fc1_w", rng.normal(size=(16, 144)) / 12),
                                        const("fc1_b", rng.normal(size=16) * 0.1)], ["fc1"], transB=1),
              helper.make_node("Relu", ["fc1"], ["fc1_r"]),
              helper.make_node("Gemm", ["fc1_r", const("fc2_w", rng.normal(size=(3, 16)) / 4),
                                        const("fc2_b", np.zeros(3))], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "resnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def write_property(path, low: np.ndarray, high: np.ndarray, unsafe: str, n_outputs: int) -> None:
    lines = [f"(declare-const X_{i} Real)" for i in range(len(low))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_outputs)]
    for i, (a, b) in enumerate(zip(low, high)):
        lines += [f"(assert (>= X_{i} {float(a)!r}))", f"(assert (<= X_{i} {float(b)!r}))"]
    lines.append(f"(assert {unsafe})")
    path.write_text("\n".join(lines) + "\n")


def test_split_bounds_of_a_batch_one_residual_export_take_any_number_of_domains(tmp_path):
    """Three domains in one call of each split graph (clamp and given) bound exactly as each alone does."""
    from graphcert.verify.bounds import SplitBounds
    from graphcert.verify.network import Network
    onnx.save(residual_network(), tmp_path / "res.onnx")
    network = Network(tmp_path / "res.onnx")
    matrix, offset = np.array([[1.0, -1.0, 0.0]], dtype=np.float32), np.zeros(1, dtype=np.float32)
    center = np.random.default_rng(1).uniform(0, 1, size=(3, 36))
    lower, upper = center - [[0.05], [0.1], [0.2]], center + [[0.05], [0.1], [0.2]]
    for mode in ("clamp", "given"):
        bounds = SplitBounds(network, matrix, offset, mode)
        assert bounds.units == 4 * 36 * 3 + 16
        unit_lower = np.full((3, bounds.units), -np.inf if mode == "clamp" else -50.0, dtype=np.float32)
        together = bounds(lower, upper, unit_lower, -unit_lower)
        for k in range(3):
            alone = bounds(lower[k:k + 1], upper[k:k + 1], unit_lower[k:k + 1], -unit_lower[k:k + 1])
            for mine, theirs in zip(together, alone):
                np.testing.assert_allclose(mine[k:k + 1], theirs, rtol=1e-5, atol=1e-5)


def test_relu_branching_on_a_batch_one_residual_export_runs_and_stays_sound(tmp_path):
    """y_0 >= t with t between the sampled maximum and the root bound: ReLU branching bounds many domains
    per call (no crash) and never answers holds below the sampled maximum."""
    import torch  # noqa: F401  (loaded outside the timed search: this test is about branching, not start-up)

    from graphcert.verify import verify
    from graphcert.verify.bounds import SplitBounds
    from graphcert.verify.network import Network
    model = tmp_path / "res.onnx"
    onnx.save(residual_network(seed=2), model)
    low, high = np.zeros(36), np.full(36, 0.6)
    points = np.random.default_rng(0).uniform(low, high, size=(3000, 36)).astype(np.float32)
    session = Session(onnx.load(model))
    top = max(float(session.run({"x": p.reshape(1, 1, 6, 6)})["y"][0, 0]) for p in points)
    network = Network(model)
    root = SplitBounds(network, -np.eye(3, dtype=np.float32)[:1], np.zeros(1, dtype=np.float32), "clamp")
    unbounded = np.full((1, root.units), np.inf, dtype=np.float32)
    bound = -float(root(low[None], high[None], -unbounded, unbounded)[0][0, 0])   # upper bound of y_0
    assert bound > top + 0.05
    spec = tmp_path / "p.vnnlib"
    write_property(spec, low, high, f"(>= Y_0 {top + 0.5 * (bound - top)})", 3)
    result = verify(model, spec, timeout=6, method="crown", branching="relus")
    assert result.status in ("holds", "timeout") and result.boxes > 2
    write_property(spec, low, high, f"(>= Y_0 {top - 1e-3})", 3)
    assert verify(model, spec, timeout=6, method="crown", branching="relus").status == "violated"


# ---- memory budget, deadline, many boxes ------------------------------------------------------------------

def index_network(path, seed: int = 0) -> None:
    """A learned-index-like model: one input key -> 16 -> 16 -> one position, batch 1 as exported."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.normal(size=(1, 16))), ("b1", rng.normal(size=16)), ("w2", rng.normal(size=(16, 16)) / 4),
        ("b2", rng.normal(size=16) * 0.1), ("w3", rng.normal(size=(16, 1)) / 4), ("b3", np.zeros(1)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["z1"]),
             helper.make_node("Relu", ["z1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["z2"]), helper.make_node("Relu", ["z2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["m3"]), helper.make_node("Add", ["m3", "b3"], ["y"])]
    graph = helper.make_graph(nodes, "index", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def held_index_instance(tmp_path):
    """(model, spec): the learned-index model and a property on two key ranges that its bounds prove."""
    model, spec = tmp_path / "index.onnx", tmp_path / "p.vnnlib"
    index_network(model)
    boxes_property(spec, np.linspace(-1, 1, 3), "(>= Y_0 1000.0)")
    return model, spec


def boxes_property(path, edges: np.ndarray, unsafe: str) -> None:
    """X_0 in one of the boxes [edges[k], edges[k + 1]] (as learned-index specs list thousands of key ranges)."""
    terms = " ".join(f"(and (>= X_0 {float(a)!r}) (<= X_0 {float(b)!r}))" for a, b in zip(edges[:-1], edges[1:]))
    path.write_text(f"(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (or {terms}))\n(assert {unsafe})\n")


def test_a_spec_with_2000_input_boxes_is_decided_within_its_timeout(tmp_path):
    import time

    from graphcert.verify import verify
    model, spec = tmp_path / "index.onnx", tmp_path / "p.vnnlib"
    index_network(model)
    edges = np.linspace(-1, 1, 2001)
    keys = np.linspace(-1, 1, 20001, dtype=np.float32)[:, None]
    session = Session(onnx.load(model))
    outputs = np.concatenate([session.run({"x": k[None]})["y"].reshape(-1) for k in keys[::10]])
    boxes_property(spec, edges, f"(>= Y_0 {float(outputs.max()) + 1.0})")
    # The budget counts the whole process, and a long pytest run already holds over a gigabyte: 1 GB more.
    from graphcert.verify.resources import resident_bytes
    budget = resident_bytes() + (1 << 30)
    began = time.monotonic()
    result = verify(model, spec, timeout=20, memory=budget)
    assert result.status == "holds" and time.monotonic() - began < 21
    boxes_property(spec, edges, f"(>= Y_0 {float(outputs.max()) - 1e-3})")
    result = verify(model, spec, timeout=20, memory=budget)
    assert result.status == "violated"
    x, y = result.counterexample
    assert float(session.run({"x": x.reshape(1, 1)})["y"][0, 0]) >= float(outputs.max()) - 1e-3


def test_a_budget_too_small_answers_unknown_with_its_reason(tmp_path):
    """A budget below what the process already holds: once a bound call is measured, the next cannot fit,
    and verify says so instead of growing (a property that needs branching, so later calls are due)."""
    from graphcert.verify import verify
    model, spec = tmp_path / "res.onnx", tmp_path / "p.vnnlib"
    onnx.save(residual_network(seed=2), model)
    write_property(spec, np.zeros(36), np.full(36, 0.6), "(>= Y_0 0.5)", 3)
    result = verify(model, spec, timeout=20, memory=64 << 20, branching="inputs")
    assert result.status == "unknown" and "memory budget" in result.reason


def test_memory_sizes_parse_and_bad_ones_are_one_line_errors():
    import pytest

    from graphcert.errors import InputError
    from graphcert.verify.resources import parse_memory
    assert parse_memory("2GB") == 2 << 30 and parse_memory("512MB") == 512 << 20 and parse_memory("1.5") == 3 << 29
    for bad in ("", "-1GB", "3xb", "10MB", "nan"):
        with pytest.raises(InputError):
            parse_memory(bad)


def test_an_isolated_job_past_its_deadline_or_budget_is_answered_and_ended():
    """The guard answers for a child stuck in one uninterruptible call, within a second of its deadline; a
    child that grows past its budget is ended with unknown; a crash is reported, not raised."""
    import time

    from graphcert.verify.isolate import run_isolated
    from graphcert.verify.resources import Budget, resident_bytes

    def stuck():
        time.sleep(30)

    def hungry():
        hoard = []
        while True:
            hoard.append(np.ones(1 << 24))   # 128 MB a step

    def broken():
        raise ValueError("a bug")

    began = time.monotonic()
    outcome = run_isolated(stuck, began + 1.0, None, lambda status, reason: (status, reason))
    assert outcome.kind == "result" and outcome.value[0] == "timeout" and time.monotonic() - began < 2.0
    outcome = run_isolated(hungry, time.monotonic() + 20, Budget(resident_bytes() + (256 << 20)),
                           lambda status, reason: (status, reason))
    assert outcome.value[0] == "unknown" and "memory" in outcome.value[1]
    assert outcome.peak_bytes < resident_bytes() + (1 << 30)
    outcome = run_isolated(broken, time.monotonic() + 20, None, lambda status, reason: (status, reason))
    assert outcome.kind == "crash" and "a bug" in outcome.value


def test_a_supervised_child_that_is_answering_at_the_deadline_answers_alone():
    """A child that has begun to answer (claim_answer) when the deadline and grace pass is let finish: the
    parent does not answer as well (one verdict per run, the child's, with its partial result); a child that
    has not claimed is answered for."""
    import os
    import time

    from graphcert.verify import isolate

    def run(claim: bool):
        answered = []
        # (a second before the deadline: a fork on a busy machine can take a few tenths)
        code = isolate.supervise(time.monotonic() + 1.0, None, lambda status, reason: answered.append(status),
                                 lambda status: 30, grace=0.2)
        if code is None:   # the child
            try:
                if claim:
                    isolate.claim_answer()
                # printing, slowly: past the deadline and grace (1.2 s), within the answer time after them
                time.sleep(1.2 + isolate.ANSWER_SECONDS / 2)
            finally:
                os._exit(7)
        return code, answered

    assert run(claim=True) == (7, [])
    assert run(claim=False) == (30, ["timeout"])


def test_the_command_line_refuses_a_timeout_that_is_not_positive(tmp_path, capsys):
    import cli
    model, spec = tmp_path / "index.onnx", tmp_path / "p.vnnlib"
    index_network(model)
    boxes_property(spec, np.linspace(-1, 1, 3), "(>= Y_0 100.0)")
    for timeout in ("-1", "0", "nan"):
        assert cli.main(["verify", str(model), str(spec), "--timeout", timeout]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--timeout" in err
    assert cli.main(["verify", str(model), str(spec), "--memory", "lots"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    from graphcert.verify.resources import resident_bytes   # the budget counts the whole (pytest) process
    budget = f"{(resident_bytes() >> 20) + 1024}MB"
    assert cli.main(["verify", str(model), str(spec), "--timeout", "10", "--memory", budget]) == 0


def test_the_command_answers_within_a_second_of_its_timeout_from_process_start(tmp_path):
    """`verify --timeout 1` as its own process: whatever it is doing at the deadline (here, most likely still
    importing), the supervising parent answers within the promised second, writes the result file and exits
    with the verdict's code."""
    import os
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model, spec, out = tmp_path / "index.onnx", tmp_path / "p.vnnlib", tmp_path / "result.txt"
    index_network(model)
    boxes_property(spec, np.linspace(-1, 1, 3), "(>= Y_0 100.0)")
    began = time.monotonic()
    done = subprocess.run([sys.executable, os.path.join(root, "cli.py"), "verify", str(model), str(spec),
                           "--timeout", "1", "--out", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=root))
    assert time.monotonic() - began < 2.0
    assert (done.returncode, done.stdout.strip()) in ((0, "holds"), (30, "timeout"))
    assert out.read_text().split()[0] == {"holds": "unsat", "timeout": "timeout"}[done.stdout.strip()]


def wide_conv_network(seed: int = 0) -> onnx.ModelProto:
    """x [batch, 1, 28, 28] -> Conv 32x2x2 -> ReLU -> MaxPool 4x4/4 -> Flatten -> Gemm -> y [batch, 10]: small,
    but CROWN's bounds of its 23,328 convolution outputs start from a 23,328 x 23,328 identity (tens of GB)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(32, 1, 2, 2)).astype(np.float32) / 2, "cw"),
             numpy_helper.from_array(rng.normal(size=32).astype(np.float32) * 0.1, "cb"),
             numpy_helper.from_array(rng.normal(size=(1152, 10)).astype(np.float32) / 34, "fw")]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fw"], ["y"])]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_a_bound_graph_too_large_for_the_budget_is_left_out_before_it_runs(tmp_path):
    """CROWN's graph of the wide conv net would take tens of GB for one box (the process was once killed at 23
    GB): verify sees that from the graph's shapes and bounds with IBP instead, within the budget, and proves
    what IBP proves (the label at the centre keeps a clear margin over a tiny box)."""
    from graphcert.verify import verify
    from graphcert.verify.resources import PeakSampler, resident_bytes
    model, spec = tmp_path / "wide.onnx", tmp_path / "p.vnnlib"
    proto = wide_conv_network()
    onnx.save(proto, model)
    centre = np.random.default_rng(1).uniform(0, 1, 784).astype(np.float32)
    y = Session(proto).run({"x": centre.reshape(1, 1, 28, 28)})["y"][0]
    label, other = int(np.argmax(y)), int(np.argsort(y)[-2])
    write_property(spec, centre - 1e-4, centre + 1e-4, f"(>= Y_{other} Y_{label})", 10)
    budget = resident_bytes() + (2 << 30)
    with PeakSampler() as sampler:
        result = verify(model, spec, timeout=60, memory=budget, method="crown")
    assert result.status == "holds", result.reason
    assert sampler.growth < 2 << 30


def test_call_sizes_grow_when_callers_ask_for_less_than_the_size():
    """A caller that asks for fewer items than the current size (input branch and bound pops size / candidates
    parents) still lets quick calls grow the size; before, ACAS Xu bounded 6 boxes per call."""
    import time

    from graphcert.verify.search import CallSizer
    sizer = CallSizer(size=8, seconds=0.05)
    for _ in range(4):
        for part in sizer.slices(6, time.monotonic() + 60):
            time.sleep(0.001)
    assert sizer.size > 8
    slow = CallSizer(size=8, seconds=0.05)
    for part in slow.slices(6, time.monotonic() + 60):
        time.sleep(0.1)   # a slow partial call never shrinks the size
    assert slow.size == 8


def test_a_call_is_cut_to_end_by_the_deadline():
    """Near the deadline a call is sized to what the time left allows at the last measured rate, so that a stage
    that does not watch the clock inside its calls (the ReLU look-ahead) ends by the deadline."""
    import time

    from graphcert.verify.search import CallSizer
    sizer = CallSizer(size=100, seconds=1.0)   # 100 items a second
    deadline = time.monotonic() + 0.3
    ends = []
    for part in sizer.slices(1000, deadline):
        if part is None:
            break
        time.sleep(0.01 * (part.stop - part.start))
        ends.append(time.monotonic())
    assert ends and max(ends) < deadline + 0.05
    assert CallSizer(size=100, seconds=1.0).slices(1000, time.monotonic() + 60).__next__() == slice(0, 100)


def test_the_search_runs_with_fewer_collections_and_restores_the_collector(tmp_path, monkeypatch):
    """While a search runs, what was alive at its start is frozen (left out of cyclic collections) and the
    thresholds are raised; verify restores both, also when the search raises."""
    import gc

    from graphcert.verify import input_bab, verify
    from graphcert.verify.resources import SEARCH_GC_THRESHOLD
    model, spec = held_index_instance(tmp_path)
    before = gc.get_threshold()
    seen = []
    original = input_bab.InputSplitSearch.run

    def run(self):
        seen.append((gc.get_threshold(), gc.get_freeze_count()))
        return original(self)
    monkeypatch.setattr(input_bab.InputSplitSearch, "run", run)
    assert verify(model, spec, timeout=20).status == "holds"
    assert seen[0][0] == SEARCH_GC_THRESHOLD and seen[0][1] > 1000
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0

    def fail(self):
        raise RuntimeError("a failing search")
    monkeypatch.setattr(input_bab.InputSplitSearch, "run", fail)
    with pytest.raises(RuntimeError):
        verify(model, spec, timeout=20)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_the_search_threads_are_the_free_cores_and_the_other_jobs_take_theirs(monkeypatch):
    """`free_cores`: every core this process may use on an idle machine (OMP_NUM_THREADS caps it), one once
    other jobs keep every core busy (threads waiting for a descheduled sibling would stall every kernel)."""
    import os
    import subprocess
    import sys

    from graphcert.verify.resources import free_cores
    cores = len(os.sched_getaffinity(0))
    assert 1 <= free_cores() <= cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert free_cores() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    spin = "import time\nend = time.time() + 30\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores)]
    try:
        import time
        time.sleep(0.5)
        assert free_cores() == 1
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_the_search_runs_torch_with_the_threads_asked_and_restores_them(tmp_path, monkeypatch):
    """verify(threads=k) runs the search's torch kernels with k threads, restores torch's count after (also when
    the search raises), and refuses a count below 1 (on the command line, a one-line error)."""
    import os

    import torch

    import cli
    from graphcert.errors import InputError
    from graphcert.verify import input_bab, verify
    model, spec = held_index_instance(tmp_path)
    before = torch.get_num_threads()
    seen = []
    original = input_bab.InputSplitSearch.run

    def run(self):   # as an attack or alpha-CROWN would, before the search itself
        self.search.use_torch()
        seen.append(torch.get_num_threads())
        return original(self)
    monkeypatch.setattr(input_bab.InputSplitSearch, "run", run)
    for threads in (1, 2):
        assert verify(model, spec, timeout=20, threads=threads).status == "holds"
        assert seen[-1] == threads and torch.get_num_threads() == before
    assert verify(model, spec, timeout=20).status == "holds"   # the free cores
    assert 1 <= seen[-1] <= len(os.sched_getaffinity(0)) and torch.get_num_threads() == before

    def fail(self):
        self.search.use_torch()
        raise RuntimeError("a failing search")
    monkeypatch.setattr(input_bab.InputSplitSearch, "run", fail)
    with pytest.raises(RuntimeError):
        verify(model, spec, timeout=20, threads=2)
    assert torch.get_num_threads() == before
    for threads in (0, -1, 1.5):
        with pytest.raises(InputError, match="threads"):
            verify(model, spec, timeout=20, threads=threads)
    assert cli.main(["verify", str(model), str(spec), "--threads", "0"]) == 2
