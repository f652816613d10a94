"""Input branch and bound chooses the dimension to halve by its leverage on the weakest margin bound: CROWN's
input coefficients A of the margin rows times the box widths (alpha,beta-CROWN's "smart branching" score)."""
from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphcert.verify import verify
from graphcert.verify.input_bab import InputSplitSearch
from graphcert.verify.network import Network
from graphcert.verify.search import Search
from graphcert.vnnlib import load_property
from test_relu_split import write_box_property


def one_hidden_relu(path, w1, b1, w2):
    """Save y = relu(x·w1 + b1)·w2, with a symbolic batch, to `path`; return it."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])],
        path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w2.shape[1]])],
        [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def steep_in_x1(tmp_path):
    """y = relu(10·x1 + 0.1·x0) - relu(-10·x1 - 0.1·x0) + 0.3·relu(x0 + 1) = 10·x1 + 0.1·x0 + 0.3·(x0 + 1) on
    [-1, 1]^2, whose maximum is 10.7; the property "y >= 10.75" holds, and only x1 moves the bound much."""
    w1 = np.array([[0.1, -0.1, 1.0], [10.0, -10.0, 0.0]], dtype=np.float32)
    b1 = np.array([0.0, 0.0, 1.0], dtype=np.float32)
    w2 = np.array([[1.0], [-1.0], [0.3]], dtype=np.float32)
    model = one_hidden_relu(tmp_path / "steep.onnx", w1, b1, w2)
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, 2, -1, 1, "(>= Y_0 10.75)", 1)
    return model, spec


def test_the_split_dimension_is_the_one_the_margin_bound_leans_on(tmp_path):
    model, spec = steep_in_x1(tmp_path)
    search = Search(load_property(spec), Network(model), time.monotonic() + 30, rounding="real")
    branch = InputSplitSearch(search, "crown", branching="inputs")
    lower, upper, alive = search.prop.root_boxes()
    # A box crossing the ReLUs' kink (x1 = -0.01·x0): CROWN's bound is loose there, and the x1 coefficient of the
    # margin row is 100 times x0's.
    lower, upper, alive = lower + [0.5, 0.9], upper - [0.4, 0.9], alive
    _, _, _, margin_lower, leverage = branch._evaluate(lower, upper, alive)
    assert leverage.shape == (1, 2) and leverage[0, 1] > leverage[0, 0]
    assert branch._candidate_dimensions(lower, upper, alive, leverage, np.array([99]))[0, 0] == 1
    # Without coefficients (a bound function of three outputs) the gradient ranks the dimensions the same way.
    assert branch._candidate_dimensions(lower, upper, alive, np.full_like(leverage, np.nan), np.array([99]))[0, 0] == 1
    result = verify(model, spec, timeout=20, rounding="real")
    assert result.status == "holds"


def vee(tmp_path, threshold: float):
    """y = |x0 - 0.3| + |x1 + 0.2| - 0.1·relu(x0) on [-1, 1]^2, whose minimum is -0.03 at (0.3, -0.2); the
    property "y <= threshold" holds below -0.03, and neither IBP nor CROWN proves it on the whole box."""
    w1 = np.array([[1, -1, 0, 0, 1], [0, 0, 1, -1, 0]], dtype=np.float32)
    b1 = np.array([-0.3, 0.3, 0.2, -0.2, 0], dtype=np.float32)
    w2 = np.array([[1], [1], [1], [1], [-0.1]], dtype=np.float32)
    model = one_hidden_relu(tmp_path / "vee.onnx", w1, b1, w2)
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, 2, -1, 1, f"(<= Y_0 {threshold})", 1)
    return model, spec


def test_a_property_input_branching_proves_quickly_never_loads_torch(tmp_path):
    """The thorough attack (which loads torch, about 2 s) waits ROOT_ATTACK_DELAY s of branching."""
    import subprocess
    import sys

    model, spec = vee(tmp_path, -0.035)
    script = ("import sys; from graphcert.verify import verify; "
              f"r = verify({str(model)!r}, {str(spec)!r}, timeout=30, rounding='real'); "
              "print(r.status, r.boxes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    status, boxes, torch_loaded = out[0], int(out[1]), out[2]
    assert status == "holds" and boxes > 1 and torch_loaded == "False"


def test_the_deferred_root_attack_still_comes_once(tmp_path, monkeypatch):
    """y = x0 + x1 >= 1.99999 on [-1, 1]^2 is met only in a sliver at the corner (1, 1), which box centres
    reach only after some 30 halvings: the root attack, due after ROOT_ATTACK_DELAY s of branching, finds it.
    The branching's clock runs 1 s per reading here, so the delay passes after a few rounds."""
    from graphcert.verify import input_bab
    from test_relu_split import write_box_property

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [onnx.numpy_helper.from_array(np.ones((2, 1), dtype=np.float32), "w")])
    model = tmp_path / "sum.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, 2, -1, 1, "(>= Y_0 1.99999)", 1)

    class Clock:
        now = time.monotonic()

        def monotonic(self):
            self.now += 1.0
            return self.now

    clock, calls = Clock(), []
    attack_roots = input_bab.InputSplitSearch._attack_roots

    def spy(self, lower, upper, alive):
        calls.append(clock.now)
        return attack_roots(self, lower, upper, alive)

    monkeypatch.setattr(input_bab, "time", clock)
    monkeypatch.setattr(input_bab, "torch_loaded", lambda: False)
    monkeypatch.setattr(input_bab, "ROOT_ATTACK_DELAY", 3.0)
    monkeypatch.setattr(input_bab.InputSplitSearch, "_attack_roots", spy)
    # (the torch-free descent would find the corner at once: this is about the attack after it)
    monkeypatch.setattr(input_bab.InputSplitSearch, "_descend", lambda self, lower, upper, alive: False)
    search = Search(load_property(spec), Network(model), time.monotonic() + 30, rounding="real")
    status, example, boxes = InputSplitSearch(search, "crown", branching="inputs").run()
    assert status == "violated" and example[0].sum() >= 1.99999
    assert len(calls) == 1 and boxes > 1   # after some branching, not before it


def test_boxes_before_unit_splitting_are_bounded_in_float64_too(tmp_path):
    """Float32 mode bounds the property's boxes in float64 from the start before ReLU splitting as well (one
    graph, no second look at boxes the float32 slack blocks), and the bounds still prove what they should."""
    from test_relu_split import write_box_property

    rng = np.random.default_rng(0)
    n = 70   # over BRANCH_DIMENSIONS: ReLU splitting
    w1, b1 = rng.normal(size=(n, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    w2 = rng.normal(size=(16, 2)).astype(np.float32)
    model = one_hidden_relu(tmp_path / "wide.onnx", w1, b1, w2)
    x = rng.uniform(-1, 1, size=n).astype(np.float32)
    y = np.maximum(x @ w1 + b1, 0) @ w2
    spec = tmp_path / "p.vnnlib"
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(n)) + "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    text += "".join(f"(assert (>= X_{i} {x[i] - 1e-3:.9g}))\n(assert (<= X_{i} {x[i] + 1e-3:.9g}))\n" for i in range(n))
    bigger, smaller = (0, 1) if y[0] > y[1] else (1, 0)
    spec.write_text(text + f"(assert (>= Y_{smaller} Y_{bigger}))\n")
    search = Search(load_property(spec), Network(model), time.monotonic() + 30)
    branch = InputSplitSearch(search, "crown")
    assert branch.branching == "relus" and branch.in_double
    assert verify(model, spec, timeout=30).status == "holds"
