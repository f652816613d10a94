"""Bound graphs run in float64 (graphcert.precision): the same computation done wider, outputs rounded outward."""
from __future__ import annotations

import numpy as np
import pytest

from graphcert import api
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.precision import DoubleSession, onnxruntime_runs_double, outward
from graphcert.runtime import Session

from test_float32_soundness import relu_net


def test_outputs_round_outward_by_their_names():
    wide = np.array([1.0 + 2.0 ** -30, -(1.0 + 2.0 ** -30), 0.1])
    assert np.all(outward("margins_lower", wide) <= wide) and np.all(outward("y_upper", wide) >= wide)
    assert np.all(outward("clamped_lower.z", wide) <= wide) and np.all(outward("clamped_upper.z", wide) >= wide)
    assert outward("y_lower", wide).dtype == np.float32
    assert np.array_equal(outward("margins", wide), wide.astype(np.float32))


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_a_double_bound_graph_computes_the_same_bounds_and_they_hold(method, scale):
    """A box bound graph of a ReLU net in float64: onnxruntime runs it, its bounds are within float32 rounding
    of the float32 graph's, and every sampled output lies inside them."""
    model = relu_net(scale=scale)
    proto = to_proto(api.bound_graph(api.load(model), method, InputSet("box")))
    assert onnxruntime_runs_double(proto)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8)).astype(np.float32)
    feeds = {"x_lower": x - np.float32(0.05), "x_upper": x + np.float32(0.05)}
    single, double = Session(proto).run(feeds), DoubleSession(proto).run(feeds)
    for name in ("y_lower", "y_upper"):
        assert double[name].dtype == np.float32
        assert np.allclose(single[name], double[name], rtol=1e-4, atol=1e-4 * scale)
    outputs = Session(model).run({"x": np.clip(x[:, None] + rng.uniform(-0.05, 0.05, (8, 200, 8)),
                                               feeds["x_lower"][:, None], feeds["x_upper"][:, None])
                                  .reshape(-1, 8).astype(np.float32)})["y"].reshape(8, 200, 3)
    assert np.all(double["y_lower"][:, None] <= outputs) and np.all(outputs <= double["y_upper"][:, None])
