"""ReLU split domains bounded in float64 in verify's float32 mode (relu_bab.DOMAINS_IN_DOUBLE), the model's
rounding inside the bounds (graphcert.rounding_leaves): deep nets prove in float32 what they prove in real
arithmetic, and nothing near a float32 counterexample is proved."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphcert.runtime import Session
from graphcert.verify import relu_bab, verify

from test_verify_robust import write_property

INPUTS = 80   # above BRANCH_DIMENSIONS: verify splits ReLUs, not input boxes


def deep_net(seed: int = 0, width: int = 32, depth: int = 6) -> onnx.ModelProto:
    """A random 80-32x6-2 ReLU net (He-scaled weights); `y0 - y1 - shift` as output 0 via a bias input."""
    rng = np.random.default_rng(seed)
    nodes, inits, current, size = [], [], "x", INPUTS
    for k in range(depth):
        w = (rng.normal(size=(size, width)) * np.sqrt(2.0 / size)).astype(np.float32)
        inits += [onnx.numpy_helper.from_array(w, f"w{k}"),
                  onnx.numpy_helper.from_array((rng.normal(size=width) * 0.1).astype(np.float32), f"b{k}")]
        nodes += [helper.make_node("Gemm", [current, f"w{k}", f"b{k}"], [f"g{k}"]),
                  helper.make_node("Relu", [f"g{k}"], [f"r{k}"])]
        current, size = f"r{k}", width
    inits.append(onnx.numpy_helper.from_array(rng.normal(size=(width, 2)).astype(np.float32), "head"))
    inits.append(onnx.numpy_helper.from_array(np.zeros(2, np.float32), "shift"))
    nodes.append(helper.make_node("Gemm", [current, "head", "shift"], ["y"]))
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", INPUTS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def with_threshold(model: onnx.ModelProto, threshold: float) -> onnx.ModelProto:
    """Output 0 minus `threshold`: the property y0 > y1 then says y0 - y1 > threshold."""
    shifted = onnx.ModelProto()
    shifted.CopyFrom(model)
    for init in shifted.graph.initializer:
        if init.name == "shift":
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([-threshold, 0], np.float32), "shift"))
    return shifted


def setup(tmp_path, threshold_of):
    """(model path, spec path, box) for the box of radius 0.01 around a seeded point and y0 > y1 - threshold."""
    model = deep_net()
    centre = np.random.default_rng(1).uniform(0, 1, INPUTS).astype(np.float32)
    low, high = centre - np.float32(0.01), centre + np.float32(0.01)
    session = Session(model)
    points = np.random.default_rng(2).uniform(low, high, (20000, INPUTS)).astype(np.float32)
    y = session.run({"x": points}, ["y"])["y"]
    assert (y[:, 0] > y[:, 1]).all()   # class 0 all over the box
    path, spec = tmp_path / "deep.onnx", tmp_path / "p.vnnlib"
    onnx.save(with_threshold(model, threshold_of(y[:, 0] - y[:, 1])), path)
    write_property(spec, low, high, "(<= Y_0 Y_1)", 2)
    return path, spec


def test_a_deep_net_proves_in_float32_with_domains_in_double(tmp_path, monkeypatch):
    """y0 - y1 > -(sampled minimum): holds with room in real arithmetic; in float32 mode the float32 split
    graphs' own rounding (bounded through |W| products) blocks every domain, even with every ReLU stable; in
    float64 it holds; with the model's error beside the bounds (carried through |W| and every unstable ReLU)
    instead of inside them, it does not."""
    from graphcert.verify import search
    path, spec = setup(tmp_path, lambda margins: -float(margins.min()))
    assert verify(path, spec, timeout=30, branching="relus").status == "holds"
    with monkeypatch.context() as patched:
        patched.setattr(search, "ROUNDING_LEAVES", False)
        assert verify(path, spec, timeout=10, branching="relus").status != "holds"
    monkeypatch.setattr(relu_bab, "DOMAINS_IN_DOUBLE", False)
    assert verify(path, spec, timeout=10, branching="relus").status != "holds"


def test_domains_in_double_never_prove_a_property_a_sampled_point_violates(tmp_path):
    """y0 - y1 > 1.001 x (sampled minimum margin): the sampled point violates it by about 1e-4, far beyond
    rounding; float64 domains never answer holds."""
    path, spec = setup(tmp_path, lambda margins: 1.001 * float(margins.min()))
    result = verify(path, spec, timeout=8, branching="relus")
    assert result.status != "holds", result


def test_domains_in_double_build_only_the_float64_graphs_rounding_analysis(tmp_path, monkeypatch):
    """With the model's rounding inside the bounds, split domains bounded in float64 take the float64 graphs' own
    rounding as their slack: the float32 graphs' analysis (0.2 s to build on eran's 9x200 net) is never built,
    and the property still holds."""
    from graphcert import rounding_slack
    from graphcert.precision import FLOAT64
    built = []
    original = rounding_slack.RoundingSlack.__init__

    def recording(self, *args, **kwargs):
        built.append(kwargs.get("bound_arithmetic"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rounding_slack.RoundingSlack, "__init__", recording)
    path, spec = setup(tmp_path, lambda margins: -float(margins.min()))
    assert verify(path, spec, timeout=30, branching="relus").status == "holds"
    assert built and all(arithmetic is FLOAT64 for arithmetic in built), built
