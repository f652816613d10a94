"""float16, bfloat16 and float64 models convert: bounds are computed in float32 and the graph's epsilon and
bounds have the model's type (narrower types rounded outward); certify runs on them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphcert import api
from graphcert import model as model_lib
from graphcert.certify import certify
from graphcert.data import Dataset

TYPES = {"float16": (TensorProto.FLOAT16, np.float16), "bfloat16": (TensorProto.BFLOAT16, None),
         "float64": (TensorProto.DOUBLE, np.float64)}


def _mlp(dtype: str) -> onnx.ModelProto:
    code, _ = TYPES[dtype]
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((6, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)

    def tensor(array, name):
        if dtype == "bfloat16":
            return helper.make_tensor(name, code, array.shape, array.flatten().tolist())
        return numpy_helper.from_array(array.astype(TYPES[dtype][1]), name)

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, f"mlp_{dtype}", [helper.make_tensor_value_info("x", code, [1, 6])],
                              [helper.make_tensor_value_info("y", code, [1, 3])],
                              [tensor(w1, "w1"), tensor(b1, "b1"), tensor(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _float32_reference(proto, x):
    """The model's function on its own weights, evaluated in float64 (what the bounds are of)."""
    from onnx.reference import ReferenceEvaluator
    from graphcert.dtypes import to_float32
    wide = to_float32(proto)
    for init in wide.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for value in list(wide.graph.input) + list(wide.graph.output):
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return ReferenceEvaluator(wide).run(None, {"x": x.astype(np.float64)})[0]


@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_model_converts_with_its_own_types_and_bounds_hold(tmp_path, dtype, method):
    source = tmp_path / f"{dtype}.onnx"
    onnx.save(_mlp(dtype), source)
    out = tmp_path / "bound.onnx"
    proto = api.convert(source, out, method=method)  # the full onnx checker runs inside
    code = TYPES[dtype][0]
    types = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    assert types["x"] == types["epsilon"] == types["y"] == types["y_lower"] == types["y_upper"] == code
    if dtype == "bfloat16":
        return  # onnxruntime has no CPU kernels for these bfloat16 inputs; the checker passed
    import onnxruntime as ort
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    np_type = TYPES[dtype][1]
    x = rng.uniform(-1, 1, (8, 6)).astype(np_type)
    eps = np.full((1, 1), 0.05, dtype=np_type)
    y, lower, upper = session.run(["y", "y_lower", "y_upper"], {"x": x, "epsilon": eps})
    assert lower.dtype == np_type
    for _ in range(20):
        point = (x.astype(np.float64) + rng.uniform(-1, 1, x.shape) * float(eps[0, 0])).astype(np_type)
        truth = _float32_reference(_mlp(dtype), point.astype(np.float64))
        assert np.all(lower.astype(np.float64) <= truth) and np.all(truth <= upper.astype(np.float64))


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_certify_runs_on_other_float_types(dtype):
    loaded = model_lib.load(_mlp(dtype))
    assert loaded.metadata_props["graphcert.dtype"] == dtype
    x = np.random.default_rng(2).uniform(-1, 1, (16, 6)).astype(np.float32)
    y = _float32_reference(_mlp(dtype), x).argmax(axis=1)
    data = Dataset("random", x, y, None)
    # float16 models are certified for float16 arithmetic (graphcert.arithmetic), float64 ones as loaded
    result = certify(loaded, data, eps=0.001, method="crown")
    assert result.clean == 16 and result.certified > 0
    assert certify(loaded, data, eps=0.001, method="crown", rounding="real").certified >= result.certified


def test_inputs_and_outputs_of_mixed_types_each_keep_their_own(tmp_path):
    """A float64 input next to a float32 one (and a float16 output): each keeps its type at the bound graph's
    interface, so the graph runs on the data the model runs on, and its bounds hold the model's output."""
    import onnxruntime as ort
    nodes = [helper.make_node("CastLike", ["x", "like"], ["c"]), helper.make_node("Mul", ["c", "like"], ["y"]),
             helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT16)]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3]),
                                               helper.make_tensor_value_info("like", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT16, [2, 3])])
    source, out = tmp_path / "mixed.onnx", tmp_path / "bound.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), source)
    proto = api.convert(source, out, method="ibp")
    types = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    assert types["x"] == types["epsilon"] == TensorProto.DOUBLE
    assert types["like"] == types["y"] == types["y_lower"] == TensorProto.FLOAT
    assert types["z"] == types["z_upper"] == TensorProto.FLOAT16
    rng = np.random.default_rng(3)
    x, like = rng.uniform(-100, 100, (2, 3)), rng.uniform(-3, 3, (2, 3)).astype(np.float32)
    eps = np.full((1, 1), 0.5)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y_lower, y_upper, z_lower, z_upper = session.run(["y_lower", "y_upper", "z_lower", "z_upper"],
                                                     {"x": x, "like": like, "epsilon": eps})
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    for _ in range(20):
        point = x + rng.uniform(-0.5, 0.5, x.shape)
        y, z = original.run(None, {"x": point, "like": like})
        assert np.all(y_lower <= y) and np.all(y <= y_upper)
        assert np.all(z_lower <= z) and np.all(z <= z_upper)


def test_float64_and_float16_outputs_of_a_float32_model_are_bounded_in_float32():
    """x (float32) cast to a double output and a float16 output: the bound graph's float32 bounds (double
    moved outward before its cast) hold the outputs at eps = 0 and at sampled points of eps = 0.5."""
    import onnxruntime as ort
    from graphcert.export import to_proto
    nodes = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["x"], ["z"], to=TensorProto.FLOAT16)]
    graph = helper.make_graph(nodes, "casts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [4, 5]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT16, [4, 5])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    bound = to_proto(api.bound_graph(api.load(proto), "ibp", native_types=True))
    session = ort.InferenceSession(bound.SerializeToString(), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    x = (rng.uniform(-1, 1, (4, 5)) * 10.0 ** rng.integers(-6, 4, (4, 5))).astype(np.float32)
    for eps in (0.0, 0.5):
        bounds = session.run(["y_lower", "y_upper", "z_lower", "z_upper"],
                             {"x": x, "epsilon": np.full((1, 1), eps, np.float32)})
        for _ in range(1 if eps == 0 else 20):
            point = (x + rng.uniform(-eps, eps, x.shape)).astype(np.float32)
            for value, lower, upper in zip(original.run(None, {"x": point}), bounds[0::2], bounds[1::2]):
                value = value.astype(np.float64)
                assert np.all(lower.astype(np.float64) <= value) and np.all(value <= upper.astype(np.float64))
