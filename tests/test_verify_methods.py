"""verify --method alpha-crown and auto: same answers as the graph methods, and the clock still rules."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import VNNCOMP
from graphcert.verify import LADDERS, verify
from test_verify import confirmed_by_onnxruntime, tiny_network, write_property


@pytest.mark.parametrize("method", sorted(LADDERS))
def test_ladder_methods_prove_and_falsify_the_tiny_network(tmp_path, method):
    model = tmp_path / "tiny.onnx"
    outputs = tiny_network(model)
    top = float(outputs[:, 0].max())
    spec = tmp_path / "p.vnnlib"
    write_property(spec, [([-1, -1], [1, 1])], f"(>= Y_0 {top + 0.05 * abs(top) + 0.05})")
    assert verify(model, spec, timeout=20, method=method).status == "holds"
    write_property(spec, [([-1, -1], [1, 1])], f"(>= Y_0 {top - 0.05 * abs(top) - 0.05})")
    result = verify(model, spec, timeout=20, method=method)
    assert result.status == "violated" and confirmed_by_onnxruntime(model, spec, result.counterexample)


@pytest.mark.parametrize("method", sorted(LADDERS))
def test_ladder_methods_respect_the_timeout(tmp_path, method):
    # y = -|x0| - |x1| peaks at exactly 0, so "y >= 1e-9" is unreachable yet unprovable within float slack.
    w1 = np.array([[1, -1, 0, 0], [0, 0, 1, -1]], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "peak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(-np.ones((4, 1), np.float32), "w2")])
    model = tmp_path / "peak.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    spec = tmp_path / "p.vnnlib"
    spec.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                    "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 1))\n"
                    "(assert (>= Y_0 0.000000001))\n")
    result = verify(model, spec, timeout=3.0, method=method)
    assert result.status in ("timeout", "unknown")
    assert result.seconds < 4.0


@pytest.mark.skipif(not VNNCOMP.exists(), reason="needs ../shared (VNN-COMP 2021 benchmarks)")
@pytest.mark.parametrize("net, prop, truth", [
    ("ACASXU_run2a_1_2_batch_2000.onnx", "prop_2.vnnlib", "violated"),
    ("ACASXU_run2a_1_1_batch_2000.onnx", "prop_1.vnnlib", "holds"),
])
def test_auto_on_acasxu(net, prop, truth):
    folder = VNNCOMP / "acasxu"
    result = verify(folder / net, folder / prop, timeout=30, method="auto")
    assert result.status != ("holds" if truth == "violated" else "violated")
    if truth == "violated":
        assert result.status == "violated"
