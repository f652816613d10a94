"""Weights that are not constants: Conv, ConvTranspose, Gemm, MatMul, BatchNormalization, LayerNormalization,
GroupNormalization, InstanceNormalization and Clip with their weights or parameters fed as graph inputs, either
as given (a point at any value) or perturbed (an interval), or computed from such an input. Bounds must hold on
sampled, corner and gradient-attacked points, at ordinary and at large magnitudes, with IBP and CROWN."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphcert import api
from graphcert.runtime import Session

F = TensorProto.FLOAT


def _model(nodes, inputs, out_shape, opset=21):
    graph = helper.make_graph(nodes, "dynamic", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", F, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _models():
    """name -> (model, {input: sample shape})."""
    node = helper.make_node
    return {
        "conv": (_model([node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
                        [("x", ["N", 2, 5, 5]), ("w", [3, 2, 3, 3]), ("b", [3])], ["N", 3, 5, 5]),
                 {"x": (1, 2, 5, 5), "w": (3, 2, 3, 3), "b": (3,)}),
        "conv-computed-weight": (_model([node("Mul", ["v", "v"], ["w"]), node("Conv", ["x", "w"], ["y"])],
                                        [("x", ["N", 2, 4, 4]), ("v", [2, 2, 2, 2])], ["N", 2, 3, 3]),
                                 {"x": (1, 2, 4, 4), "v": (2, 2, 2, 2)}),
        "convtranspose": (_model([node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2])],
                                 [("x", ["N", 2, 4, 4]), ("w", [2, 3, 3, 3]), ("b", [3])], ["N", 3, 9, 9]),
                          {"x": (1, 2, 4, 4), "w": (2, 3, 3, 3), "b": (3,)}),
        "gemm": (_model([node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=0.7, beta=-1.3)],
                        [("x", ["N", 4]), ("w", [3, 4]), ("b", [3])], ["N", 3]),
                 {"x": (1, 4), "w": (3, 4), "b": (3,)}),
        "matmul": (_model([node("MatMul", ["x", "w"], ["y"])], [("x", ["N", 4]), ("w", [4, 3])], ["N", 3]),
                   {"x": (1, 4), "w": (4, 3)}),
        "batchnorm": (_model([node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
                             [("x", ["N", 3, 4, 4]), ("s", [3]), ("b", [3]), ("m", [3]), ("v", [3])],
                             ["N", 3, 4, 4]),
                      {"x": (1, 3, 4, 4), "s": (3,), "b": (3,), "m": (3,), "v": (3,)}),
        "layernorm": (_model([node("LayerNormalization", ["x", "s", "b"], ["y"])],
                             [("x", ["N", 3, 6]), ("s", [6]), ("b", [6])], ["N", 3, 6]),
                      {"x": (1, 3, 6), "s": (6,), "b": (6,)}),
        "groupnorm": (_model([node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)],
                             [("x", ["N", 4, 3, 3]), ("s", [4]), ("b", [4])], ["N", 4, 3, 3]),
                      {"x": (1, 4, 3, 3), "s": (4,), "b": (4,)}),
        "instancenorm": (_model([node("InstanceNormalization", ["x", "s", "b"], ["y"])],
                                [("x", ["N", 3, 4, 4]), ("s", [3]), ("b", [3])], ["N", 3, 4, 4]),
                         {"x": (1, 3, 4, 4), "s": (3,), "b": (3,)}),
        "clip": (_model([node("Clip", ["x", "lo", "hi"], ["y"])], [("x", ["N", 5]), ("lo", []), ("hi", [])],
                        ["N", 5]),
                 {"x": (1, 5), "lo": (), "hi": ()}),
    }


MODELS = _models()


def _feeds(name, shapes, scale, rng):
    feeds = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    if name == "batchnorm":
        feeds["v"] = (np.abs(feeds["v"]) + 0.5 * scale).astype(np.float32)  # a variance
    if name == "clip":
        feeds["lo"], feeds["hi"] = np.float32(-0.5 * scale), np.float32(0.7 * scale)
    return feeds


def _attacked(proto, feeds, perturbed, eps, lower, upper, rng, steps=8, targets=6):
    """Sign-gradient ascent and descent on a few outputs over every perturbed input (torch executor)."""
    import torch

    from graphcert.torch_exec import TorchGraph
    graph = TorchGraph(api.load(proto), trainable=False)
    points = []
    flat = lower.size
    for coordinate in rng.choice(flat, min(targets, flat), replace=False):
        for direction in (-1.0, 1.0):
            point = {k: torch.tensor(v) for k, v in feeds.items()}
            for _ in range(steps):
                for k in perturbed:
                    point[k] = point[k].detach().requires_grad_(True)
                out = graph(point)["y"].reshape(-1)[coordinate] * direction
                grads = torch.autograd.grad(out, [point[k] for k in perturbed])
                for k, g in zip(perturbed, grads):
                    moved = point[k].detach() + 0.25 * eps * torch.sign(g)
                    centre = torch.tensor(feeds[k])
                    point[k] = torch.clamp(moved, centre - eps, centre + eps)
            points.append({k: v.detach().numpy() for k, v in point.items()})
    return points


def _check(proto, bound, feeds, perturbed, eps, rng):
    got = Session(bound).run({**feeds, **{n: np.float32(eps) for n in _radius_names(bound, perturbed)}})
    lower, upper = got["y_lower"], got["y_upper"]
    session = Session(proto)
    points = []
    for k in range(60):
        point = dict(feeds)
        for p in perturbed:
            shape = np.shape(feeds[p])
            offset = rng.uniform(-eps, eps, shape) if k % 2 else rng.choice([-eps, eps], shape)
            point[p] = (feeds[p] + offset).astype(np.float32)
        points.append(point)
    points += _attacked(proto, feeds, perturbed, eps, lower, upper, rng)
    for point in points:
        y = session.run(point)["y"]
        tolerance = 1e-5 + 1e-5 * np.abs(y)
        assert np.all(lower - tolerance <= y) and np.all(y <= upper + tolerance), \
            (float(np.max(lower - y)), float(np.max(y - upper)))


def _radius_names(bound, perturbed):
    names = {i.name for i in bound.graph.input}
    return ["epsilon"] if "epsilon" in names else [f"{p}_epsilon" for p in perturbed]


def _cases():
    for name, (_, shapes) in MODELS.items():
        first, *weights = list(shapes)
        for perturbed in ([first], [first] + weights, weights[:1]):
            for method in ("ibp", "crown"):
                yield pytest.param(name, perturbed, method, id=f"{name}-{'+'.join(perturbed)}-{method}")


@pytest.mark.parametrize("name,perturbed,method", _cases())
def test_dynamic_weights_bounds_are_sound(name, perturbed, method, tmp_path):
    proto, shapes = MODELS[name]
    source = tmp_path / "m.onnx"
    onnx.save(proto, source)
    bound = api.convert(source, tmp_path / "b.onnx", method=method, perturb=perturbed)
    rng = np.random.default_rng(0)
    for scale, eps in ((1.0, 0.1), (100.0, 5.0)):  # ordinary and large magnitudes
        _check(proto, bound, _feeds(name, shapes, scale, rng), perturbed, eps, rng)
