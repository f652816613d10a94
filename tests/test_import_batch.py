"""The importer keeps the model's function: the batch is freed only where the trace proves it is the batch axis,
the loaded model is checked against onnxruntime on the original, and what cannot be freed stays fixed."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphcert import api
from graphcert import model as model_lib
from graphcert.errors import ModelLoadError
from graphcert.runtime import Session


def _run(proto: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _range_model() -> onnx.ModelProto:
    """x [1, 4] plus a range of run-time length reshaped to [1, -1]: that 1 is not a batch axis."""
    nodes = [
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Reshape", ["r", "row"], ["rr"]),
        helper.make_node("Cast", ["rr"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "rf"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "range_reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])],
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("one", TensorProto.INT64, [], [1]),
         helper.make_tensor("row", TensorProto.INT64, [2], [1, -1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_reshape_of_a_non_batch_tensor_keeps_its_leading_one():
    proto = _range_model()
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(1, 4), "n": np.array(4, dtype=np.int64)}
    loaded = model_lib.load(proto)
    (want,), (got,) = _run(proto, feeds), _run(ir.to_proto(loaded), feeds)
    assert got.shape == want.shape == (1, 4)
    np.testing.assert_array_equal(got, want)


def _flexattention_expanded() -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """ONNX's node test test_flexattention_relative_positional_expanded (opset 26), built from onnx's own case
    (defining the case class registers its test cases)."""
    cases = pytest.importorskip("onnx.backend.test.case.node")
    np.random.seed(0)
    pytest.importorskip("onnx.backend.test.case.node.flexattention")
    made = [c for c in cases._NodeTestCases if c.name.startswith("test_flexattention_relative_positional_expanded")]
    if not made:
        pytest.skip("this onnx has no expanded flexattention_relative_positional case")
    return made[0].model, list(made[0].data_sets[0][0])


def test_flexattention_expanded_loads_as_the_same_function_and_ibp_contains_it():
    proto, inputs = _flexattention_expanded()
    names = [i.name for i in proto.graph.input]
    feeds = dict(zip(names, inputs))
    want = _run(proto, feeds)[0]
    loaded = model_lib.load(proto)
    np.testing.assert_allclose(_run(ir.to_proto(loaded), feeds)[0], want, rtol=1e-5, atol=1e-5)
    bound = Session(api.to_proto(api.bound_graph(loaded, "ibp")))
    out = bound.run({**feeds, **{f"{n}_epsilon": np.float32(1e-3) for n in names}})
    assert np.all(out["Y_lower"] <= want + 1e-5) and np.all(want - 1e-5 <= out["Y_upper"])


def _unfreeable_model() -> onnx.ModelProto:
    """x [1, 4] flattened to [4] (rank 1): the batch cannot be freed without changing the function."""
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["h"]),
             helper.make_node("Reshape", ["h", "row"], ["y"])]
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        nodes, "unfreeable", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor("flat", TensorProto.INT64, [1], [4]), onnx.numpy_helper.from_array(w, "w"),
         helper.make_tensor("row", TensorProto.INT64, [2], [1, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_batch_that_cannot_be_freed_stays_fixed_and_certify_runs_sample_by_sample():
    from graphcert.certify import certify
    from graphcert.data import Dataset
    loaded = model_lib.load(_unfreeable_model())
    assert "batch 2" in model_lib.batch_note(loaded)
    assert model_lib.static_shape(loaded.graph.inputs[0]) == [1, 4]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    y = (x @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10)).argmax(axis=1)
    result = certify(loaded, Dataset("random", x, y, None), eps=1e-4, method="ibp", batch_size=4, rounding="real")
    assert result.n == 5 and result.clean == 5


def test_a_normalisation_that_changes_the_function_is_refused(monkeypatch):
    real = model_lib._normalised

    def broken(proto, opset, free_batch):
        model, freed = real(proto, opset, free_batch)
        weight = model.graph.initializers["w"]
        weight.const_value = ir.tensor(weight.const_value.numpy() + 1)
        return model, freed

    monkeypatch.setattr(model_lib, "_normalised", broken)
    with pytest.raises(ModelLoadError, match="disagrees with the original"):
        model_lib.load(_unfreeable_model())


def test_a_model_that_draws_random_numbers_loads():
    """A Dropout in training mode draws a new mask per run: the load check has nothing to compare and must
    not refuse the model (whether a method bounds it is the passes' business)."""
    nodes = [helper.make_node("Dropout", ["x", "ratio", "training"], ["y"])]
    graph = helper.make_graph(nodes, "noisy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.5]),
                               helper.make_tensor("training", TensorProto.BOOL, [], [True])])
    loaded = model_lib.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in loaded.graph] == ["Dropout"]
