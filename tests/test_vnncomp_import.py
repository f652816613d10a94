"""Every network of the shared VNN-COMP 2021 families loads, keeps its function (the importer's own check
against onnxruntime), runs at any batch, and converts with CROWN. Graphs only are built for the conv nets;
the fully connected ones also run their CROWN graph at ε = 0 against the model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import benchmark_networks
from graphcert import api
from graphcert import model as model_lib
from graphcert.runtime import Session

FAMILIES = {"acasxu": 9, "mnistfc": 1, "eran": 1, "verivital": 1, "test": 1, "cifar10_resnet": 1,
            "marabou-cifar10": 1, "oval21": 1}


def _networks():
    params = []
    for family, every in FAMILIES.items():
        found = benchmark_networks(family, every)
        if found and found[0].values[0] is None:  # the family keeps its nets one folder down
            from conftest import VNNCOMP
            paths = sorted((VNNCOMP / family).rglob("*.onnx"))[::every]
            found = [pytest.param(p, id=p.stem) for p in paths] or found
        params += found
    return params


@pytest.mark.parametrize("path", _networks())
def test_network_loads_and_converts_with_crown(path):
    loaded = model_lib.load(path)
    assert model_lib.batch_note(loaded) is None, model_lib.batch_note(loaded)
    bound = api.to_proto(api.bound_graph(loaded, "crown"))
    if any(node.op_type == "Conv" for node in loaded.graph):
        return  # a CROWN graph of a conv net holds large coefficient tensors: built, not run, here
    x = loaded.graph.inputs[0]
    shape = [2 if not isinstance(d, int) else d for d in model_lib.static_shape(x)]
    shape = [2] + shape[1:] if len(shape) >= 2 else shape
    feed = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    out = Session(bound).run({x.name: feed, "epsilon": np.float32(0.0)})
    original = Session(onnx.load(path))
    name = loaded.graph.outputs[0].name
    want = np.concatenate([original.run({original.input_names[0]: feed[i:i + 1].reshape(
        [1 if isinstance(d, str) else d for d in _declared(original)])})[original.output_names[0]].reshape(1, -1)
        for i in range(len(feed))])
    got = out[name].reshape(len(feed), -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    scale = 1e-4 * (1 + np.abs(want))
    assert np.all(out[f"{name}_lower"].reshape(got.shape) <= want + scale)
    assert np.all(want - scale <= out[f"{name}_upper"].reshape(got.shape))


def _declared(session: Session):
    return session.session.get_inputs()[0].shape
