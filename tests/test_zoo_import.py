"""The importer on every zoo model and shared benchmark network: the normalised model computes what the
original computes, at batch 1 and batch 5, with the original input and output names."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import zoo
from conftest import benchmark_networks
from graphcert.errors import ModelLoadError
from graphcert.export import to_proto
from graphcert.model import TARGET_OPSET, load, model_inputs
from graphcert.runtime import Session


def original_outputs(proto: onnx.ModelProto, x: np.ndarray, batched: bool) -> dict[str, np.ndarray]:
    """Run the original model one sample at a time (its batch dimension may be fixed to 1)."""
    session, name = Session(proto), zoo.input_name(proto)
    if not batched:
        return session.run({name: x})
    runs = [session.run({name: x[i:i + 1]}) for i in range(len(x))]
    return {key: np.concatenate([run[key] for run in runs]) for key in runs[0]}


def assert_same_function(proto: onnx.ModelProto, domain, batched: bool) -> onnx.ModelProto:
    normalised = to_proto(load(proto))
    assert [v.name for v in normalised.graph.input] == [zoo.input_name(proto)]
    assert [v.name for v in normalised.graph.output] == [v.name for v in proto.graph.output]
    session = Session(normalised)
    lo, hi = domain
    for batch in (1, 5) if batched else (1,):
        shape = zoo.input_shape(proto)
        if batched:
            shape[0] = batch
        x = np.random.default_rng(batch).uniform(lo, hi, shape).astype(np.float32)
        want = original_outputs(proto, x, batched)
        got = session.run({zoo.input_name(proto): x})
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=f"output {name}, batch {batch}")
    return normalised


@pytest.mark.parametrize("name", sorted(zoo.ZOO) + sorted(zoo.ATTENTION_ZOO))
def test_zoo_model_normalises_to_the_same_function(name):
    model = {**zoo.ZOO, **zoo.ATTENTION_ZOO}[name]
    normalised = assert_same_function(model(), model.domain, model.batched)
    assert {o.domain: o.version for o in normalised.opset_import}[""] == TARGET_OPSET
    batch_dim = normalised.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.HasField("dim_param") == model.batched


def test_zoo_models_build_deterministically():
    first = zoo.ZOO["torch_cnn"].build.__wrapped__()
    again = zoo.ZOO["torch_cnn"].build.__wrapped__()
    assert [i.raw_data for i in first.graph.initializer] == [i.raw_data for i in again.graph.initializer]


def test_tf2onnx_batch_symbol_is_kept_free():
    dims = load(zoo.ZOO["tf2onnx_nhwc"]()).graph.inputs[0].shape
    assert not isinstance(dims[0], int) and list(dims)[1:] == [8, 8, 1]


def test_initializers_listed_as_inputs_are_constants():
    model = load(zoo.ZOO["matlab_like"]())
    assert [v.name for v in model_inputs(model)] == ["input"]


def test_reshape_with_baked_batch_runs_batched():
    proto = to_proto(load(zoo.ZOO["reshape_baked_batch"]()))
    out = Session(proto).run({"x": np.ones((3, 2, 3, 3), np.float32)})
    assert out["y"].shape == (3, 4)


@pytest.mark.parametrize("opset", [11, 12])
def test_softmax_before_opset_13_keeps_its_flattening_semantics(opset):
    """Until opset 13 Softmax normalised over all dimensions from `axis` on, not along `axis` alone."""
    info = lambda name: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, 3, 4])  # noqa: E731
    graph = onnx.helper.make_graph([onnx.helper.make_node("Softmax", ["x"], ["y"], axis=1)], "old_softmax",
                                   [info("x")], [info("y")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 6
    assert_same_function(model, (-3.0, 3.0), batched=True)


def test_unreadable_files_raise_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff")
    with pytest.raises(ModelLoadError):
        load(garbage)


@pytest.mark.parametrize("path", benchmark_networks("mnistfc") + benchmark_networks("acasxu")
                         + benchmark_networks("test"))
def test_benchmark_network_normalises_to_the_same_function(path):
    proto = onnx.load(path)
    batched = len(zoo.input_shape(proto)) >= 2
    assert_same_function(proto, (0.0, 1.0), batched)
