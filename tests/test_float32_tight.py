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
def test_crown_magnitudes_contain_every_float32_value_and_shrink_the_slack(tmp_path, scale):
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

    slack = Float32Slack(network, matrix)
    plain = slack(lower, upper)
    tighter = slack.of_boxes(lower, upper, np.zeros(2, np.float32))
    assert (tighter <= plain).all() and np.median(tighter) < 0.5 * np.median(plain)


@pytest.mark.skipif(not os.path.isdir(ACASXU), reason="needs the shared VNN-COMP 2021 ACAS Xu family")
def test_acasxu_property_1_holds_in_float32():
    """Box-only IBP magnitudes (|y| <= ~5000 where the outputs are O(1)) left this unproved in float32."""
    result = verify(os.path.join(ACASXU, "ACASXU_run2a_1_1_batch_2000.onnx"), os.path.join(ACASXU, "prop_1.vnnlib"),
                    timeout=60)
    assert result.status == "holds"
