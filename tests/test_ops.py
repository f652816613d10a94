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
    with pytest.raises(UnsupportedOpError, match="MaxPool"):
        api.bound_graph(api.load(model), method, norm="l2" if method == "lipschitz" else "linf")
