"""The onnxruntime wrapper: feeds take each input's declared element type and rank."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from graphcert.runtime import Session


def test_integer_inputs_stay_integers_and_short_feeds_gain_leading_axes():
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["picked"], axis=1),
         helper.make_node("Mul", ["picked", "scale"], ["y"])],
        "gather", [helper.make_tensor_value_info("table", TensorProto.FLOAT, [2, 3]),
                   helper.make_tensor_value_info("index", TensorProto.INT64, [2]),
                   helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    session = Session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    table = np.arange(6, dtype=np.float64).reshape(2, 3)
    out = session.run({"table": table, "index": [2, 0], "scale": 0.5})["y"]
    np.testing.assert_allclose(out, [[1.0, 0.0], [2.5, 1.5]])


def test_a_session_is_optimised_once_its_runs_pay_for_it(monkeypatch):
    """Sessions start without onnxruntime's graph optimisations and are made again with them once their runs
    have taken REOPTIMISE_AFTER times the first making: the same answers before and after."""
    import onnxruntime as ort

    from graphcert import runtime
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12)),
         helper.make_tensor("b", TensorProto.FLOAT, [3], [0.1, -0.2, 0.3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    made = []
    real = ort.InferenceSession

    def recording(serialized, options, **kwargs):
        made.append(options.graph_optimization_level)
        return real(serialized, options, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", recording)
    monkeypatch.setattr(runtime, "REOPTIMISE_MIN_SECONDS", 0.0)
    monkeypatch.setattr(runtime, "REOPTIMISE_AFTER", 0.0)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    session = Session(model)
    first = session.run({"x": x})["y"]
    second = session.run({"x": x})["y"]
    assert made == [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]
    np.testing.assert_allclose(first, second, rtol=1e-6)
    assert session.run({"x": x})["y"].shape == (5, 3) and len(made) == 2   # made again once only
    made.clear()
    Session(model, optimise=True).run({"x": x})
    Session(model, optimise=False).run({"x": x})
    assert made == [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL]
