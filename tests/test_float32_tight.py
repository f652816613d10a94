"""The float32 slack of boxes and split domains from CROWN's bounds of every unit's input
(graphcert.rounding_given): much smaller than IBP's, and still containing every float32 value."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch

from graphcert.rounding_slack import RoundingSlack
from graphcert.runtime import Session
from graphcert.torch_exec import TorchGraph
from graphcert.verify import verify
from graphcert.verify.bounds import SplitBounds
from graphcert.verify.network import Network
from graphcert.verify.search import Float32Slack

from test_float32_soundness import relu_net

ACASXU = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks", "vnncomp2021", "acasxu")


def unit_values(model: onnx.ModelProto, points: np.ndarray, dtype) -> dict[str, np.ndarray]:
    """Every Gemm output (the units' inputs z, and y) at the points, in float64 (torch) or float32 (onnxruntime)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [node.output[0] for node in probe.graph.node if node.op_type == "Gemm"]
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", f"d_{n}"]) for n in names])
    if dtype == np.float64:
        from graphcert import api
        out = TorchGraph(api.load(probe), dtype=torch.float64)({"x": points.astype(np.float64)})
        return {n: out[n].detach().numpy() for n in names}
    out = Session(probe).run({"x": points.astype(np.float32)}, names)
    return {n: out[n] for n in names}


def attacked_points(model: onnx.ModelProto, lower, upper, rng) -> np.ndarray:
    """Random points, vertices and points pushed towards each output's largest |y| by signed gradient steps."""
    from graphcert import api
    graph = TorchGraph(api.load(model), dtype=torch.float64)
    found = [lower + rng.random(lower.shape) * (upper - lower) for _ in range(8)]
    found += [np.where(rng.random(lower.shape) < 0.5, lower, upper) for _ in range(8)]
    for output in range(3):
        for sign in (-1.0, 1.0):
            x = torch.tensor(lower + rng.random(lower.shape) * (upper - lower), requires_grad=True)
            for _ in range(20):
                y = next(iter(graph({"x": x}).values()))
                (sign * y[:, output]).sum().backward()
                with torch.no_grad():
                    x += 0.1 * torch.from_numpy(upper - lower) * x.grad.sign()
                    x.copy_(torch.minimum(torch.maximum(x, torch.from_numpy(lower)), torch.from_numpy(upper)))
                x.grad = None
            found.append(x.detach().numpy())
    return np.stack(found).astype(np.float32)   # [points, boxes, n]


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_crown_magnitudes_contain_every_float32_value_and_shrink_the_slack(tmp_path, monkeypatch, scale):
    proto = relu_net(width=24, depth=5, scale=scale, seed=3)
    path = tmp_path / "net.onnx"
    onnx.save(proto, path)
    network = Network(path)
    matrix = np.array([[1, -1, 0], [1, 0, -1]], np.float32)
    splits = SplitBounds(network, matrix, np.zeros(2, np.float32), "clamp")
    rng = np.random.default_rng(5)
    centre = (rng.normal(size=(12, 8)) * 10).astype(np.float32)
    lower, upper = centre - np.float32(0.05), centre + np.float32(0.05)
    unbounded = np.full((len(lower), splits.units), np.inf, np.float32)
    _, unit_lower, unit_upper = splits(lower, upper, -unbounded, unbounded)
    given = {}
    for k, (name, shape) in enumerate(zip(splits.names, splits.shapes)):
        part = slice(splits.offsets[k], splits.offsets[k + 1])
        given[name] = (unit_lower[:, part].reshape(-1, *shape), unit_upper[:, part].reshape(-1, *shape))
    tight = RoundingSlack(network.model, given=splits.names)
    loose, used = tight._loose_run(lower, upper, given)
    magnitude, error, _ = tight.outputs(lower, upper, used)
    plain_magnitude, _, _ = RoundingSlack(network.model).outputs(lower, upper)

    points = attacked_points(proto, lower.astype(np.float64), upper.astype(np.float64), rng)
    for batch in points:
        exact, rounded = unit_values(proto, batch, np.float64), unit_values(proto, batch, np.float32)
        y_exact, y_rounded = exact["y"], rounded["y"].astype(np.float64)
        assert (np.abs(y_exact) <= magnitude).all()
        assert (np.abs(y_rounded - y_exact) <= error).all()
        assert (np.abs(y_rounded - y_exact) <= loose).all()
        for name, (low, high) in used.items():
            # The intervals the analysis used hold every real z, up to the float32 rounding of IBP's own ends
            # (a few ulps, far below the SAFETY factor every rule's result gets).
            outside = np.maximum(low - exact[name], exact[name] - high) - 2.0 ** -20 * np.abs(exact[name])
            assert (outside <= 0).all(), (name, outside.max(), np.unravel_index(outside.argmax(), outside.shape))
    assert np.median(magnitude) < 0.5 * np.median(plain_magnitude)   # the reason for the change

    # The model's error beside the bounds (graphcert.rounding_leaves switched off): CROWN's magnitudes shrink it.
    import graphcert.verify.search as search_module
    with monkeypatch.context() as patched:
        patched.setattr(search_module, "ROUNDING_LEAVES", False)
        slack = Float32Slack(network, matrix)
    plain = slack(lower, upper)
    tighter = slack.of_boxes(lower, upper, np.zeros(2, np.float32))
    assert (tighter <= plain).all() and np.median(tighter) < 0.5 * np.median(plain)
    # Inside the bounds, the slack is the bound graph's own rounding only: below the model's error plus it.
    inside = Float32Slack(network, matrix)
    assert inside.inside and (inside(lower, upper) < plain).all()


@pytest.mark.skipif(not os.path.isdir(ACASXU), reason="needs the shared VNN-COMP 2021 ACAS Xu family")
def test_acasxu_property_1_holds_in_float32():
    """Box-only IBP magnitudes (|y| <= ~5000 where the outputs are O(1)) left this unproved in float32."""
    result = verify(os.path.join(ACASXU, "ACASXU_run2a_1_1_batch_2000.onnx"), os.path.join(ACASXU, "prop_1.vnnlib"),
                    timeout=60)
    assert result.status == "holds"


def s_shaped_net(scale: float, seed: int = 0, centre=None) -> onnx.ModelProto:
    """8 -> 32 -> 32 -> 3 with Sigmoid then Tanh, weights times `scale` (large scales saturate the units); with
    `centre`, the first bias cancels W·centre (units near 0 there, their inputs' rounding error large)."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(seed)
    nodes, inits, current, size = [], [], "x", 8
    for layer, op in enumerate(("Sigmoid", "Tanh")):
        w = (rng.normal(size=(size, 32)) * scale / np.sqrt(size)).astype(np.float32)
        bias = rng.normal(size=32) * scale if centre is None or layer else -(centre.astype(np.float64) @ w)
        inits += [onnx.numpy_helper.from_array(w, f"w{layer}"),
                  onnx.numpy_helper.from_array(bias.astype(np.float32), f"b{layer}")]
        nodes += [helper.make_node("Gemm", [current, f"w{layer}", f"b{layer}"], [f"g{layer}"]),
                  helper.make_node(op, [f"g{layer}"], [f"a{layer}"])]
        current, size = f"a{layer}", 32
    inits.append(onnx.numpy_helper.from_array((rng.normal(size=(32, 3)) * scale).astype(np.float32), "head"))
    nodes.append(helper.make_node("Gemm", [current, "head"], ["y"]))
    graph = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("scale,far", [(1.0, False), (30.0, False), (1.0, True)])
def test_local_sigmoid_tanh_slopes_bound_the_float32_error(scale, far):
    """Sigmoid/Tanh errors are carried with their largest slope near the box's interval, not the global one:
    E still bounds |float32 - float64| at sampled, vertex and attacked points, and is smaller on saturated units."""
    from graphcert import api
    rng = np.random.default_rng(6)
    if far:   # inputs ~1000 whose first layer cancels to ~0: the units' input errors (~1e-4) dominate
        point = (rng.normal(size=8) * 1000).astype(np.float32)
        proto = s_shaped_net(scale, centre=point)
        centre = (point + rng.normal(size=(12, 8)) * 1e-3).astype(np.float32)
        lower, upper = centre - np.float32(1e-4), centre + np.float32(1e-4)
    else:
        proto = s_shaped_net(scale)
        centre = (rng.normal(size=(12, 8)) * 3).astype(np.float32)
        lower, upper = centre - np.float32(0.02), centre + np.float32(0.02)
    model = api.load(proto)
    magnitude, error, _ = RoundingSlack(model).outputs(lower, upper)
    loose = RoundingSlack(model).loose_errors(lower, upper)
    for batch in attacked_points(proto, lower.astype(np.float64), upper.astype(np.float64), rng):
        exact, rounded = unit_values(proto, batch, np.float64)["y"], unit_values(proto, batch, np.float32)["y"]
        # M is IBP's float32 interval: exact up to its own rounding (an ulp; every rule's SAFETY covers it).
        assert (np.abs(exact) <= magnitude * (1 + 2.0 ** -20)).all()
        assert (np.abs(rounded.astype(np.float64) - exact) <= error).all()
        assert (np.abs(rounded.astype(np.float64) - exact) <= loose).all()
    if scale > 1:   # saturated units pass (almost) no error on
        import graphcert.rounding as rounding
        original = rounding._local_slope
        rounding._local_slope = lambda walk, x, op: walk.c(0.25 if op == "Sigmoid" else 1.0)
        try:
            global_slopes = RoundingSlack(model).loose_errors(lower, upper)
        finally:
            rounding._local_slope = original
        assert np.median(loose) < 0.5 * np.median(global_slopes)
