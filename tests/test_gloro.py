"""GloRo training graphs: power-iteration constants that training can lower (dense and convolutional layers),
refused for certification, and Lipschitz-margin training whose result the sound `lipschitz` pass certifies."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import graphcert
from cli import main
from graphcert import api
from graphcert.architectures import build, export
from graphcert.builder import Builder
from graphcert.certify import certify, margin_objective
from graphcert.data import load_dataset
from graphcert.errors import InputError, UnsupportedOpError
from graphcert.export import to_proto
from graphcert.model import load
from graphcert.passes import lipschitz
from graphcert.passes.gloro import conv_operator_norm, largest_singular_value
from graphcert.passes.lipschitz import ConvGeometry
from graphcert.runtime import Session
from graphcert.training.backends import make_backend
from graphcert.training.loop import TrainConfig, train
from graphcert.training.losses import training_graph
from graphcert.training.writeback import trainable_names
from test_lipschitz import l2_attack

FLOAT = ir.TensorType(ir.DataType.FLOAT)

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


def _impulse_matrix(weight: np.ndarray, spatial: list[int], strides, pads, dilations, group) -> np.ndarray:
    """The convolution as a dense matrix [out, in], column by column from unit impulses, in float64."""
    channels = weight.shape[1] * group
    n_in = channels * int(np.prod(spatial))
    impulses = torch.eye(n_in, dtype=torch.float64).reshape(n_in, channels, *spatial)
    padded = torch.nn.functional.pad(impulses, [pads[1], pads[3], pads[0], pads[2]])
    images = torch.nn.functional.conv2d(padded, torch.from_numpy(weight.astype(np.float64)), stride=strides,
                                        dilation=dilations, groups=group)
    return images.reshape(n_in, -1).T.numpy()


def _conv_norm_estimate(weight: np.ndarray, spatial: list[int], **window) -> tuple[float, float]:
    """The gloro estimate and the sound `lipschitz` constant of a Conv node on inputs [batch, C, *spatial]."""
    x = ir.Value(name="x", type=FLOAT, shape=ir.Shape(["batch", weight.shape[1] * window["group"], *spatial]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name="conv_norm")
    b = Builder(graph)
    w = b.const(weight)
    node = ir.Node("", "Conv", [x, w], attributes=[ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, v)
                                                   for k, v in window.items()], graph=graph)
    geometry = ConvGeometry(node, spatial, list(weight.shape[2:]))
    [sound] = lipschitz.RULES["Conv"](lipschitz.Geometry(True), node, 1.0, None)
    norm = b.op("Identity", conv_operator_norm(b, w, geometry, window["group"]))
    norm.name, norm.type, norm.shape = "norm", FLOAT, ir.Shape([])
    graph.outputs.append(norm)
    sample = np.zeros((1, *x.shape[1:]), dtype=np.float32)
    return float(Session(to_proto(ir.Model(graph, ir_version=10))).run({"x": sample})["norm"]), sound


def test_conv_power_iteration_finds_the_operator_norm_from_below():
    rng = np.random.default_rng(1)
    for _ in range(16):
        group = int(rng.choice([1, 2]))
        kernel, dilation = int(rng.integers(1, 5)), int(rng.integers(1, 3))
        spatial = [int(rng.integers(kernel * dilation, 10)), int(rng.integers(kernel * dilation, 10))]
        window = dict(strides=[int(rng.integers(1, 4)), int(rng.integers(1, 3))],
                      pads=[int(p) for p in rng.integers(0, 3, size=4)], dilations=[dilation, 1], group=group)
        weight = rng.standard_normal((group * int(rng.integers(1, 4)), int(rng.integers(1, 4)), kernel, kernel))
        weight = (weight * rng.uniform(0.05, 3)).astype(np.float32)
        estimate, sound = _conv_norm_estimate(weight, spatial, **window)
        exact = np.linalg.svd(_impulse_matrix(weight, spatial, **window), compute_uv=False)[0]
        assert abs(estimate - exact) <= 1e-3 * exact, (window, spatial, weight.shape)
        assert estimate <= sound


def test_gloro_graphs_are_for_training_only():
    model = graphcert.load(str(MODELS / "mnist_mlp.onnx"))
    with pytest.raises(InputError, match="training"):
        api.bound_graph(model, "gloro", spec="runtime", norm="l2")
    with pytest.raises(InputError, match="training"):
        certify(model, load_dataset("mnist-test").head(5), 0.1, method="gloro", norm="l2")
    pooled = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                 torch.nn.Linear(36, 10))
    with pytest.raises(UnsupportedOpError, match="MaxPool"):
        api.bound_graph(load(export(pooled.eval(), (1, 8, 8))), "gloro", spec="runtime", norm="l2", trainable=True)


def test_cnn_training_graph_runs_in_torch_like_onnxruntime_and_training_lowers_the_loss():
    digits = load_dataset("digits")
    model = load(build("cnn", digits.x.shape[1:], 10))
    graph = training_graph(model, "gloro", digits.domain)
    x, y = digits.x[:64], digits.y[:64]
    feeds = {"image": x, "objective": margin_objective(y, 10), "epsilon": np.full((1, 1, 1, 1), 0.1, np.float32),
             "kappa": np.float32(0.0), "sample_weights": np.full(64, 1 / 64, np.float32)}
    reference = Session(to_proto(graph)).run(feeds)
    backend = make_backend("torch", graph, trainable_names(build("cnn", digits.x.shape[1:], 10), model), 1e-2, 10.0)
    first = backend.evaluate(feeds)
    np.testing.assert_allclose(first.margins_lower, reference["margins_lower"], rtol=1e-4, atol=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as training does: small graphs on a shared machine
    try:
        for _ in range(15):
            backend.train_step(feeds)
    finally:
        torch.set_num_threads(threads)
    assert backend.evaluate(feeds).loss < 0.5 * first.loss


def test_cnn_trained_with_gloro_is_certified_by_lipschitz_against_an_l2_attack(tmp_path, capsys):
    output = str(tmp_path / "cnn.onnx")
    assert main(["train", "--arch", "cnn", "--method", "gloro", "--data", "digits", "--eps", "0.3", "--epochs", "1",
                 "--batch-size", "32", "--lr", "3e-3", "-o", output, "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["certify", output, "--data", output + ".holdout.npz", "--eps", "0.3", "--method", "lipschitz",
                 "--norm", "l2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["certified"] == trained["holdout"]["certified"]
    assert main(["certify", output, "--data", output + ".holdout.npz", "--eps", "0.3", "--method", "lipschitz",
                 "--norm", "l2", "--json", "--rounding", "real"]) == 0
    real = json.loads(capsys.readouterr().out)
    assert real["certified"] >= 20 and real["certified"] >= found["certified"]
    held = load_dataset(output + ".holdout.npz")
    model = graphcert.load(output)
    objective = margin_objective(held.y, 10)
    out = Session(to_proto(api.bound_graph(model, "lipschitz", spec="runtime", norm="l2"))).run(
        {"image": held.x, "epsilon": np.float32(0.3), "objective": objective})
    certified = (out["margins_lower"] > 0).all(axis=1) & (out["margins"] > 0).all(axis=1)
    assert certified.sum() == real["certified"]   # the graph alone: real-arithmetic certificates
    assert (l2_attack(model, held.x[certified], objective[certified], 0.3) > 0).all()


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


@pytest.mark.parametrize("name, clean, certified", [("mnist_mlp_gloro", 0.85, 0.65), ("mnist_cnn_gloro", 0.9, 0.75)])
def test_shipped_gloro_models_are_certified_at_l2_radius_0_3(name, clean, certified):
    found = certify(graphcert.load(str(MODELS / f"{name}.onnx")), load_dataset("mnist-test").head(300), 0.3,
                    method="lipschitz", norm="l2")
    assert found.clean_accuracy > clean and found.certified_accuracy > certified
