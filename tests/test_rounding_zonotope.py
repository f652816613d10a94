"""The model's float32 error kept as a zonotope of rounding symbols (graphcert.rounding_zonotope): it bounds
|c·(float32 output - exact output)| at sampled and vertex points of every box, for ReLU, LeakyReLU, Sigmoid and
Tanh nets with input normalisation, at large weights and where a first layer cancels large inputs; and it is
far below the elementwise bound on deep nets (the reason it exists)."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphcert import api
from graphcert.rounding_slack import RoundingSlack
from graphcert.rounding_zonotope import Unsupported, ZonotopeErrors
from graphcert.runtime import Session

INPUTS = 6


def dense_net(activation: str, depth: int = 4, width: int = 24, scale: float = 1.0, seed: int = 0,
              cancelling: bool = False) -> tuple[onnx.ModelProto, callable]:
    """(model, exact): x -> (x - mean) / std -> [Gemm (transB) or MatMul + Add, activation] x depth -> Gemm head
    (3 outputs); `exact(points)` evaluates the same weights in float64. `cancelling`: the first layer takes
    differences of inputs (weights ±1.1), whose products' rounding survives into small values."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=INPUTS).astype(np.float32)
    std = rng.uniform(0.5, 2.0, INPUTS).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(mean, "mean"), onnx.numpy_helper.from_array(std, "std")]
    nodes = [helper.make_node("Sub", ["x", "mean"], ["centred"]), helper.make_node("Div", ["centred", "std"], ["h0"])]
    layers, size, current = [], INPUTS, "h0"
    for k in range(depth):
        w = (rng.normal(size=(size, width)) * scale / np.sqrt(size)).astype(np.float32)
        if cancelling and k == 0:
            w = np.zeros((size, width), np.float32)
            for j in range(width):
                a, b = rng.choice(size, size=2, replace=False)
                w[a, j], w[b, j] = 1.1, -1.1
        b = (rng.normal(size=width) * scale * 0.3).astype(np.float32)
        layers.append((w, b))
        if k % 2 == 0:
            inits += [onnx.numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{k}"),
                      onnx.numpy_helper.from_array(b, f"b{k}")]
            nodes.append(helper.make_node("Gemm", [current, f"w{k}", f"b{k}"], [f"z{k}"], transB=1))
        else:
            inits += [onnx.numpy_helper.from_array(w, f"w{k}"), onnx.numpy_helper.from_array(b, f"b{k}")]
            nodes += [helper.make_node("MatMul", [current, f"w{k}"], [f"m{k}"]),
                      helper.make_node("Add", [f"m{k}", f"b{k}"], [f"z{k}"])]
        extra = {"alpha": 0.1} if activation == "LeakyRelu" else {}
        nodes.append(helper.make_node(activation, [f"z{k}"], [f"h{k + 1}"], **extra))
        current, size = f"h{k + 1}", width
    head = rng.normal(size=(size, 3)).astype(np.float32)
    inits.append(onnx.numpy_helper.from_array(head, "head"))
    nodes.append(helper.make_node("Gemm", [current, "head"], ["y"]))
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", INPUTS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    curves = {"Relu": lambda z: np.maximum(z, 0), "LeakyRelu": lambda z: np.where(z > 0, z, 0.1 * z),
              "Sigmoid": lambda z: 1 / (1 + np.exp(-z)), "Tanh": np.tanh}

    def exact(points):
        h = (points.astype(np.float64) - mean.astype(np.float64)) / std.astype(np.float64)
        for w, b in layers:
            h = curves[activation](h @ w.astype(np.float64) + b.astype(np.float64))
        return h @ head.astype(np.float64)
    return model, exact


CASES = [(activation, scale, cancelling) for activation in ("Relu", "LeakyRelu", "Sigmoid", "Tanh")
         for scale, cancelling in ((1.0, False), (30.0, False), (1.0, True))]


@pytest.mark.parametrize("activation,scale,cancelling", CASES)
def test_zonotope_bounds_the_float32_error_of_every_row(activation, scale, cancelling):
    model, exact = dense_net(activation, scale=scale, cancelling=cancelling)
    rng = np.random.default_rng(1)
    base = 1000.0 if cancelling else 0.0
    centres = (base + rng.uniform(-1, 1, (6, INPUTS))).astype(np.float32)
    radius = np.float32(0.5 if cancelling else 0.2)   # cancelling: many units cross 0 over the box
    lower, upper = centres - radius, centres + radius
    rows = np.concatenate([np.eye(3), rng.normal(size=(3, 3))])
    bound = ZonotopeErrors(api.load(model)).rows_error(lower, upper, rows)
    session = Session(model)
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=INPUTS)))
    for k in range(len(centres)):
        points = np.concatenate([centres[k] + radius * signs, rng.uniform(lower[k], upper[k], (400, INPUTS))])
        points = np.clip(points.astype(np.float32), lower[k], upper[k])
        error = session.run({"x": points})["y"].astype(np.float64) - exact(points)
        worst = np.abs(error @ rows.T).max(axis=0)
        assert np.all(worst <= bound[k]), (worst, bound[k])


@pytest.mark.parametrize("activation,radius", [("Relu", 1e-4), ("Sigmoid", 1e-2)])
def test_zonotope_is_far_below_the_elementwise_bound_on_deep_nets(activation, radius):
    """Eight layers of 48 at weights x3: the signs that |W|·E drops are kept (measured median ratios: ReLU 10x
    on boxes small enough for its units to be stable, Sigmoid 43x at 0.01). Where IBP leaves most ReLUs
    unstable the zonotope turns half of each one's error into a fresh symbol and can be worse (0.3x at 0.01):
    the slack takes the smaller of the two."""
    model, _ = dense_net(activation, depth=8, width=48, scale=3.0)
    loaded = api.load(model)
    rng = np.random.default_rng(2)
    centres = rng.uniform(-1, 1, (4, INPUTS)).astype(np.float32)
    lower, upper = centres - np.float32(radius), centres + np.float32(radius)
    _, elementwise, _ = RoundingSlack(loaded).outputs(lower, upper)
    kept = ZonotopeErrors(loaded).rows_error(lower, upper, np.eye(3))
    assert np.median(elementwise / kept) > 4, np.median(elementwise / kept)


def test_ops_outside_its_rules_leave_the_elementwise_analysis_alone():
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 3, 3])],
                              [onnx.numpy_helper.from_array(np.ones((1, 1, 2, 2), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(Unsupported, match="Conv"):
        ZonotopeErrors(api.load(model))
    lower = np.zeros((2, 1, 4, 4), np.float32)
    plain = RoundingSlack(api.load(model)).of_rows(lower, lower + 1, np.eye(9))
    assert np.array_equal(plain, RoundingSlack(api.load(model)).of_rows(lower, lower + 1, np.eye(9), zonotope=True))


@pytest.mark.parametrize("activation", ["Relu", "LeakyRelu", "Sigmoid", "Tanh"])
def test_an_activation_form_covers_every_secant_slope(activation):
    """Inputs with an error form of their own (two symbols, radius 1e-3): for every input x of the interval,
    every computed x~ within the error and their secant slope, f(x~) - f(x) lies within the output form's
    bound (the slope's spread is a symbol of its own: dropping it halves the bound on a ReLU that crosses 0)."""
    import onnx_ir as ir
    from graphcert.arithmetic import FLOAT32
    from graphcert.rounding_zonotope import CURVES, RULES, Forms
    x, y = ir.Value(name="x"), ir.Value(name="y")
    node = ir.node(activation, [x], attributes={"alpha": 0.1} if activation == "LeakyRelu" else {})
    node.outputs[0].name = "y"
    y = node.outputs[0]
    forms = Forms(FLOAT32)
    low, high = np.array([-0.5, 0.2, -2.0, -0.001]), np.array([0.5, 0.9, -1.0, 0.002])
    forms.forms[x] = forms.fresh(np.zeros((4, 0)), np.full(4, 1e-3))
    forms.intervals[x] = (low, high)
    RULES[activation](forms, node)
    bound = forms.bound(forms.form(y))
    curve = {"Relu": lambda z: np.maximum(z, 0), "LeakyRelu": lambda z: np.where(z > 0, z, 0.1 * z),
             **{k: v[0] for k, v in CURVES.items()}}[activation]
    rng = np.random.default_rng(0)
    exact = rng.uniform(low, high, (2000, 4))
    computed = exact + rng.uniform(-1e-3, 1e-3, exact.shape)
    assert np.all(np.abs(curve(computed) - curve(exact)) <= bound), (np.abs(curve(computed) - curve(exact)).max(0), bound)
