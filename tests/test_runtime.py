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
