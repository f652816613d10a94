"""The torch executor agrees with onnxruntime on every op family, real networks and bound graphs, and is
differentiable with respect to inputs and parameters."""
from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import VNNCOMP
from graphcert.errors import GraphcertError, InputError, UnsupportedOpError
from graphcert.export import to_proto
from graphcert.interface import InputSet, clone
from graphcert.model import load, model_inputs, static_shape
from graphcert.passes.ibp import IntervalPass
from graphcert.passes.spec import SpecPass
from graphcert.runtime import Session
from graphcert.torch_exec import TorchGraph

FLOAT = TensorProto.FLOAT
ORT_ERRORS = ort.capi.onnxruntime_pybind11_state


def _reference(model: ir.Model, feeds: dict) -> dict[str, np.ndarray]:
    # Unchecked: ONNX shape inference disagrees with onnxruntime (and the operator docs) on ceil-mode pools.
    return Session(to_proto(clone(model), check=False)).run(feeds)


def _assert_matches(model: ir.Model, feeds: dict, **options) -> TorchGraph:
    """TorchGraph(model) and onnxruntime give the same outputs, to ~1e-5 relative to each output's scale."""
    executor = TorchGraph(model, **options)
    expected = _reference(model, feeds)
    got = executor(feeds)
    assert set(got) == set(expected)
    for name, reference in expected.items():
        actual = got[name].detach().numpy()
        assert actual.shape == reference.shape, name
        scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
        np.testing.assert_allclose(actual, reference, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    return executor


# ---- one small model per op family --------------------------------------------------------------------

def _graph(nodes, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray], outputs: list[str],
           opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "case",
        [helper.make_tensor_value_info(name, FLOAT, list(a.shape)) for name, a in inputs.items()],
        [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    # Declare the exact output shapes, which shape inference cannot always tell (checkers require them).
    arrays = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    for value, array in zip(model.graph.output, arrays):
        value.CopyFrom(helper.make_tensor_value_info(value.name, FLOAT, list(array.shape)))
    return model


def _single(op: str, inputs: dict, consts: dict | None = None, order: list[str] | None = None, opset: int = 17,
            outputs: int = 1, cast: bool = False, **attrs):
    """One `op` node over graph inputs and constant inputs (in `order`, '' for a skipped optional input)."""
    consts = consts or {}
    order = order if order is not None else list(inputs) + list(consts)
    names = [f"y{i}" for i in range(outputs)]
    produced = [f"raw{i}" for i in range(outputs)] if cast else names
    nodes = [helper.make_node(op, order, produced, **attrs)]
    if cast:
        nodes += [helper.make_node("Cast", [p], [n], to=FLOAT) for p, n in zip(produced, names)]
    return _graph(nodes, inputs, consts, names, opset), inputs


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _positive(rng, *shape) -> np.ndarray:
    return rng.uniform(0.5, 2.0, size=shape).astype(np.float32)


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def matmul_family():
    r = _rng(1)
    yield _single("MatMul", {"x": _normal(r, 2, 3, 4)}, {"w": _normal(r, 4, 5)})
    yield _single("MatMul", {"x": _normal(r, 4)}, {"w": _normal(r, 4, 5)})
    yield _single("MatMul", {"x": _normal(r, 2, 3, 4), "y": _normal(r, 2, 4, 5)})
    for alpha, beta, ta, tb, c_shape in [(1.0, 1.0, 0, 1, (5,)), (0.5, 2.0, 1, 0, (3, 5)), (-1.5, 0.3, 1, 1, (1,)),
                                         (1.0, 1.0, 0, 0, None)]:
        a = _normal(r, 4, 3) if ta else _normal(r, 3, 4)
        w = _normal(r, 5, 4) if tb else _normal(r, 4, 5)
        consts = {"w": w} if c_shape is None else {"w": w, "c": _normal(r, *c_shape)}
        yield _single("Gemm", {"a": a}, consts, alpha=alpha, beta=beta, transA=ta, transB=tb)
    yield _single("Einsum", {"x": _normal(r, 2, 3, 4)}, {"w": _normal(r, 4, 5)}, equation="bij,jk->bik")
    yield _single("Einsum", {"x": _normal(r, 2, 3, 4)}, {"v": _normal(r, 4)}, equation="...i, i -> ...")
    yield _single("Einsum", {"x": _normal(r, 3, 4), "y": _normal(r, 3, 4)}, equation="ij,ij->i")


@case
def conv_family():
    r = _rng(2)
    x = _normal(r, 2, 4, 7, 6)
    yield _single("Conv", {"x": x}, {"w": _normal(r, 6, 4, 3, 3), "b": _normal(r, 6)})
    yield _single("Conv", {"x": x}, {"w": _normal(r, 6, 2, 3, 2)}, group=2, strides=[2, 1], pads=[1, 0, 2, 1],
                  dilations=[1, 2])
    for auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        yield _single("Conv", {"x": x}, {"w": _normal(r, 3, 4, 4, 3)}, auto_pad=auto_pad, strides=[2, 2])
    yield _single("Conv", {"x": _normal(r, 2, 3, 9)}, {"w": _normal(r, 4, 3, 3), "b": _normal(r, 4)},
                  pads=[2, 1], strides=[2])
    yield _single("Conv", {"x": _normal(r, 1, 2, 4, 5, 4)}, {"w": _normal(r, 3, 2, 2, 3, 2)}, pads=[1, 0, 1, 0, 1, 1])
    yield _single("ConvTranspose", {"x": x}, {"w": _normal(r, 4, 3, 3, 3), "b": _normal(r, 3)})
    yield _single("ConvTranspose", {"x": x}, {"w": _normal(r, 4, 2, 3, 2)}, group=2, strides=[2, 3],
                  pads=[1, 0, 0, 1], output_padding=[1, 2], dilations=[1, 2])
    yield _single("ConvTranspose", {"x": x}, {"w": _normal(r, 4, 3, 3, 3)}, strides=[2, 2], output_shape=[15, 12])
    yield _single("ConvTranspose", {"x": x}, {"w": _normal(r, 4, 3, 3, 3)}, strides=[2, 2], auto_pad="SAME_UPPER")
    yield _single("ConvTranspose", {"x": _normal(r, 2, 3, 5)}, {"w": _normal(r, 3, 2, 4)}, strides=[3], pads=[1, 2])


@case
def normalisation_family():
    r = _rng(3)
    for shape in [(2, 3, 4, 5), (4, 3)]:
        consts = {"s": _normal(r, 3), "b": _normal(r, 3), "m": _normal(r, 3), "v": _positive(r, 3)}
        yield _single("BatchNormalization", {"x": _normal(r, *shape)}, consts, epsilon=1e-3)
    yield _single("LayerNormalization", {"x": _normal(r, 2, 3, 6)}, {"s": _normal(r, 6), "b": _normal(r, 6)})
    yield _single("LayerNormalization", {"x": _normal(r, 2, 3, 4)}, {"s": _normal(r, 3, 4)}, axis=1, epsilon=0.1)
    yield _single("LayerNormalization", {"x": _normal(r, 2, 5)}, {"s": _normal(r, 5)}, outputs=3)


@case
def pool_family():
    r = _rng(4)
    x = _normal(r, 2, 3, 7, 8)
    for include in (0, 1):
        for ceil in (0, 1):
            yield _single("AveragePool", {"x": x}, kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 1, 1],
                          count_include_pad=include, ceil_mode=ceil)
    yield _single("AveragePool", {"x": x}, kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2])
    yield _single("AveragePool", {"x": _normal(r, 2, 3, 10)}, kernel_shape=[4], strides=[3], ceil_mode=1)
    yield _single("MaxPool", {"x": x}, kernel_shape=[2, 3], strides=[2, 2], pads=[1, 1, 0, 1], ceil_mode=1)
    yield _single("MaxPool", {"x": x}, kernel_shape=[2, 2], dilations=[2, 1], strides=[1, 2])
    yield _single("MaxPool", {"x": x}, kernel_shape=[3, 3], auto_pad="SAME_LOWER", strides=[2, 2])
    yield _single("MaxPool", {"x": x}, kernel_shape=[2, 2], opset=8)
    yield _single("GlobalAveragePool", {"x": x})
    yield _single("GlobalMaxPool", {"x": _normal(r, 2, 3, 5)})
    axes = np.array([1, -1], dtype=np.int64)
    yield _single("ReduceMean", {"x": x}, axes=[1, -1], opset=13)
    yield _single("ReduceSum", {"x": x}, {"axes": axes}, keepdims=0, opset=13)
    yield _single("ReduceSum", {"x": x}, {"axes": np.zeros(0, np.int64)}, noop_with_empty_axes=1, opset=13)
    yield _single("ReduceMax", {"x": x}, {"axes": axes}, keepdims=1, opset=18)
    yield _single("ReduceMin", {"x": x}, keepdims=0, opset=18)
    yield _single("ReduceMean", {"x": x}, {"axes": np.array([2], np.int64)}, opset=18)


@case
def shape_family():
    r = _rng(5)
    x = _normal(r, 2, 3, 4, 2)
    for axis in (0, 1, 2, -1):
        yield _single("Flatten", {"x": x}, axis=axis)
    yield _single("Reshape", {"x": x}, {"s": np.array([0, -1, 4], np.int64)})
    yield _single("Reshape", {"x": x}, {"s": np.array([8, 0, 2], np.int64)}, opset=14)
    empty = np.zeros((2, 0, 3), np.float32)  # with allowzero a 0 in the shape is a real zero-size dimension
    yield _single("Reshape", {"x": empty}, {"s": np.array([3, 0, 2], np.int64)}, allowzero=1, opset=14)
    yield _single("Transpose", {"x": x}, perm=[2, 0, 3, 1])
    yield _single("Transpose", {"x": x})
    y = _normal(r, 2, 1, 4, 1)
    yield _single("Squeeze", {"x": y}, axes=[1, -1], opset=11)
    yield _single("Squeeze", {"x": y}, {"a": np.array([-1], np.int64)}, opset=13)
    yield _single("Squeeze", {"x": y}, opset=13)
    yield _single("Unsqueeze", {"x": x}, axes=[0, -1], opset=11)
    yield _single("Unsqueeze", {"x": x}, {"a": np.array([-1, 1], np.int64)}, opset=13)
    yield _single("Identity", {"x": x})
    yield _single("Dropout", {"x": x}, {"ratio": np.array(0.3, np.float32)}, outputs=2, cast=True, opset=13)
    yield _single("Concat", {"x": x, "y": _normal(r, 2, 3, 1, 2)}, {"c": _normal(r, 2, 3, 2, 2)}, axis=-2)
    yield _single("Expand", {"x": _normal(r, 3, 1)}, {"s": np.array([2, 1, 4], np.int64)})
    yield _single("Expand", {"x": _normal(r, 2, 3)}, {"s": np.array([1, 3], np.int64)})
    yield _single("Tile", {"x": _normal(r, 2, 3)}, {"s": np.array([2, 3], np.int64)})
    z = _normal(r, 2, 8, 3, 2)
    yield _single("DepthToSpace", {"x": z}, blocksize=2)
    yield _single("DepthToSpace", {"x": z}, blocksize=2, mode="CRD")
    yield _single("SpaceToDepth", {"x": _normal(r, 2, 3, 4, 6)}, blocksize=2)


@case
def selection_family():
    r = _rng(6)
    x = _normal(r, 4, 5, 6)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    yield _single("Slice", {"x": x}, {"s": i64(1, -4), "e": i64(100, -1), "a": i64(0, 2), "t": i64(2, 1)})
    yield _single("Slice", {"x": x}, {"s": i64(-1, 10), "e": i64(-100, 0), "a": i64(1, -1), "t": i64(-2, -3)})
    yield _single("Slice", {"x": x}, {"s": i64(1), "e": i64(3)})
    yield _single("Slice", {"x": x}, starts=[0, 2], ends=[2, 100], axes=[2, 0], opset=9)
    yield _single("Gather", {"x": x}, {"i": i64(3, -1, 0)}, axis=1)
    yield _single("Gather", {"x": x}, {"i": np.array([[1, -2], [0, 0]], np.int64)}, axis=-1)
    yield _single("Gather", {"x": x}, {"i": np.array(2, np.int64)}, axis=0)
    yield _single("Split", {"x": x}, outputs=2, axis=2)
    yield _single("Split", {"x": x}, {"s": i64(1, 3, 2)}, outputs=3, axis=-1)
    yield _single("Split", {"x": x}, split=[3, 2], outputs=2, axis=1, opset=11)
    yield _single("Split", {"x": x}, outputs=3, axis=1, num_outputs=3, opset=18)
    for mode in ("constant", "reflect", "edge"):
        yield _single("Pad", {"x": x}, {"p": i64(1, 0, 2, 0, 2, 1)}, mode=mode)
    yield _single("Pad", {"x": x}, {"p": i64(0, -1, 1, 1, 2, -2), "v": np.array(0.5, np.float32)})
    yield _single("Pad", {"x": x}, {"p": i64(2, 1, 3, 0), "v": np.array(-1.0, np.float32), "a": i64(-1, 0)},
                  opset=18)
    yield _single("Pad", {"x": x}, pads=[0, 1, 1, 0, 0, 2], value=2.0, opset=7)
    yield _where(r)


def _where(r):
    inputs = {"x": _normal(r, 4, 5), "y": _normal(r, 5)}
    nodes = [helper.make_node("Greater", ["x", "y"], ["g"]), helper.make_node("Where", ["g", "x", "y"], ["out"])]
    return _graph(nodes, inputs, {}, ["out"]), inputs


@case
def elementwise_family():
    r = _rng(7)
    x, y = _normal(r, 3, 4), _normal(r, 4)
    for op in ("Add", "Sub", "Mul", "Div"):
        yield _single(op, {"x": x, "y": y})
    yield _single("Add", {"x": x}, {"k": _normal(r, 1, 4)})
    yield _single("Pow", {"x": _positive(r, 3, 4)}, {"p": np.array(0.5, np.float32)})
    yield _single("Pow", {"x": x}, {"p": np.array([2.0, 3.0, 1.0, 2.0], np.float32)})
    yield _single("Pow", {"x": x}, {"p": np.array(3, np.int64)})
    for op in ("Max", "Min", "Sum"):
        yield _single(op, {"x": x, "y": y, "z": _normal(r, 3, 1)})
        yield _single(op, {"x": x})
    for op in ("Neg", "Abs", "Exp", "Erf", "Atan", "Asinh", "Sinh", "Floor", "Ceil", "Sign", "Relu", "Sigmoid",
               "Tanh", "Softplus", "Softsign", "Selu"):
        yield _single(op, {"x": 3 * x})
    for op in ("Reciprocal", "Sqrt", "Log"):
        yield _single(op, {"x": _positive(r, 3, 4)})
    yield _single("LeakyRelu", {"x": x}, alpha=0.2)
    yield _single("LeakyRelu", {"x": x})
    yield _single("Elu", {"x": x}, alpha=0.7)
    yield _single("Selu", {"x": x}, alpha=1.2, gamma=0.9)
    yield _single("HardSigmoid", {"x": 4 * x}, alpha=0.3, beta=0.4)
    yield _single("ThresholdedRelu", {"x": x}, alpha=0.5)
    yield _single("Clip", {"x": x}, {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)})
    yield _single("Clip", {"x": x}, {"hi": np.array(0.2, np.float32)}, order=["x", "", "hi"])
    yield _single("Clip", {"x": x}, min=-0.3, max=0.4, opset=10)
    yield _single("Clip", {"x": x}, max=0.4, opset=10)
    yield _single("Clip", {"x": x})
    for op in ("Softmax", "LogSoftmax"):
        yield _single(op, {"x": _normal(r, 2, 3, 4)}, axis=1)
        yield _single(op, {"x": _normal(r, 2, 3, 4)}, axis=1, opset=11)
        yield _single(op, {"x": _normal(r, 2, 3, 4)})


@case
def logic_and_type_family():
    r = _rng(8)
    inputs = {"x": _normal(r, 3, 4), "y": _normal(r, 4)}
    nodes = [helper.make_node("Greater", ["x", "y"], ["gt"]), helper.make_node("Less", ["x", "y"], ["lt"]),
             helper.make_node("Floor", ["x"], ["fx"]), helper.make_node("Floor", ["y"], ["fy"]),
             helper.make_node("Equal", ["fx", "fy"], ["eq"]), helper.make_node("Or", ["gt", "eq"], ["o"]),
             helper.make_node("And", ["o", "lt"], ["a"]), helper.make_node("Not", ["a"], ["n"]),
             helper.make_node("Cast", ["n"], ["n_f"], to=FLOAT),
             helper.make_node("Cast", ["x"], ["x_i"], to=TensorProto.INT64),
             helper.make_node("CastLike", ["x_i", "y"], ["x_t"]), helper.make_node("Add", ["x_t", "n_f"], ["out"])]
    yield _graph(nodes, inputs, {}, ["out"]), inputs
    inputs = {"x": np.array([[1.0, np.inf, -np.inf, np.nan], [2.0, 2.0, -1.0, 2.0]], np.float32)}
    nodes = [helper.make_node("IsNaN", ["x"], ["nan"]), helper.make_node("IsInf", ["x"], ["inf"]),
             helper.make_node("IsInf", ["x"], ["positive"], detect_negative=0),
             helper.make_node("Concat", ["nan", "inf", "positive"], ["flags"], axis=0),
             helper.make_node("Cast", ["flags"], ["out"], to=FLOAT)]
    yield _graph(nodes, inputs, {}, ["out"]), inputs
    x = np.floor(3 * _normal(r, 3, 4, 5))  # ties
    for op in ("ArgMax", "ArgMin"):
        for axis, keepdims, last in ((1, 1, 0), (-1, 0, 1), (0, 1, 1)):
            yield _single(op, {"x": x}, cast=True, axis=axis, keepdims=keepdims, select_last_index=last)
    for exclusive, reverse in ((0, 0), (1, 0), (0, 1), (1, 1)):
        yield _single("CumSum", {"x": x}, {"axis": np.array(-2, np.int64)}, exclusive=exclusive, reverse=reverse)


@case
def shape_computation_family():
    """Shapes read from the input at run time: Shape, Size, ConstantOfShape, Range, Constant."""
    r = _rng(9)
    inputs = {"x": _normal(r, 2, 3, 4)}
    two = helper.make_tensor("two", FLOAT, [1], [2.0])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["twos"], value=two),
        helper.make_node("Shape", ["x"], ["lead"], end=1),
        helper.make_node("Shape", ["x"], ["tail"], start=-1),
        helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]),
        helper.make_node("Concat", ["lead", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("Size", ["x"], ["size"]),
        helper.make_node("Cast", ["size"], ["size_f"], to=FLOAT),
        helper.make_node("Constant", [], ["zero"], value_float=0.0),
        helper.make_node("Constant", [], ["step"], value=helper.make_tensor("s", FLOAT, [], [1.5])),
        helper.make_node("Range", ["zero", "size_f", "step"], ["ramp"]),
        helper.make_node("Constant", [], ["i0"], value_int=0),
        helper.make_node("Constant", [], ["i1"], value_int=1),
        helper.make_node("Squeeze", ["tail"], ["last"]),
        helper.make_node("Range", ["i0", "last", "i1"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["positions_f"], to=FLOAT),
        helper.make_node("Mul", ["x", "twos"], ["doubled"]),
        helper.make_node("Add", ["doubled", "positions_f"], ["out"]),
        helper.make_node("ReduceSum", ["ramp"], ["ramp_sum"], keepdims=1),
        helper.make_node("Add", ["flat", "ramp_sum"], ["out2"]),
    ]
    yield _graph(nodes, inputs, {}, ["out", "out2"]), inputs


PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.data())
def test_random_window_geometry_matches_onnxruntime(data):
    """Conv, ConvTranspose and pools over random sizes, kernels, strides, dilations, pads and modes."""
    draw = data.draw
    op = draw(st.sampled_from(["Conv", "ConvTranspose", "AveragePool", "MaxPool"]))
    rank = draw(st.integers(1, 2))
    sizes = [draw(st.integers(3, 9)) for _ in range(rank)]
    kernel_shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    attrs = {"strides": [draw(st.integers(1, 3)) for _ in range(rank)]}
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # AveragePool takes dilations from opset 19 only; with SAME padding onnxruntime refuses them (Conv) or
    # pads for the undilated kernel (MaxPool), against the operator docs, which the executor follows.
    if op != "AveragePool" and not auto_pad.startswith("SAME"):
        attrs["dilations"] = [draw(st.integers(1, 2)) for _ in range(rank)]
    if auto_pad.startswith("SAME"):
        # A stride beyond the kernel makes the SAME padding negative. The executor pads nothing then (and
        # ConvTranspose, as documented, zeros): onnxruntime refuses, reads out of place, or clamps.
        attrs["strides"] = [min(s, k) for s, k in zip(attrs["strides"], kernel_shape)]
    if auto_pad == "NOTSET":
        attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel_shape * 2]
    else:
        attrs["auto_pad"] = auto_pad
    # Windows larger than the input give empty outputs, where onnxruntime ignores dilations under VALID.
    reach = [(k - 1) * d + 1 for k, d in zip(kernel_shape, attrs.get("dilations", [1] * rank))]
    assume(all(w <= s for w, s in zip(reach, sizes)))
    r = _rng(draw(st.integers(0, 1000)))
    x = _normal(r, 2, 4, *sizes)
    consts = {}
    if op in ("Conv", "ConvTranspose"):
        group = draw(st.sampled_from([1, 2]))
        out_channels = 2 * draw(st.integers(1, 2))
        shape = (out_channels, 4 // group) if op == "Conv" else (4, out_channels // group)
        consts = {"w": _normal(r, *shape, *kernel_shape), "b": _normal(r, shape[0] if op == "Conv" else out_channels)}
        attrs["group"] = group
        if op == "ConvTranspose" and auto_pad == "NOTSET" and draw(st.booleans()):
            attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in attrs["strides"]]
    else:
        attrs["kernel_shape"] = kernel_shape
        attrs["ceil_mode"] = draw(st.integers(0, 1))
        if op == "AveragePool":
            attrs["count_include_pad"] = draw(st.integers(0, 1))
    try:
        proto, feeds = _single(op, {"x": x}, consts, **attrs)
    except (ORT_ERRORS.Fail, ORT_ERRORS.InvalidArgument, ORT_ERRORS.RuntimeException):
        assume(False)  # a geometry onnxruntime refuses
    assume(all(d.dim_value > 0 for d in proto.graph.output[0].type.tensor_type.shape.dim))
    _assert_matches(ir.from_proto(proto), feeds)


@PROPERTY
@given(st.lists(st.tuples(st.integers(-9, 9), st.integers(-9, 9), st.integers(0, 2),
                          st.integers(-3, 3).filter(bool)), min_size=1, max_size=3))
def test_random_slices_match_onnxruntime(slices):
    """Out-of-range and negative starts, ends and steps clamp as ONNX Slice says."""
    x = _normal(_rng(20), 5, 4, 6)
    columns = [np.array(c, np.int64) for c in zip(*slices)]
    assume(len(set(columns[2].tolist())) == len(slices))  # each axis at most once
    proto, feeds = _single("Slice", {"x": x}, dict(zip("seat", columns)))
    _assert_matches(ir.from_proto(proto), feeds)


def _case_params():
    return [pytest.param(fn, id=name) for name, fn in CASES.items()]


@pytest.mark.parametrize("family", _case_params())
def test_op_family_matches_onnxruntime(family):
    for proto, feeds in family():
        _assert_matches(ir.from_proto(proto), feeds)
        # Normalised (opset 17, constants folded) it must agree as well; batch dims of 1 become symbolic.
        _assert_matches(load(proto), feeds)


# ---- real networks, their bound graphs and spec graphs -----------------------------------------------

def _network_paths():
    return (sorted((VNNCOMP / "test").glob("*.onnx")) + sorted((VNNCOMP / "mnistfc").glob("*.onnx"))
            + sorted((VNNCOMP / "acasxu").glob("*.onnx"))[::15])


def _sample(model: ir.Model, rng: np.random.Generator, batch: int = 3) -> dict[str, np.ndarray]:
    feeds = {}
    for value in model_inputs(model):
        shape = [d if isinstance(d, int) else batch for d in static_shape(value)]
        feeds[value.name] = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
    return feeds


def _batched(model: ir.Model) -> bool:
    return all(not isinstance(static_shape(v)[0], int) for v in model_inputs(model) if static_shape(v))


@pytest.fixture(scope="module")
def networks():
    paths = _network_paths()
    if not paths:
        pytest.skip(f"shared benchmarks not found at {VNNCOMP}")
    return {path.name: load(path) for path in paths}


def test_benchmark_networks_match_onnxruntime(networks):
    rng = _rng(10)
    for name, model in networks.items():
        _assert_matches(model, _sample(model, rng))


def test_bound_graphs_match_onnxruntime(networks):
    rng = _rng(11)
    for name, model in networks.items():
        feeds = _sample(model, rng)
        bound = IntervalPass(InputSet("linf", (0.0, 1.0)))(model).model
        _assert_matches(bound, {**feeds, "epsilon": 0.02})
        box = IntervalPass(InputSet("box"))(model).model
        (x,) = [v.name for v in model_inputs(model)]
        _assert_matches(box, {f"{x}_lower": feeds[x] - 0.01, f"{x}_upper": feeds[x] + 0.01})
        trainable = IntervalPass(InputSet("linf"), trainable=True)(model).model
        _assert_matches(trainable, {**feeds, "epsilon": np.full(feeds[x].shape, 0.01, np.float32)})


def test_spec_graphs_match_onnxruntime(networks):
    rng = _rng(12)
    for name, model in networks.items():
        if not _batched(model):
            continue
        feeds = _sample(model, rng)
        outputs = static_shape(model.graph.outputs[0])[-1]
        matrix = rng.standard_normal((2, outputs)).astype(np.float32)
        constant = SpecPass(matrix, offset=np.array([0.5, -1.0], np.float32))(model).model
        _assert_matches(IntervalPass(InputSet("linf", (0.0, 1.0)))(constant).model, {**feeds, "epsilon": 0.01})
        runtime = SpecPass()(model).model
        objective = rng.standard_normal((3, outputs - 1, outputs)).astype(np.float32)
        _assert_matches(runtime, {**feeds, "objective": objective})
        _assert_matches(IntervalPass(InputSet("linf", (0.0, 1.0)))(runtime).model,
                        {**feeds, "objective": objective, "epsilon": 0.01})


def test_zoo_models_and_their_bound_graphs_match_onnxruntime():
    zoo = pytest.importorskip("zoo", reason="tests/zoo.py (the model zoo) is not available")
    rng = _rng(13)
    for name, entry in zoo.ZOO.items():
        proto = entry()
        model = load(proto)
        x = zoo.input_name(proto)
        feeds = {x: zoo.sample_input(entry, proto, batch=2 if entry.batched else 1)}
        _assert_matches(model, feeds)
        try:
            bound = IntervalPass(InputSet("linf", entry.domain))(model).model
        except UnsupportedOpError:
            continue
        _assert_matches(bound, {**feeds, "epsilon": 0.01 * rng.uniform(0.5, 1.5)})


# Zoo models by the intermediate bounds their CROWN graph uses (each graph takes a while to build and run).
CROWN_ZOO = {"crown": ["torch_cnn", "torch_residual", "torch_activations", "tf2onnx_nhwc", "skl2onnx_1d"],
             "ibp": ["torch_pooling", "torch_conv_transpose", "torch_conv_bn", "matlab_like", "opset8"]}


def test_crown_bound_graphs_match_onnxruntime(networks):
    zoo = pytest.importorskip("zoo", reason="tests/zoo.py (the model zoo) is not available")
    crown = pytest.importorskip("graphcert.passes.crown", reason="the CROWN pass is not available")
    rng = _rng(21)
    for intermediate, names in CROWN_ZOO.items():
        for name in names:
            entry = zoo.ZOO[name]
            proto = entry()
            feeds = {zoo.input_name(proto): zoo.sample_input(entry, proto, batch=2 if entry.batched else 1)}
            bound = crown.CrownPass(InputSet("linf", entry.domain), intermediate=intermediate)(load(proto)).model
            _assert_matches(bound, {**feeds, "epsilon": 0.01})
    for name in ("mnist-net_256x2.onnx", "test_small.onnx"):
        model = networks[name]
        feeds = _sample(model, rng)
        bound = crown.CrownPass(InputSet("linf", (0.0, 1.0)), trainable=True)(model).model
        _assert_matches(bound, {**feeds, "epsilon": 0.02})


def test_alpha_crown_slopes_are_inputs_with_gradients():
    zoo = pytest.importorskip("zoo", reason="tests/zoo.py (the model zoo) is not available")
    crown = pytest.importorskip("graphcert.passes.crown", reason="the CROWN pass is not available")
    entry = zoo.ZOO["torch_cnn"]
    proto = entry()
    model = load(proto)
    classes = static_shape(model.graph.outputs[0])[-1]
    rng = _rng(22)
    model = SpecPass(rng.standard_normal((3, classes)).astype(np.float32))(model).model
    bound = crown.CrownPass(InputSet("linf", entry.domain), alpha="inputs", keep_original=False)(model).model
    feeds = {zoo.input_name(proto): zoo.sample_input(entry, proto, batch=2), "epsilon": 0.02}
    slopes = [v for v in model_inputs(bound) if v.name.startswith(crown.ALPHA_PREFIX)]
    assert slopes
    for value in slopes:
        shape = [d if isinstance(d, int) else 2 for d in static_shape(value)]
        feeds[value.name] = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
    feeds[crown.ALPHA_START] = np.array(False)
    executor = _assert_matches(bound, feeds)
    tensors = {name: torch.tensor(a, requires_grad=name.startswith(crown.ALPHA_PREFIX)) for name, a in feeds.items()
               if name != "epsilon"}
    executor({**tensors, "epsilon": 0.02}, outputs=["margins_lower"])["margins_lower"].sum().backward()
    assert any(torch.count_nonzero(tensors[v.name].grad) > 0 for v in slopes)


# ---- gradients, parameters and errors -----------------------------------------------------------------

def _tiny_model(seed: int = 14) -> ir.Model:
    r = _rng(seed)
    inputs = {"x": _normal(r, 1, 2, 4, 4)}
    consts = {"conv.w": _normal(r, 3, 2, 3, 3), "conv.b": _normal(r, 3), "fc.w": _normal(r, 27, 4),
              "fc.b": _normal(r, 4)}
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Tanh", ["c"], ["t"]),
             helper.make_node("MaxPool", ["t"], ["p"], kernel_shape=[2, 2], pads=[1, 1, 1, 1], strides=[1, 1]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"]),
             helper.make_node("Softplus", ["g"], ["y"])]
    return load(_graph(nodes, inputs, consts, ["y"]))


def _finite_difference(function, tensor: torch.Tensor, positions, step: float = 1e-6) -> list[float]:
    estimates = []
    with torch.no_grad():
        for index in positions:
            original = tensor[index].item()
            tensor[index] = original + step
            high = function()
            tensor[index] = original - step
            low = function()
            tensor[index] = original
            estimates.append((high - low) / (2 * step))
    return estimates


def test_gradients_flow_to_inputs_and_parameters():
    model = _tiny_model()
    executor = TorchGraph(model, dtype=torch.float64)
    x = torch.tensor(_normal(_rng(15), 2, 2, 4, 4), dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)

    def loss():
        return float((executor({"x": x})["y"] * weights).sum())
    (executor({"x": x})["y"] * weights).sum().backward()
    rng = _rng(16)
    for tensor in [x] + [executor.parameter(name) for name in ("conv.w", "fc.w", "conv.b")]:
        positions = [tuple(int(rng.integers(0, n)) for n in tensor.shape) for _ in range(4)]
        numeric = _finite_difference(loss, tensor, positions)
        analytic = [tensor.grad[p].item() for p in positions]
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_bound_graph_gradients_reach_weights_and_epsilon():
    model = _tiny_model()
    bound = IntervalPass(InputSet("linf", (-3.0, 3.0)), trainable=True)(model).model
    executor = TorchGraph(bound, dtype=torch.float64)
    eps = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    x = torch.tensor(_normal(_rng(17), 2, 2, 4, 4), dtype=torch.float64)

    def width():
        out = executor({"x": x, "epsilon": eps}, outputs=["y_lower", "y_upper"])
        return (out["y_upper"] - out["y_lower"]).sum()
    width().backward()
    assert eps.grad.item() > 0
    weight = executor.parameter("fc.w")
    assert torch.count_nonzero(weight.grad) > 0
    positions = [tuple(int(i) for i in torch.nonzero(weight.grad)[k]) for k in (0, 5, 11)]
    numeric = _finite_difference(lambda: float(width()), weight, positions)
    np.testing.assert_allclose([weight.grad[p].item() for p in positions], numeric, rtol=1e-4, atol=1e-7)


def test_parameters_buffers_and_initializer_round_trip():
    model = _tiny_model()
    frozen = TorchGraph(model, trainable=False)
    assert frozen.parameter_names == [] and list(frozen.parameters()) == []
    with pytest.raises(InputError):
        frozen.parameter("fc.w")
    executor = TorchGraph(model)
    assert sorted(executor.parameter_names) == ["conv.b", "conv.w", "fc.b", "fc.w"]
    assert all(p.requires_grad for p in executor.parameters())
    assert all("." not in name for name, _ in executor.named_parameters())
    # Changed weights written back into the ONNX model give the executor's outputs under onnxruntime.
    arrays = {name: 0.5 * a for name, a in executor.initializer_arrays().items()}
    assert all(a.dtype == np.float32 for a in arrays.values())
    executor.load_initializers(arrays)
    for name, array in arrays.items():
        model.graph.initializers[name].const_value = ir.tensor(array, name=name)
    x = _normal(_rng(18), 3, 2, 4, 4)
    np.testing.assert_allclose(executor({"x": x})["y"].detach().numpy(), _reference(model, {"x": x})["y"],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError):
        executor.load_initializers({"fc.w": np.zeros((2, 2), np.float32)})


def test_only_requested_outputs_and_missing_inputs():
    model = _tiny_model()
    bound = IntervalPass(InputSet("linf"))(model).model
    executor = TorchGraph(bound)
    x = _normal(_rng(19), 2, 2, 4, 4)
    assert set(executor({"x": x}, outputs=["y"])) == {"y"}  # epsilon is not needed for the original output
    with pytest.raises(InputError, match="epsilon"):
        executor({"x": x})
    with pytest.raises(InputError, match="nothing"):
        executor({"x": x, "epsilon": 0.1}, outputs=["nothing"])


def test_run_time_failures_name_the_node():
    executor = TorchGraph(_tiny_model())
    with pytest.raises(GraphcertError, match=r"failed at node \S+ \((Reshape|Flatten)\)"):
        executor({"x": np.zeros((2, 2, 6, 6), np.float32)})


def test_unsupported_ops_are_all_listed():
    consts = {"s": np.ones(3, np.float32), "b": np.zeros(3, np.float32)}
    nodes = [helper.make_node("ReduceLogSum", ["x"], ["h"], name="det"),
             helper.make_node("ReduceLogSumExp", ["h"], ["r1"], name="prod_a"),
             helper.make_node("ReduceLogSumExp", ["r1"], ["r2"], name="prod_b"),
             helper.make_node("BatchNormalization", ["r2", "s", "b", "b", "s"], ["bn", "mean", "var"],
                              name="bn_train", training_mode=1),
             helper.make_node("Custom", ["bn"], ["y"], name="mine", domain="com.example")]
    graph = helper.make_graph(nodes, "unsupported", [helper.make_tensor_value_info("x", FLOAT, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", FLOAT, None)],
                              [numpy_helper.from_array(a, name) for name, a in consts.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError) as caught:
        TorchGraph(ir.from_proto(proto))
    listed = caught.value.nodes_by_op
    assert listed["ReduceLogSumExp"] == ["prod_a", "prod_b"] and listed["ReduceLogSum"] == ["det"]
    assert "bn_train" in listed["BatchNormalization"][0] and "com.example.Custom" in listed
    assert "Relu" not in str(caught.value)


# ---- every op IBP bounds runs on the executor, checked on ONNX's own node tests ---------------------------

def test_every_ibp_rule_has_a_torch_kernel():
    from graphcert.passes import ibp
    from graphcert.torch_exec import KERNELS
    # RoundingError (graphcert.rounding_leaves) stands for an unknown in [-e, e]: no runtime computes it, and
    # bound graphs keep none of it (interface.close_outputs makes what is left of it 0).
    assert sorted(set(ibp.RULES) - set(KERNELS) - {"RoundingError"}) == []


# Outputs the bound graphs of today carry (float32 bounds; other float types are the dtype work of issue 12).
NUMPY_TYPES = {TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT8,
               TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16,
               TensorProto.UINT32, TensorProto.UINT64}


@functools.lru_cache(maxsize=1)
def _all_node_cases() -> list:
    """ONNX's backend node test cases, built once per test session (about 15 s)."""
    import warnings

    from onnx.backend.test.case import node as node_cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return node_cases.collect_testcases()


def _onnx_node_tests() -> list:
    """One float32 ONNX backend node test per op type that IBP has a rule for (the first in name order)."""
    from graphcert.passes import ibp
    cases = _all_node_cases()
    chosen = {}
    for case in sorted((c for c in cases if c.model is not None), key=lambda c: c.name):
        graph = case.model.graph
        ops = {n.op_type for n in graph.node}
        if len(ops) != 1 or not graph.input or any(i.type.tensor_type.elem_type != FLOAT for i in graph.input):
            continue
        if any(o.type.tensor_type.elem_type not in NUMPY_TYPES for o in graph.output):
            continue
        op = ops.pop()
        if op in ibp.RULES and op not in chosen and "expanded" not in case.name:
            chosen[op] = case
    return [chosen[op] for op in sorted(chosen)]


def test_kernels_match_onnxruntime_on_the_onnx_node_tests():
    """Each model and its IBP bound graph (which emits comparisons, casts, cumulative sums, double-precision
    trigonometry...) run on the executor as on onnxruntime."""
    from onnx import numpy_helper
    failures = []
    cases = _onnx_node_tests()
    assert len(cases) > 60
    for case in cases:
        inputs = [numpy_helper.to_array(x) if not isinstance(x, np.ndarray | np.generic) else np.asarray(x)
                  for x in case.data_sets[0][0]]
        feeds = {i.name: x for i, x in zip(case.model.graph.input, inputs)}
        try:
            ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"])
        except ORT_ERRORS.NotImplemented:
            continue  # no onnxruntime kernel at the test's opset: nothing to compare with
        try:
            model = load(case.model)
            bound = IntervalPass(InputSet())(model).model
        except GraphcertError:
            continue  # refused (the suite's business, benchmarks/onnx_node_suite.py)
        eps = {v.name: np.full([1] * len(v.shape or []), 0.01, np.float32) for v in bound.graph.inputs
               if v.name.endswith("epsilon")}
        for graph, graph_feeds in ((model, feeds), (bound, {**feeds, **eps})):
            try:
                _assert_matches(graph, graph_feeds)
            except Exception as exc:  # collect all, report once
                failures.append(f"{case.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
                break
    assert failures == []


@pytest.mark.parametrize("target", ["FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"])
@pytest.mark.parametrize("saturate", [1, 0])
def test_casts_to_8_bit_floats_round_saturate_and_overflow_like_onnxruntime(target, saturate):
    """Round to nearest even, saturation, overflow to infinity or NaN. Without saturation, onnxruntime's answers
    just past the largest value (up to two ulps beyond it) are its own (448 for 480 in E4M3FN, NaN rather than
    infinity for E5M2's tie): that band is left out there."""
    tops = {"FLOAT8E4M3FN": (448.0, 32.0), "FLOAT8E4M3FNUZ": (240.0, 16.0), "FLOAT8E5M2": (57344.0, 8192.0),
            "FLOAT8E5M2FNUZ": (57344.0, 8192.0)}
    top, ulp = tops[target]
    edges = [top, top + ulp / 2, top + ulp / 2 + 1e-3 * ulp, top + ulp / 2 - 1e-3 * ulp, top + ulp, 1e30, np.inf]
    x = np.concatenate([np.linspace(-3.0, 3.0, 4001), np.linspace(-2 * top, 2 * top, 4001), edges,
                        [-e for e in edges], [0.0, 1e-6, 2.0 ** -10, 3 * 2.0 ** -12, np.nan]]).astype(np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["narrow"], to=getattr(TensorProto, target), saturate=saturate),
             helper.make_node("Cast", ["narrow"], ["y"], to=FLOAT)]
    model = helper.make_model(helper.make_graph(nodes, "cast", [helper.make_tensor_value_info("x", FLOAT, [x.size])],
                                                [helper.make_tensor_value_info("y", FLOAT, [x.size])]),
                              opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    expected = Session(model).run({"x": x})["y"]
    got = TorchGraph(ir.from_proto(model))({"x": x})["y"].detach().numpy()
    compared = np.ones(x.shape, bool) if saturate else ~((np.abs(x) > top) & (np.abs(x) < top + 2 * ulp))
    assert compared.sum() > 7000
    np.testing.assert_array_equal(got[compared], expected[compared])


@pytest.mark.parametrize("granularity", ["tensor", "axis", "blocked"])
@pytest.mark.parametrize("target", ["UINT8", "INT8", "FLOAT8E4M3FN"])
def test_quantize_dequantize_and_their_bound_graphs_match_onnxruntime(granularity, target):
    """x -> QuantizeLinear -> DequantizeLinear (what a QDQ model is made of), and its IBP bound graph."""
    rng = _rng(7)
    x = (rng.standard_normal([2, 4, 3]) * 3).astype(np.float32)
    params = {"tensor": [], "axis": [4], "blocked": [2, 2, 3]}[granularity]
    attrs = {"tensor": {}, "axis": {"axis": 1}, "blocked": {"axis": 1, "block_size": 2}}[granularity]
    scale = rng.uniform(0.02, 0.2, params).astype(np.float32)
    zero_type = getattr(TensorProto, target)
    zero = helper.make_tensor("zero", zero_type, params, np.zeros(int(np.prod(params, dtype=np.int64)), np.int64)
                              .tolist() if target != "FLOAT8E4M3FN" else [0.0] * int(np.prod(params, dtype=np.int64)))
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", FLOAT, list(x.shape))],
                              [numpy_helper.from_array(scale, "scale"), zero])
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    _assert_matches(model, {"x": x})
    bound = IntervalPass(InputSet())(model).model
    _assert_matches(bound, {"x": x, "epsilon": np.full([1, 1, 1], 0.05, np.float32)})


@pytest.mark.parametrize("op,attrs,opset", [("Swish", {"alpha": 1.702}, 24), ("Shrink", {"lambd": 1.0, "bias": 0.5}, 17)])
def test_swish_and_shrink_match_onnxruntime(op, attrs, opset):
    x = (_rng(3).standard_normal([3, 5]) * 4).astype(np.float32)
    proto, feeds = _single(op, {"x": x}, opset=opset, **attrs)
    _assert_matches(ir.from_proto(proto), feeds)


def test_instance_normalization_matches_onnxruntime():
    rng = _rng(4)
    x = (rng.standard_normal([2, 3, 4, 5]) * 3).astype(np.float32)
    proto, feeds = _single("InstanceNormalization", {"x": x}, {"scale": rng.standard_normal(3).astype(np.float32),
                                                              "bias": rng.standard_normal(3).astype(np.float32)},
                           epsilon=1e-3)
    _assert_matches(ir.from_proto(proto), feeds)


@pytest.mark.parametrize("attrs", [dict(mode="cubic"), dict(mode="cubic", cubic_coeff_a=-0.5, exclude_outside=1),
                                   dict(mode="cubic", antialias=1), dict(mode="linear", antialias=1)])
@pytest.mark.parametrize("scales", [[1.0, 1.0, 0.6, 0.8], [1.0, 1.0, 2.0, 1.5]])
def test_resize_with_weights_of_either_sign_matches_onnxruntime(attrs, scales):
    x = (_rng(5).standard_normal([2, 3, 5, 4]) * 3).astype(np.float32)
    proto, feeds = _single("Resize", {"x": x}, {"scales": np.float32(scales)}, order=["x", "", "scales"], opset=18,
                           **attrs)
    _assert_matches(ir.from_proto(proto), feeds)


@pytest.mark.parametrize("attrs,channels", [(dict(axis=1), 1), (dict(axis=1), 2), (dict(axis=2, inverse=1), 1),
                                            (dict(axis=2, inverse=1), 2), (dict(axis=1, onesided=1), 1)])
def test_dft_matches_onnxruntime(attrs, channels):
    x = _rng(6).standard_normal([2, 6, 3, channels]).astype(np.float32)
    proto, feeds = _single("DFT", {"x": x}, **attrs)
    _assert_matches(ir.from_proto(proto), feeds)


def test_reduce_prod_matches_onnxruntime():
    x = _rng(8).uniform(-2, 2, [2, 3, 4]).astype(np.float32)
    for attrs in (dict(axes=[1], keepdims=1), dict(axes=[0, 2], keepdims=0), dict(keepdims=1)):
        proto, feeds = _single("ReduceProd", {"x": x}, **attrs)
        _assert_matches(ir.from_proto(proto), feeds)


def test_det_matches_onnxruntime():
    x = _rng(9).standard_normal([2, 3, 3]).astype(np.float32)
    proto, feeds = _single("Det", {"x": x})
    _assert_matches(ir.from_proto(proto), feeds)


@pytest.mark.parametrize("size", [3, 5])  # (onnxruntime takes odd sizes only)
def test_lrn_matches_onnxruntime(size):
    x = (_rng(10).standard_normal([2, 5, 3, 3]) * 2).astype(np.float32)
    proto, feeds = _single("LRN", {"x": x}, size=size, alpha=0.3, beta=0.75, bias=1.5)
    _assert_matches(ir.from_proto(proto), feeds)


def test_bitcast_matches_onnxruntime():
    x = np.float32([[-2.5, -0.0, 0.0, 1e-30, 3.0, -1e30]])
    nodes = [helper.make_node("BitCast", ["x"], ["bits"], to=TensorProto.INT32),
             helper.make_node("Cast", ["bits"], ["y"], to=TensorProto.DOUBLE)]
    graph = helper.make_graph(nodes, "bitcast", [helper.make_tensor_value_info("x", FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, list(x.shape))])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26)], ir_version=11))
    expected = Session(to_proto(model)).run({"x": x})["y"]
    np.testing.assert_array_equal(TorchGraph(model)({"x": x})["y"].detach().numpy(), expected)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_elements_kernel_matches_onnx(reduction, axis):
    """The dynamo ViT writes its class token's batch extent with ScatterElements: the kernel equals onnx's
    reference on indices that are negative or not, for every reduction."""
    from onnx.reference import ReferenceEvaluator

    from graphcert.torch_exec.core import KERNELS, Setup
    extra = {} if reduction == "none" else {"reduction": reduction}
    node = helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], axis=axis, **extra)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("d", TensorProto.FLOAT, [3, 4]),
                                            helper.make_tensor_value_info("i", TensorProto.INT64, [3, 4]),
                                            helper.make_tensor_value_info("u", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    d, u = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(2))
    along = axis % 2
    index = np.stack([rng.permutation(d.shape[along]) for _ in range(d.shape[1 - along])], axis=1 - along)
    index = np.where(rng.uniform(size=index.shape) < 0.5, index - d.shape[along], index).astype(np.int64)
    wanted = ReferenceEvaluator(model).run(None, {"d": d, "i": index, "u": u})[0]
    run = KERNELS["ScatterElements"](ir.serde.deserialize_node(node), Setup(18, torch.float32))
    np.testing.assert_array_equal(run(torch.tensor(d), torch.tensor(index), torch.tensor(u)).numpy(), wanted)


def test_deform_conv_kernel_matches_every_onnx_node_test():
    """2-D DeformConv through the torch executor (bilinear samples at the offsets, zero outside, masks, groups,
    offset groups, strides, dilations, pads) gives each ONNX backend test's expected output."""
    from graphcert import api
    from graphcert.torch_exec import TorchGraph
    cases = [c for c in _all_node_cases() if c.model is not None and "deform_conv" in c.name]
    assert len(cases) >= 3
    for case in cases:
        inputs, expected = case.data_sets[0]
        graph = TorchGraph(api.load(case.model), trainable=False)
        names = [v.name for v in case.model.graph.input]
        out = graph({name: np.asarray(value) for name, value in zip(names, inputs)})
        got = next(iter(out.values())).detach().numpy()
        np.testing.assert_allclose(got, expected[0], rtol=1e-4, atol=1e-4, err_msg=case.name)


def test_a_bound_graph_runs_only_what_the_varying_inputs_reach():
    """`bind`: alpha-CROWN's graph with the box fixed and the slopes varying gives the outputs and slope
    gradients of the whole graph run every time, runs fewer steps, and asks for the varying inputs."""
    from graphcert.passes.crown import CrownPass
    from test_relu_split import SPEC, relu_network
    proto, _ = relu_network([4, 12, 12, 3], seed=2)
    spec = SpecPass(SPEC, None)(load(proto)).model
    tuned = CrownPass(InputSet("box"), alpha="inputs")(spec).model
    alphas = json.loads(tuned.metadata_props["graphcert.alpha"])
    graph = TorchGraph(tuned, trainable=False)
    rng = np.random.default_rng(0)
    center = rng.uniform(-1, 1, size=(3, 4)).astype(np.float32)
    box = {"x_lower": torch.tensor(center - 0.5), "x_upper": torch.tensor(center + 0.5),
           "alpha_start": torch.tensor(False)}
    shapes = {v.name: [d if isinstance(d, int) else 3 for d in v.shape] for v in tuned.graph.inputs if v.name in alphas}
    bound = graph.bind(box, set(alphas), ["margins_lower"])
    assert len(bound.steps) < len(graph._plan(("margins_lower",)).steps)
    for seed in range(3):
        values = {name: torch.tensor(np.random.default_rng(seed).uniform(0, 1, size=shape).astype(np.float32),
                                     requires_grad=True) for name, shape in shapes.items()}
        whole = graph({**box, **values}, outputs=["margins_lower"])["margins_lower"]
        part = bound(values)["margins_lower"]
        torch.testing.assert_close(part, whole)
        expected = torch.autograd.grad(whole.sum(), list(values.values()), allow_unused=True)
        found = torch.autograd.grad(part.sum(), list(values.values()), allow_unused=True)
        for a, b in zip(expected, found):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
    with pytest.raises(InputError, match="missing varying input"):
        bound({})
