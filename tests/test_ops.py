"""graphcert.ops facts against onnxruntime: the window geometry gives ONNX's output sizes and the positions every
window reads, over strides, dilations, explicit pads, SAME_UPPER/SAME_LOWER/VALID and ceil mode."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphcert.ops import WindowGeometry


def cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        op = rng.choice(["MaxPool", "AveragePool", "Conv"])
        rank = int(rng.integers(1, 3))
        spatial = [int(rng.integers(1, 10)) for _ in range(rank)]
        kernel = [int(rng.integers(1, 4)) for _ in range(rank)]
        attrs = {"strides": [int(rng.integers(1, 4)) for _ in range(rank)]}
        auto_pad = str(rng.choice(["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
        # onnxruntime 1.32 sizes VALID and SAME windows of dilated pools without the dilation (ONNX's spec and
        # shape inference include it; its Conv refuses the pair): the geometry follows the spec, so dilations are
        # compared with explicit pads only.
        if op != "AveragePool" and auto_pad == "NOTSET":
            attrs["dilations"] = [int(rng.integers(1, 3)) for _ in range(rank)]
        if auto_pad == "NOTSET":
            attrs["pads"] = [int(rng.integers(0, k)) for k in kernel * 2]  # pools need pads below the kernel
        else:
            attrs["auto_pad"] = auto_pad
        if op != "Conv" and rng.random() < 0.5:
            attrs["ceil_mode"] = 1
        yield op, spatial, kernel, attrs


def run_onnxruntime(op, spatial, kernel, attrs):
    x = np.random.default_rng(1).normal(size=[1, 1, *spatial]).astype(np.float32)
    inputs, initializers = ["x"], []
    if op == "Conv":
        initializers.append(onnx.numpy_helper.from_array(np.ones([1, 1, *kernel], np.float32), "w"))
        inputs.append("w")
    else:
        attrs = {**attrs, "kernel_shape": kernel}
    node = helper.make_node(op, inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return x, session.run(None, {"x": x})[0], ir.from_proto(model).graph.node(0)


def test_window_geometry_gives_onnxruntime_output_sizes_and_window_positions():
    checked = 0
    for op, spatial, kernel, attrs in cases(seed=0, count=400):
        try:
            x, y, node = run_onnxruntime(op, spatial, kernel, attrs)
        except Exception:
            continue  # a configuration onnxruntime itself rejects (e.g. a window larger than the padded input)
        geometry = WindowGeometry.of(node, spatial, kernel)
        if not geometry.fits:
            continue  # runtimes disagree where a window is larger than the padded input: passes refuse those
        assert list(y.shape[2:]) == geometry.out, (op, spatial, kernel, attrs)
        if op == "MaxPool" and all(geometry.out):
            # Each output is the maximum over the in-range positions its window reads (padding is ignored).
            taps = [geometry.taps(axis) for axis in range(len(spatial))]
            for index in itertools.product(*(range(n) for n in geometry.out)):
                positions = [t[i] for t, i in zip(taps, index)]
                inside = [p[(p >= 0) & (p < size)] for p, size in zip(positions, spatial)]
                window = x[0, 0][np.ix_(*inside)]
                assert y[(0, 0, *index)] == window.max(), (spatial, kernel, attrs, index)
        checked += 1
    assert checked >= 250, f"only {checked} configurations ran"


def test_counting_padding_starts_never_counts_fewer_windows():
    for op, spatial, kernel, attrs in cases(seed=1, count=200):
        node = ir.from_proto(helper.make_node(op, ["x"], ["y"], **{**attrs, "kernel_shape": kernel}))
        geometry = WindowGeometry.of(node, spatial, kernel)
        counting = dataclasses.replace(geometry, count_padding_starts=True)
        assert all(a >= b for a, b in zip(counting.out, geometry.out))
        assert all(len(counting.taps(axis)) == n for axis, n in enumerate(counting.out))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_keeps_the_size_at_stride_one(auto_pad):
    node = ir.from_proto(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[4], auto_pad=auto_pad))
    geometry = WindowGeometry.of(node, [7])
    assert geometry.out == [7] and sum(geometry.pads) == 3
    assert (geometry.begin[0] < geometry.end[0]) == (auto_pad == "SAME_UPPER")


@pytest.mark.parametrize("method", ["crown", "lipschitz"])
def test_passes_refuse_windows_larger_than_the_padded_input(method):
    """onnxruntime slides one window where the spec slides none: no pass may guess which."""
    from graphcert import api
    from graphcert.errors import UnsupportedOpError
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[3, 3])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    if method == "crown":
        # Its own rules refuse the node; IBP copies the pool onto both bounds, whichever window the runtime
        # slides, and CROWN takes that interval (passes/crown_fallback.py).
        bound = api.bound_graph(api.load(model), method)
        assert "via IBP fallback" in bound.metadata_props["graphcert.fallback"]
        return
    with pytest.raises(UnsupportedOpError, match="MaxPool"):
        api.bound_graph(api.load(model), method, norm="l2" if method == "lipschitz" else "linf")


# ---- element-wise families: one statement in graphcert.ops reaches every pass ------------------------------

def _celu_model(alpha: float = 0.7, w1: np.ndarray | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(6, 8)).astype(np.float32) if w1 is None else w1
    w2 = rng.normal(size=(8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Celu", ["h"], ["a"], alpha=alpha),
         helper.make_node("MatMul", ["a", "w2"], ["y"])], "celu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("method", ["ibp", "crown"])   # CROWN through its IBP fallback
def test_an_op_stated_in_ops_is_bounded_soundly(method):
    from graphcert import api
    from graphcert.export import to_proto
    from harness import check_bounds_sound, graph_bound_fn
    model = _celu_model()
    bound = to_proto(api.bound_graph(api.load(model), method))
    x0 = np.random.default_rng(0).normal(size=(1, 6)).astype(np.float32) * 3
    for eps in (0.01, 0.5, 4.0):
        report = check_bounds_sound(model, graph_bound_fn(bound, "x", "y"), x0, eps)
        assert report.max_violation <= 0, report


def test_an_op_stated_in_ops_gets_a_sound_lipschitz_constant_and_a_torch_kernel():
    from graphcert import api
    from graphcert.passes.lipschitz import lipschitz_constants
    from graphcert.runtime import Session
    from graphcert.torch_exec import TorchGraph
    import torch
    model = _celu_model()
    normalised = api.load(model)
    constants, _ = lipschitz_constants(normalised)
    out = next(v for v in constants if v.name == "y")
    w1, w2 = (onnx.numpy_helper.to_array(t) for t in model.graph.initializer)
    assert constants[out] >= np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2) * (1 - 1e-6)  # Celu's slope reaches 1
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32) * 3
    expected = Session(model).run({"x": x})["y"]
    with torch.no_grad():
        got = TorchGraph(normalised)({"x": x})["y"]
    assert np.allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 300.0, "cancelling"])
def test_the_float32_analysis_of_an_op_stated_in_ops_bounds_its_error(scale):
    """Celu, stated only in graphcert.ops: E bounds |float32 output - float64 output| at sampled points of boxes
    (float64 reference: the same weights, evaluated in double). "cancelling": inputs near 1000 whose first
    layer takes differences (weights ±1.1), so the products' rounding (~6e-5) survives into values ~1 and
    Celu must carry it on (the test fails when the rule drops the propagated error)."""
    from graphcert import api
    from graphcert.rounding_slack import RoundingSlack
    from graphcert.runtime import Session
    rng = np.random.default_rng(4)
    if scale == "cancelling":
        w1 = np.zeros((6, 8), dtype=np.float32)
        for j in range(8):
            a, b = rng.choice(6, size=2, replace=False)
            w1[a, j], w1[b, j] = 1.1, -1.1
        model = _celu_model(w1=w1)
        x = (1000 + rng.uniform(0, 1, size=(8, 6))).astype(np.float32)
        lower, upper = x - np.float32(0.01), x + np.float32(0.01)
    else:
        model = _celu_model()
        x = (rng.normal(size=(8, 6)) * scale).astype(np.float32)
        lower, upper = x - np.float32(0.1 * scale), x + np.float32(0.1 * scale)
    w1, w2 = (onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer)
    _, error, _ = RoundingSlack(api.load(model)).outputs(lower, upper)
    session = Session(model)
    for i in range(len(x)):
        points = rng.uniform(lower[i], upper[i], (200, 6)).astype(np.float32)
        h = points.astype(np.float64) @ w1
        exact = (np.maximum(h, 0) + np.minimum(0, 0.7 * np.expm1(h / 0.7))) @ w2
        found = session.run({"x": points})["y"].astype(np.float64)
        assert np.all(np.abs(found - exact) <= error[i]), (np.abs(found - exact).max(), error[i].min())


def test_an_op_stated_after_the_passes_loaded_reaches_them_all():
    """What a new op costs: one def_elementwise call (here Softsign, taken out of every table first)."""
    import torch
    from graphcert import ops
    from graphcert import torch_exec
    from graphcert import rounding
    from graphcert.passes import ibp, lipschitz
    tables = (ibp.RULES, ibp.CONDITIONS, lipschitz.RULES, lipschitz.RULES.preconditions, torch_exec.KERNELS,
              ops.ELEMENTWISE, rounding.RULES)
    saved, monotone = [dict(t) for t in tables], list(ibp.MONOTONE)
    try:
        ops.forget_elementwise("Softsign", [ibp.RULES, lipschitz.RULES, torch_exec.KERNELS, rounding.RULES])
        ops.def_elementwise("Softsign", torch=lambda node: torch.nn.functional.softsign, lipschitz=1.0)
        assert ibp.RULES["Softsign"] is ibp.RULES["Relu"]          # the shared monotone rule
        assert lipschitz.RULES["Softsign"](None, None, 2.0) == [2.0]
        assert torch_exec.KERNELS["Softsign"](None, None) is torch.nn.functional.softsign
        assert rounding.RULES["Softsign"] is rounding.RULES["Celu"]  # the float32 analysis by its slope
    finally:
        for table, content in zip(tables, saved):
            table.clear()
            table.update(content)
        ibp.MONOTONE[:] = monotone
