"""The models users actually have: torch.onnx.export's defaults (dynamo: batch fixed at 1, external data;
TorchScript: fixed or dynamic batch) load, convert with every method and certify at any batch size, without
re-exporting; `inspect` says truthfully which methods bound a model and `auto` says which methods ran."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import arch_zoo
from graphcert import api
from graphcert import model as model_lib
from graphcert.inspect import describe
from graphcert.runtime import Session

EXPORTS = {"dynamo": dict(exporter="dynamo"), "torchscript": dict(exporter="torchscript"),
           "torchscript-dynamic": dict(exporter="torchscript", dynamic=True)}
CLI = [sys.executable, "cli.py"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    return {kind: arch_zoo.export("residual_cnn", str(folder), **how) for kind, how in EXPORTS.items()}


@pytest.mark.parametrize("kind", EXPORTS)
def test_default_exports_run_at_any_batch_with_every_method(exported, kind):
    path = exported[kind]
    loaded = model_lib.load(path)
    assert model_lib.batch_note(loaded) is None
    assert model_lib.static_shape(loaded.graph.inputs[0])[0] == "batch"
    original = onnx.load(path)
    x = arch_zoo.sample_input((1, 16, 16), n=3)
    reference = Session(original)
    singles = np.concatenate([reference.run({reference.input_names[0]: x[i:i + 1]})[reference.output_names[0]]
                              for i in range(3)])
    name = loaded.graph.inputs[0].name
    for method in ("ibp", "crown-ibp", "crown"):
        bound = Session(api.to_proto(api.bound_graph(loaded, method)))
        out = bound.run({name: x, "epsilon": np.float32(0.01)})
        output = loaded.graph.outputs[0].name
        np.testing.assert_allclose(out[output], singles, rtol=1e-4, atol=1e-5)
        assert np.all(out[f"{output}_lower"] <= singles + 1e-5) and np.all(singles - 1e-5 <= out[f"{output}_upper"])


def test_convert_writes_a_graph_that_runs_at_the_batch_it_declares(exported, tmp_path):
    out = tmp_path / "bound.onnx"
    api.convert(exported["dynamo"], out, method="crown")
    session = Session(onnx.load(out))
    x = arch_zoo.sample_input((1, 16, 16), n=4)
    result = session.run({session.input_names[0]: x, "epsilon": np.float32(0.01)})
    assert all(v.shape[0] == 4 for v in result.values())


def test_auto_says_which_methods_ran_and_which_it_skipped(exported, tmp_path):
    loaded = model_lib.load(exported["dynamo"])
    session = Session(api.to_proto(loaded))
    x = arch_zoo.sample_input((1, 16, 16), n=16)
    y = session.run({session.input_names[0]: x})[session.output_names[0]].argmax(axis=1)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    done = subprocess.run(CLI + ["certify", exported["dynamo"], "--data", str(data), "--method", "auto", "--eps",
                                 "0.02", "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    stages = json.loads(done.stdout)["stages"]
    assert list(stages) == ["ibp", "crown-ibp", "crown", "alpha-crown"]
    assert stages["ibp"]["status"] == "ran" and stages["ibp"]["samples"] == 16
    ran = [s for s in stages.values() if s["status"] == "ran"]
    assert sum(s["certified"] for s in ran) == json.loads(done.stdout)["certified"]
    text = subprocess.run(CLI + ["certify", exported["dynamo"], "--data", str(data), "--method", "auto", "--eps",
                                 "0.02"], capture_output=True, text=True, timeout=600).stdout
    assert "ibp          ran on 16 samples" in text


def _unknown_op_model() -> onnx.ModelProto:
    """Relu then an op of a private domain that no method has a rule for."""
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Mystery", ["h"], ["y"], domain="org.example")]
    graph = helper.make_graph(nodes, "mystery", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("org.example", 1)])


def test_inspect_reports_what_building_each_method_says(tmp_path, exported):
    path = tmp_path / "mystery.onnx"
    onnx.save(_unknown_op_model(), path)
    info = describe(path)
    for method in ("ibp", "crown", "crown-ibp", "alpha-crown", "auto"):
        assert info["methods"][method], method
        assert "Mystery" in info["reasons"][method]
    info = describe(exported["dynamo"])
    assert info["batch"] == "any"
    for method in ("ibp", "crown", "crown-ibp", "alpha-crown", "auto"):
        assert info["methods"][method] == [], (method, info["reasons"].get(method))


def test_alpha_crown_certifies_the_default_export(exported, tmp_path):
    from graphcert.certify import certify
    from graphcert.data import Dataset
    loaded = model_lib.load(exported["dynamo"])
    session = Session(api.to_proto(loaded))
    x = arch_zoo.sample_input((1, 16, 16), n=8, seed=4)
    y = session.run({session.input_names[0]: x})[session.output_names[0]].argmax(axis=1)
    crown = certify(exported["dynamo"], Dataset("zoo", x, y, None), eps=0.02, method="crown")
    alpha = certify(exported["dynamo"], Dataset("zoo", x, y, None), eps=0.02, method="alpha-crown")
    assert alpha.clean == crown.clean == 8 and alpha.certified >= crown.certified
