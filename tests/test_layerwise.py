"""Optimised intermediate bounds (`graphcert.verify.layerwise`) and alpha-CROWN's steps on the linear bounds."""
from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_general_bab import ACTIVATIONS, activation_network, forward


def two_sigmoids() -> onnx.ModelProto:
    """y = -sigmoid(x) + 0.5·sigmoid(x) through two units: on x in [-5.8, 2.1] IBP's upper bound of y is
    tighter than CROWN's with its starting tangent points, and looser than CROWN's with better ones."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["z"], transB=1), helper.make_node("Sigmoid", ["z"], ["h"]),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], transB=1)]
    weights = [numpy_helper.from_array(np.array(v, np.float32), name) for name, v in
               (("w1", [[1.0], [1.0]]), ("b1", [0.0, 0.0]), ("w2", [[-1.0, 0.5]]), ("b2", [0.0]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_alpha_steps_follow_the_linear_bound_where_ibp_is_tighter():
    """Where IBP's bound wins at the start, the met bound does not depend on the slopes (gradient 0): the steps
    must follow the linear bound, which tangent points in range take below IBP's. The result stays sound."""
    from graphcert.alpha import AlphaCrown
    bounder = AlphaCrown(two_sigmoids(), "box", crown_upper=True)
    feeds = bounder.feeds(lower=np.array([[-5.8]], np.float32), upper=np.array([[2.1]], np.float32))
    plain_lower, plain_upper = bounder.bounds(feeds, iterations=0)
    ibp_upper = 0.5 / (1 + np.exp(-2.1)) - 1 / (1 + np.exp(5.8))
    assert plain_upper[0, 0] == pytest.approx(ibp_upper, abs=1e-5)     # IBP's is the tighter at the start
    lower, upper = bounder.bounds(feeds, iterations=40, lr=0.1)
    assert upper[0, 0] < ibp_upper - 0.1
    x = np.linspace(-5.8, 2.1, 20001)
    y = -0.5 / (1 + np.exp(-x))
    assert lower[0, 0] <= y.min() and upper[0, 0] >= y.max()


def unit_values(network, x: np.ndarray) -> list[np.ndarray]:
    """Every hidden layer's pre-activation z at the points x, in float64."""
    layers, kinds = network
    found, h = [], x.astype(np.float64)
    for k, (w, bias) in enumerate(layers[:-1]):
        z = h @ w + bias
        found.append(z)
        h = ACTIVATIONS[kinds[k]](z)
    return found


def attacked_points(network, lower: np.ndarray, upper: np.ndarray, rng) -> np.ndarray:
    """Points of the box: random ones, corners, and sign-gradient steps towards the extremes of random signed
    sums of each layer's units and of each output margin y_0 - y_j."""
    import torch
    layers, kinds = network
    activations = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}
    lo, hi = torch.as_tensor(lower, dtype=torch.float64), torch.as_tensor(upper, dtype=torch.float64)

    def values(x):
        h, found = x, []
        for k, (w, bias) in enumerate(layers):
            h = h @ torch.as_tensor(w, dtype=torch.float64) + torch.as_tensor(bias, dtype=torch.float64)
            found.append(h)
            if k < len(layers) - 1:
                h = activations[kinds[k]](h)
        return found

    n = lower.shape[1]
    points = [lower + (upper - lower) * rng.uniform(size=(512, n)),
              np.where(rng.uniform(size=(512, n)) < 0.5, lower, upper)]
    for layer in range(len(layers)):
        width = layers[layer][0].shape[1]
        for _ in range(6):
            signs = torch.as_tensor(rng.choice([-1.0, 1.0], size=width))
            x = (lo + (hi - lo) * torch.as_tensor(rng.uniform(size=(8, n)))).requires_grad_(True)
            for _ in range(25):
                grad, = torch.autograd.grad((values(x)[layer] * signs).sum(), x)
                with torch.no_grad():
                    x = torch.minimum(torch.maximum(x + 0.1 * (hi - lo) * torch.sign(grad), lo), hi)
                x.requires_grad_(True)
            points.append(x.detach().numpy())
    return np.concatenate(points)


@pytest.mark.parametrize("activation", ["Sigmoid", "Tanh", ["Tanh", "Relu", "Sigmoid", "Sigmoid"]], ids=str)
@pytest.mark.parametrize("scale", [3.0, 30.0])
@pytest.mark.parametrize("double", [False, True])
def test_layer_by_layer_bounds_are_sound_and_tighter(tmp_path, activation, scale, double):
    """Every unit's bounds hold at sampled, corner and gradient-attacked points of the box, at large weights
    (saturated units) too, as do the margins' lower bounds; they are never looser than CROWN's (up to the graphs'
    own rounding), and on the last hidden layer tighter, CROWN optimising nothing for them."""
    from graphcert.alpha import AlphaSettings
    from graphcert.verify.bounds import SplitBounds
    from graphcert.verify.layerwise import LayerwiseUnitBounds
    from graphcert.verify.network import Network
    proto, network = activation_network([6, 20, 20, 20, 20, 3], activation, seed=5, scale=scale, batch="N")
    onnx.save(proto, tmp_path / "m.onnx")
    net = Network(tmp_path / "m.onnx")
    matrix = np.array([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], np.float32)   # margins y_0 - y_1, y_0 - y_2
    offset = np.zeros(2)
    clamp = SplitBounds(net, matrix, offset, "clamp")
    rng = np.random.default_rng(3)
    lower = rng.uniform(-1, 0.5, size=(2, 6)).astype(np.float32)
    upper = (lower + rng.uniform(0.2, 0.8, size=(2, 6))).astype(np.float32)
    unbounded = np.full((2, clamp.units), np.inf, np.float32)
    _, crown_lower, crown_upper = clamp(lower, upper, -unbounded, unbounded)
    bounder = LayerwiseUnitBounds(net, matrix, offset, clamp, AlphaSettings(iterations=20), double=double)
    margins, unit_lower, unit_upper = bounder(lower, upper, None, -unbounded, unbounded, time.monotonic() + 60)
    ulps = 1e-5 * (1 + np.abs(crown_lower) + np.abs(crown_upper))   # the graphs round differently
    assert (unit_lower >= crown_lower - ulps).all() and (unit_upper <= crown_upper + ulps).all()
    last = slice(clamp.offsets[-2], clamp.offsets[-1])
    if scale == 3.0:
        assert (unit_upper - unit_lower)[:, last].sum() < 0.95 * (crown_upper - crown_lower)[:, last].sum()
    for box in range(2):
        points = attacked_points(network, lower[box:box + 1], upper[box:box + 1], rng)
        z = np.concatenate(unit_values(network, points), axis=1)
        slack = 1e-4 * (1 + np.abs(z))
        assert (z >= unit_lower[box] - slack).all() and (z <= unit_upper[box] + slack).all()
        y = forward(network, points)
        margin = y @ matrix.T.astype(np.float64)
        assert (margin >= margins[box] - 1e-4 * (1 + np.abs(margin))).all()


def test_the_first_root_bound_is_abandoned_once_its_shrinking_gains_cannot_reach_zero():
    """`s_shaped.Hopeless` on the weakest margin bounds eran's sigmoid net gave step by step: idx 1211 (-134 and
    gains of 19.5 then 6.6: at most 3.4 more if they keep shrinking so) is abandoned at the fourth step; idx 7167
    (-31, gains 19.4 then 9.6, reaching -1.98 + 9.6 > 0) goes on, and stops once positive."""
    from graphcert.verify.s_shaped import Hopeless

    def run(scores):
        rule = Hopeless(lambda low: low)
        return [rule(np.array([value])) for value in scores]

    assert run([-133.95, -133.95, -114.40, -107.76]) == [False, False, False, True]
    assert run([-31.02, -31.02, -11.62, -1.98, 0.5]) == [False, False, False, False, True]
    # Two boxes: the rule holds only once both are positive or out of reach.
    rule = Hopeless(lambda low: low)
    steps = [np.array([-100.0, -10.0]), np.array([-90.0, -6.0]), np.array([-89.0, -3.0])]
    assert [rule(s) for s in steps] == [False, False, False]
