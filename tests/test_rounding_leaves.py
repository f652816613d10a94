"""The deployed model's float32 rounding as bounded leaves inside the relaxation (graphcert.rounding_leaves):
bound graphs of the rewritten model, computed in float64, contain what onnxruntime computes in float32 (where
the same graphs without the leaves do not), at large magnitudes, for dense, convolutional and sigmoid nets."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from graphcert import api
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.rounding_leaves import OP_TYPE, with_rounding_leaves
from graphcert.runtime import Session
from graphcert.torch_exec import TorchGraph

from test_float32_soundness import relu_net


def dense_net(activation: str = "Relu", scale: float = 1.0, width: int = 24, depth: int = 4, seed: int = 0,
              split_bias: bool = False) -> onnx.ModelProto:
    return relu_net(width, depth, scale, seed, activation, split_bias)


def conv_net(scale: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """Conv 1->4 (3x3) + ReLU + Conv 4->4 (3x3, stride 2) + ReLU + Flatten + Gemm to 3, on 1x8x8 inputs."""
    rng = np.random.default_rng(seed)
    inits = [onnx.numpy_helper.from_array((rng.normal(size=(4, 1, 3, 3)) * scale / 3).astype(np.float32), "k0"),
             onnx.numpy_helper.from_array((rng.normal(size=4) * scale).astype(np.float32), "c0"),
             onnx.numpy_helper.from_array((rng.normal(size=(4, 4, 3, 3)) * scale / 6).astype(np.float32), "k1"),
             onnx.numpy_helper.from_array((rng.normal(size=4) * scale).astype(np.float32), "c1"),
             onnx.numpy_helper.from_array(rng.normal(size=(36, 3)).astype(np.float32), "head")]
    nodes = [helper.make_node("Conv", ["x", "k0", "c0"], ["h0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h0"], ["a0"]),
             helper.make_node("Conv", ["a0", "k1", "c1"], ["h1"], strides=[2, 2]),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Flatten", ["a1"], ["f"]),
             helper.make_node("Gemm", ["f", "head"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def bounds_in_double(model, method: str, lower: np.ndarray, upper: np.ndarray):
    """(y_lower, y_upper) of the model's bound graph computed by torch in float64."""
    graph = api.bound_graph(model, method, InputSet("box"))
    out = TorchGraph(graph, dtype=torch.float64)({"x_lower": lower.astype(np.float64),
                                                  "x_upper": upper.astype(np.float64)})
    return out["y_lower"].detach().numpy(), out["y_upper"].detach().numpy()


def outside(y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> int:
    return int(((y < lower) | (y > upper)).sum())


CASES = {"relu": lambda: dense_net(), "relu x30": lambda: dense_net(scale=30.0),
         "matmul+add": lambda: dense_net(split_bias=True, scale=8.0), "sigmoid": lambda: dense_net("Sigmoid", 4.0),
         "tanh": lambda: dense_net("Tanh", 2.0), "conv": lambda: conv_net(), "conv x30": lambda: conv_net(30.0)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_at_points_contain_onnxruntime_float32_outputs(case, method):
    """Boxes of width 0 at inputs up to 1e3: the real-arithmetic bounds (in float64) are the exact value, which
    float32 misses (the test can fail); with the leaves they contain onnxruntime's float32 output."""
    proto = CASES[case]()
    model = api.load(proto)
    shape = [d.dim_value or 64 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = (np.random.default_rng(3).normal(size=shape) * 1e3).astype(np.float32)
    y = Session(proto).run({"x": x})["y"].astype(np.float64)
    real = bounds_in_double(model, method, x, x)
    assert outside(y, *real) > 0          # float32 rounding is visible against exact bounds
    found = bounds_in_double(with_rounding_leaves(model), method, x, x)
    assert outside(y, *found) == 0
    if method == "crown":   # and stays tight: within 1e-2 of the sample's largest output
        assert np.all(found[1] - found[0] <= 1e-2 * np.abs(y).max(axis=1, keepdims=True))


@pytest.mark.parametrize("case", list(CASES))
def test_crown_bounds_over_boxes_contain_sampled_and_vertex_float32_outputs(case):
    """Small boxes around inputs of size 1e2 (many ReLUs unstable at eps 1e-3 x magnitude): every sampled point's
    and box corner's float32 output (onnxruntime) lies within CROWN's bounds of the rewritten model."""
    proto = CASES[case]()
    model = with_rounding_leaves(api.load(proto))
    shape = [d.dim_value or 8 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(5)
    centre = (rng.normal(size=shape) * 1e2).astype(np.float32)
    lower, upper = centre - np.float32(0.1), centre + np.float32(0.1)
    y_lower, y_upper = bounds_in_double(model, "crown", lower, upper)
    session = Session(proto)
    for draw in range(20):
        t = rng.random(shape) if draw % 2 else rng.integers(0, 2, shape)
        points = (lower + t * (upper - lower)).astype(np.float32)
        y = session.run({"x": points})["y"].astype(np.float64)
        assert outside(y, y_lower, y_upper) == 0


def test_the_rewrite_keeps_names_and_the_model_computation():
    """Every output and ReLU input keeps its name (branch and bound splits by name); a bound graph that keeps the
    model's own outputs computes them as before (the leaves are 0 there), and runs in onnxruntime."""
    proto = dense_net(split_bias=True)
    model = api.load(proto)
    leaves = with_rounding_leaves(model)
    assert sum(n.op_type == OP_TYPE for n in leaves.graph) == 9   # 4 MatMul, 4 Add, the head
    relu_inputs = {n.inputs[0].name for n in leaves.graph if n.op_type == "Relu"}
    assert relu_inputs == {n.inputs[0].name for n in model.graph if n.op_type == "Relu"}
    assert [v.name for v in leaves.graph.outputs] == ["y"]
    graph = to_proto(api.bound_graph(leaves, "crown", InputSet("box"), keep_original=True))
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    out = Session(graph).run({"x": x, "x_lower": x - 0.01, "x_upper": x + 0.01})
    np.testing.assert_allclose(out["y"], Session(proto).run({"x": x})["y"], rtol=1e-6)


def test_alpha_answers_in_double_from_float32_steps():
    """alpha-CROWN in double (verify's float32 mode) steps in float32 and answers with its best parameters
    evaluated in float64: the bounds hold at sampled float32 outputs of the model with rounding leaves, are no
    looser than the float64 CROWN start, tighter than it somewhere, and the tracked unit bounds hold too."""
    from graphcert.alpha import AlphaCrown
    from graphcert.passes.crown import CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX, SPLIT_LOWER_PREFIX
    proto = dense_net(scale=4.0, width=32)
    model = with_rounding_leaves(api.load(proto))
    spec = np.float32([[1, -1, 0], [1, 0, -1]])
    bounder = AlphaCrown(model, "box", spec=spec, spec_offset=np.zeros(2, np.float32), split_bounds="clamp")
    bounder.in_double()
    rng = np.random.default_rng(9)
    centre = rng.normal(size=(4, 8)).astype(np.float32) * 10
    feeds = bounder.feeds(lower=centre - 0.3, upper=centre + 0.3)
    units = [v.name[len(SPLIT_LOWER_PREFIX):] for v in bounder._tuned.graph.inputs if v.name.startswith(SPLIT_LOWER_PREFIX)]
    for unit in units:
        feeds[SPLIT_LOWER_PREFIX + unit] = np.full((4, 32), -np.inf, np.float32)
        feeds["split_upper." + unit] = np.full((4, 32), np.inf, np.float32)
    start = bounder.crown_start(feeds)
    track = tuple((CLAMPED_LOWER_PREFIX + u, CLAMPED_UPPER_PREFIX + u) for u in units)
    lower, upper = bounder.bounds(feeds, iterations=15, track=track)
    assert lower.dtype == np.float64 and np.all(lower >= start[bounder.outputs[0]])
    assert np.any(lower > start[bounder.outputs[0]] + 1e-3)
    session = Session(proto)
    points = (centre[:, None] + rng.uniform(-0.3, 0.3, (4, 2000, 8))).astype(np.float32)
    y = session.run({"x": points.reshape(-1, 8)})["y"].reshape(4, 2000, 3).astype(np.float64)
    margins = np.einsum("mn,bsn->bsm", spec, y)
    assert np.all(margins >= lower[:, None, :])
    first = units[0]
    assert first == "g0"   # the first ReLU's input keeps its name in the model with rounding leaves
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.append(helper.make_tensor_value_info("g0", TensorProto.FLOAT, ["batch", 32]))
    pre = Session(exposed).run({"x": points.reshape(-1, 8)})["g0"].reshape(4, 2000, 32)
    assert np.all(pre >= bounder.tracked[CLAMPED_LOWER_PREFIX + first][:, None, :])
    assert np.all(pre <= bounder.tracked[CLAMPED_UPPER_PREFIX + first][:, None, :])


def test_a_sample_whose_rounding_bound_overflows_gets_infinite_bounds_and_only_that_sample():
    """CROWN flags unbounded rounding leaves per sample (crown_fallback.symmetric_leaf): a sample at 3e38, where
    |W|·|x| overflows float32, must get (-inf, +inf) rather than a finite or NaN bound; its neighbours in the
    batch keep finite bounds that contain onnxruntime's outputs."""
    proto = dense_net()
    graph = to_proto(api.bound_graph(with_rounding_leaves(api.load(proto)), "crown", InputSet("box")))
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    x[1] = np.sign(x[1]) * np.float32(3e38)
    x[2] *= 1e3
    found = Session(graph).run({"x_lower": x, "x_upper": x})
    assert np.all(found["y_lower"][1] == -np.inf) and np.all(found["y_upper"][1] == np.inf)
    y = Session(proto).run({"x": x})["y"]
    keep = [0, 2]
    assert np.isfinite(found["y_lower"][keep]).all() and np.isfinite(found["y_upper"][keep]).all()
    assert outside(y[keep], found["y_lower"][keep], found["y_upper"][keep]) == 0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_of_small_boxes_contain_onnxruntime_at_sampled_corner_and_attacked_points(case, method):
    """Boxes a float32 ulp wide along one input (at 0.5) and of width 0 along the others (up to 1e3),
    checked with no tolerance at random points, corners and points of sign-gradient ascent/descent on each
    output (tests/harness.py): the bounds with leaves (in float64) contain every float32 output onnxruntime
    computes; the exact ones miss some (the check can fail). Wider boxes hide the rounding in their width."""
    from harness import check_bounds_sound
    proto = CASES[case]()
    model = api.load(proto)
    shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x0 = (np.random.default_rng(5).normal(size=shape) * 1e3).astype(np.float32)
    x0.reshape(len(x0), -1)[:, 0] = 0.5   # the box's width (about 6e-8) well below the rounding of sums at 1e3
    eps = np.zeros_like(x0)
    eps.reshape(len(x0), -1)[:, 0] = np.spacing(np.float32(0.5))

    def bound_fn(of):
        return lambda x, radius: bounds_in_double(of, method, x - radius, x + radius)

    exact = check_bounds_sound(proto, bound_fn(model), x0, eps, rtol=0.0, atol=0.0, pgd_steps=10)
    assert not exact.sound   # float32 rounding is visible against the exact bounds
    check_bounds_sound(proto, bound_fn(with_rounding_leaves(model)), x0, eps, rtol=0.0, atol=0.0,
                       pgd_steps=10).assert_sound()
