"""CROWN skips the backward pass for the output of a non-decreasing element-wise op on an exactly bounded tensor
(IBP's [f(l), f(u)] is then exact): the bounds stay those of the full pass, the graph shrinks (a wide
convolution followed by ReLU and MaxPool: tens of GB of coefficients per box before, a few MB now)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphcert import api
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.passes import crown
from graphcert.runtime import Session
from graphcert.verify.resources import graph_bytes_per_sample

from test_verify_robust import wide_conv_network


def pooled_network(activation: str, seed: int = 0) -> onnx.ModelProto:
    """x [batch, 2, 8, 8] -> Conv 6x3x3 -> activation -> MaxPool 2x2 -> Conv -> activation -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 2, 3, 3)).astype(np.float32) / 3, "c1"),
             numpy_helper.from_array(rng.normal(size=(4, 6, 2, 2)).astype(np.float32) / 3, "c2"),
             numpy_helper.from_array(rng.normal(size=(16, 3)).astype(np.float32) / 4, "fc")]
    nodes = [helper.make_node("Conv", ["x", "c1"], ["a"]), helper.make_node(activation, ["a"], ["b"]),
             helper.make_node("MaxPool", ["b"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "c2"], ["c"]), helper.make_node(activation, ["c"], ["d"]),
             helper.make_node("Flatten", ["d"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def bounds(model, lower, upper):
    proto = to_proto(api.bound_graph(api.load(model), "crown", InputSet("box")))
    name = model.graph.input[0].name
    out = Session(proto).run({f"{name}_lower": lower, f"{name}_upper": upper})
    return out["y_lower"], out["y_upper"], proto


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid", "Tanh"])
def test_the_bounds_are_those_of_the_full_backward_pass_and_hold(activation, monkeypatch):
    model = pooled_network(activation)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (4, 2, 8, 8)).astype(np.float32)
    lower, upper = x - np.float32(0.1), x + np.float32(0.1)
    low, high, proto = bounds(model, lower, upper)
    monkeypatch.setattr(crown, "_POINTWISE_MONOTONE", set())
    full_low, full_high, full_proto = bounds(model, lower, upper)
    assert np.allclose(low, full_low, rtol=1e-5, atol=1e-5) and np.allclose(high, full_high, rtol=1e-5, atol=1e-5)
    assert len(proto.graph.node) < len(full_proto.graph.node)
    points = rng.uniform(lower[:, None], upper[:, None], (4, 300, 2, 8, 8)).astype(np.float32)
    outputs = Session(model).run({"x": points.reshape(-1, 2, 8, 8)})["y"].reshape(4, 300, 3)
    assert np.all(low[:, None] <= outputs + 1e-5) and np.all(outputs <= high[:, None] + 1e-5)


def test_a_wide_convolution_before_max_pooling_takes_megabytes_not_gigabytes():
    proto = to_proto(api.bound_graph(api.load(wide_conv_network()), "crown", InputSet("box")))
    assert graph_bytes_per_sample(proto) < 64 << 20


def test_a_loose_tensor_too_wide_for_a_backward_pass_keeps_its_ibp_interval():
    """Conv 32x2x2 -> ReLU -> 1x1 Conv -> ReLU on 28x28: the second ReLU's 23,328 inputs are loose, and a
    backward pass from them would start from a 23,328^2 identity (2.2 GB per box): they keep IBP's interval
    (crown.MAX_PASS_BYTES), the graph stays small and its bounds hold."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(32, 1, 2, 2)).astype(np.float32) / 2, "c1"),
             numpy_helper.from_array(rng.normal(size=(32, 32, 1, 1)).astype(np.float32) / 6, "c2"),
             numpy_helper.from_array(rng.normal(size=(32 * 27 * 27, 2)).astype(np.float32) / 150, "fc")]
    nodes = [helper.make_node("Conv", ["x", "c1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "c2"], ["c"]), helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Flatten", ["d"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "wide2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = rng.uniform(0, 1, (2, 1, 28, 28)).astype(np.float32)
    lower, upper = x - np.float32(0.01), x + np.float32(0.01)
    low, high, proto = bounds(model, lower, upper)
    assert graph_bytes_per_sample(proto) < 1 << 30
    points = rng.uniform(lower[:, None], upper[:, None], (2, 100, 1, 28, 28)).astype(np.float32)
    outputs = Session(model).run({"x": points.reshape(-1, 1, 28, 28)})["y"].reshape(2, 100, 2)
    assert np.all(low[:, None] <= outputs + 1e-5) and np.all(outputs <= high[:, None] + 1e-5)
