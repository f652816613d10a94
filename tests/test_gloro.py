"""GloRo training graphs: power-iteration constants that training can lower, refused for certification,
and Lipschitz-margin training whose result the sound `lipschitz` pass certifies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import graphcert
from graphcert import api
from graphcert.builder import Builder
from graphcert.certify import certify
from graphcert.data import load_dataset
from graphcert.errors import InputError, UnsupportedOpError
from graphcert.export import to_proto
from graphcert.passes.gloro import largest_singular_value
from graphcert.runtime import Session
from graphcert.training.loop import TrainConfig, train

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_power_iteration_approaches_the_largest_singular_value_from_below():
    rng = np.random.default_rng(0)
    for shape in [(10, 784), (100, 100), (3, 7), (256, 32)]:
        matrix = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3)
        graph = ir.Graph([ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(shape)))],
                         [], nodes=[], opset_imports={"": 17}, name="sigma")
        b = Builder(graph)
        sigma = b.op("Identity", largest_singular_value(b, graph.inputs[0], shape[1]))
        sigma.name, sigma.type, sigma.shape = "sigma", ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
        graph.outputs.append(sigma)
        estimate = float(Session(to_proto(ir.Model(graph, ir_version=10))).run({"w": matrix})["sigma"])
        exact = float(np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[0])
        assert estimate <= exact * (1 + 1e-5) and estimate >= 0.97 * exact


def test_gloro_graphs_are_for_training_only():
    model = graphcert.load(str(MODELS / "mnist_mlp.onnx"))
    with pytest.raises(InputError, match="training"):
        api.bound_graph(model, "gloro", spec="runtime", norm="l2")
    with pytest.raises(InputError, match="training"):
        certify(model, load_dataset("mnist-test").head(5), 0.1, method="gloro", norm="l2")
    with pytest.raises(UnsupportedOpError, match="Conv"):
        api.bound_graph(graphcert.load(str(MODELS / "mnist_cnn.onnx")), "gloro", spec="runtime", norm="l2", trainable=True)


def test_gloro_training_raises_the_sound_lipschitz_certificate(tmp_path):
    common = dict(arch="mlp", data="digits", epochs=6, batch_size=128, lr=3e-3, holdout=0.25)
    plain = train(TrainConfig(output=str(tmp_path / "ibp.onnx"), method="ibp", eps=0.0, **common))   # no robustness
    gloro = train(TrainConfig(output=str(tmp_path / "gloro.onnx"), method="gloro", eps=0.3, **common))
    assert "--method lipschitz --norm l2" in gloro.reproduce
    held = load_dataset(str(tmp_path / "gloro.onnx.holdout.npz"))
    certified = {name: certify(graphcert.load(str(tmp_path / f"{name}.onnx")), held, 0.3, method="lipschitz",
                               norm="l2").certified_accuracy for name in ("ibp", "gloro")}
    assert gloro.holdout.certified_accuracy == pytest.approx(certified["gloro"])
    assert certified["gloro"] > certified["ibp"] + 0.2 and gloro.holdout.clean_accuracy > 0.6
    assert plain.holdout.clean_accuracy > 0.5


def test_shipped_gloro_model_is_certified_at_l2_radius_0_3():
    found = certify(graphcert.load(str(MODELS / "mnist_mlp_gloro.onnx")), load_dataset("mnist-test").head(300), 0.3,
                    method="lipschitz", norm="l2")
    assert found.clean_accuracy > 0.85 and found.certified_accuracy > 0.65
