"""CROWN's lean graph for ReLU-like layers (passes.crown_backward: products instead of a broadcasting Where for the
slope choice, the dead-unit Gather only where the product is wide) gives the same bounds, bit for bit, as the
graph it replaced (Where, Gather everywhere), on random boxes of narrow and wide nets, and they hold."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphcert import api
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.passes import crown_backward
from graphcert.runtime import Session


def mlp(widths: list[int], activation: str, seed: int) -> onnx.ModelProto:
    """x [batch, widths[0]] -> (Gemm, activation) per hidden width -> Gemm to widths[-1]."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [numpy_helper.from_array((rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(rng.normal(size=n_out).astype(np.float32) * 0.1, f"b{k}")]
        out = "y" if k == len(widths) - 2 else f"z{k}"
        nodes.append(helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [out], transB=1))
        if out != "y":
            x = f"a{k}"
            attrs = {"alpha": 0.1} if activation == "LeakyRelu" else {}
            nodes.append(helper.make_node(activation, [out], [x], **attrs))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def crown_bounds(model, lower, upper):
    proto = to_proto(api.bound_graph(api.load(model), "crown", InputSet("box")))
    out = Session(proto).run({"x_lower": lower, "x_upper": upper})
    return out["y_lower"], out["y_upper"], proto


def previous_graph(monkeypatch) -> None:
    """The graph before the lean one: coef·Where(coef < 0, upper, lower), live units gathered at every width."""
    def where_back(b, positive, negative, lower_slope, upper_slope):
        coef = b.op("Add", positive, negative)   # exact: one of the two is zero
        return b.op("Mul", coef, b.op("Where", b.op("Less", coef, b.const(0.0)), upper_slope, lower_slope))
    monkeypatch.setattr(crown_backward, "relu_like_back", where_back)
    monkeypatch.setattr(crown_backward, "GATHER_FROM_COLUMNS", 0)


@pytest.mark.parametrize("widths, activation", [([5, 50, 50, 50, 5], "Relu"), ([20, 200, 160, 10], "Relu"),
                                                ([6, 40, 40, 3], "LeakyRelu")])
def test_lean_graph_bounds_equal_the_previous_graph_and_hold(widths, activation, monkeypatch):
    model = mlp(widths, activation, seed=len(widths))
    rng = np.random.default_rng(0)
    # Boxes of every size, from points to wide (many dead units, then none), at magnitudes up to 1e4.
    scale = np.float32(10.0) ** rng.integers(-1, 5, size=(64, 1)).astype(np.float32)
    center = (rng.normal(size=(64, widths[0])) * scale).astype(np.float32)
    radius = (rng.uniform(0, 1, (64, widths[0])) * 10.0 ** rng.uniform(-6, 0, (64, 1)) * scale).astype(np.float32)
    lower, upper = center - radius, center + radius
    low, high, lean = crown_bounds(model, lower, upper)
    with monkeypatch.context() as patch:
        previous_graph(patch)
        old_low, old_high, old = crown_bounds(model, lower, upper)
    ops = [{node.op_type for node in proto.graph.node} for proto in (lean, old)]
    relu = activation == "Relu"   # LeakyReLU units are never dead: nothing to gather
    assert "Where" in ops[1] and ("Gather" in ops[1]) == relu
    assert ("Gather" in ops[0]) == (relu and max(widths[:-1]) >= crown_backward.GATHER_FROM_COLUMNS)
    assert np.isfinite(low).all() and np.isfinite(high).all()
    np.testing.assert_array_equal(low, old_low)
    np.testing.assert_array_equal(high, old_high)
    points = rng.uniform(lower[:, None], upper[:, None], (64, 200, widths[0])).astype(np.float32)
    outputs = Session(model).run({"x": points.reshape(-1, widths[0])})["y"].reshape(64, 200, -1)
    slack = 1e-4 * (1 + np.abs(outputs))
    assert np.all(low[:, None] <= outputs + slack) and np.all(outputs <= high[:, None] + slack)


def test_input_coefficients_are_the_linear_lower_bound_the_margins_were_concretised_from():
    """`margins_coefficients.x` is A in margin(x) >= A·x + d over the box (d = the bound minus A's minimum over
    the box), and at a point box, where every ReLU is stable, the Jacobian of the margins."""
    from graphcert.passes.crown import INPUT_COEFFICIENTS_PREFIX, CrownPass
    from graphcert.passes.spec import SpecPass
    model = mlp([5, 30, 30, 4], "Relu", seed=3)
    matrix = np.array([[1, -1, 0, 0], [0, 1, 0, -1], [-1, 0, 1, 0]], dtype=np.float32)
    offset = np.array([0.5, 0.0, -0.25])
    spec = SpecPass(matrix, offset, keep_output=False)(api.load(model)).model
    proto = to_proto(CrownPass(InputSet("box"), input_coefficients=True)(spec).model)
    plain = to_proto(CrownPass(InputSet("box"))(spec).model)
    rng = np.random.default_rng(4)
    center = rng.normal(size=(32, 5)).astype(np.float32)
    radius = (rng.uniform(0, 1, (32, 5)) * 10.0 ** rng.uniform(-3, 0, (32, 1))).astype(np.float32)
    feeds = {"x_lower": center - radius, "x_upper": center + radius}
    out = Session(proto).run(feeds)
    coefficients = out[INPUT_COEFFICIENTS_PREFIX + "x"].transpose(1, 0, 2)   # [boxes, rows, 5]
    np.testing.assert_array_equal(out["margins_lower"], Session(plain).run(feeds)["margins_lower"])
    low = out["margins_lower"].astype(np.float64)
    a = coefficients.astype(np.float64)
    box_min = np.einsum("brn,bn->br", a, center) - np.einsum("brn,bn->br", np.abs(a), radius)
    points = rng.uniform(feeds["x_lower"][:, None], feeds["x_upper"][:, None], (32, 300, 5)).astype(np.float32)
    margins = Session(model).run({"x": points.reshape(-1, 5)})["y"].reshape(32, 300, 4) @ matrix.T + offset
    linear = np.einsum("brn,bpn->bpr", a, points) + (low - box_min)[:, None]
    assert np.all(margins >= linear - 1e-4 * (1 + np.abs(margins)))
    point = Session(proto).run({"x_lower": center, "x_upper": center})[INPUT_COEFFICIENTS_PREFIX + "x"]
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    for b in range(4):   # the Jacobian: W3·D2·W2·D1·W1 with D the active units at the point
        z1 = weights[0] @ center[b] + weights[1]
        z2 = weights[2] @ np.maximum(z1, 0) + weights[3]
        jacobian = matrix @ weights[4] @ np.diag(z2 > 0) @ weights[2] @ np.diag(z1 > 0) @ weights[0]
        np.testing.assert_allclose(point[:, b], jacobian, rtol=1e-4, atol=1e-5)
