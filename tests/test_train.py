"""Certified training: schedules, the robust loss going down, write-back, resume, both backends, the CLI.

Tests marked `ort_training` need onnxruntime-training, which replaces onnxruntime and so lives in its own
virtual environment (.ci/run builds it); elsewhere they skip.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import cli_in_process
from graphcert import model as model_lib
from graphcert.architectures import build
from graphcert.certify import GraphCertifier, margin_objective
from graphcert.data import load_dataset
from graphcert.training import TrainConfig, train
from graphcert.training.backends import make_backend
from graphcert.training.checkpoint import load_checkpoint
from graphcert.training.initialisation import affine_weights, ibp_initialise
from graphcert.training.losses import training_graph
from graphcert.training.schedule import Schedule, default_phases, smooth_ramp
from graphcert.training.writeback import trainable_names, write_back

REPO = Path(__file__).resolve().parents[1]


def _ort_training_available() -> bool:
    try:
        return importlib.util.find_spec("onnxruntime.training") is not None
    except ImportError:
        return False


HAS_ORT_TRAINING = _ort_training_available()
needs_ort_training = [pytest.mark.ort_training,
                      pytest.mark.skipif(not HAS_ORT_TRAINING, reason="onnxruntime-training is not installed "
                                         "(it replaces onnxruntime; .ci/run tests it in a venv of its own)")]


def graphcert(*args):
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True)


def _digits_config(tmp_path, name="model.onnx", **changes) -> TrainConfig:
    settings = dict(output=str(tmp_path / name), eps=0.02, arch="mlp", data="digits", epochs=3, batch_size=64,
                    holdout=0.1)
    settings.update(changes)
    return TrainConfig(**settings)


def _weights(path) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


# ---- schedules -------------------------------------------------------------------------------------------

def test_linear_schedule_warms_up_then_ramps_to_the_target():
    schedule = Schedule(eps=0.1, warmup=1, rampup=2, kappa=0.25, shape="linear", steps_per_epoch=4)
    eps = [schedule.epsilon(step) for step in range(16)]
    assert eps[:4] == [0.0] * 4
    assert all(a < b for a, b in zip(eps[3:12], eps[4:12]))
    assert eps[11] == pytest.approx(0.1) and eps[15] == pytest.approx(0.1)
    assert schedule.kappa_at(0) == 1.0 and schedule.kappa_at(11) == pytest.approx(0.25)


def test_smooth_ramp_is_continuous_with_a_matching_slope_at_the_switch():
    assert smooth_ramp(0.0) == 0.0 and smooth_ramp(1.0) == pytest.approx(1.0)
    h = 1e-6
    left = (smooth_ramp(0.25) - smooth_ramp(0.25 - h)) / h
    right = (smooth_ramp(0.25 + h) - smooth_ramp(0.25)) / h
    assert left == pytest.approx(right, rel=1e-3)
    values = [smooth_ramp(p / 100) for p in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert smooth_ramp(0.1) < 0.1  # slower than linear at first


def test_default_phases_follow_the_two_plus_eight_recipe():
    assert default_phases(10, None, None) == (2, 8)
    assert default_phases(3, None, None) == (1, 2)
    assert default_phases(1, None, None) == (0, 1)
    assert default_phases(10, 0, None) == (0, 10)
    assert default_phases(10, None, 5) == (1, 5)


# ---- pieces ----------------------------------------------------------------------------------------------

def test_ibp_initialisation_redraws_all_but_the_last_layer():
    proto = build("mlp", (1, 8, 8), 10, seed=0)
    model = model_lib.load(proto)
    last = affine_weights(model)[-1][0]
    before = last.const_value.numpy().copy()
    changed = ibp_initialise(model, set(trainable_names(proto, model)), seed=0)
    assert changed == ["1.weight", "3.weight", "5.weight"]
    first = model.graph.initializers["1.weight"].const_value.numpy()
    assert first.std() == pytest.approx(math.sqrt(2 * math.pi) / 64, rel=0.05)
    np.testing.assert_array_equal(last.const_value.numpy(), before)


def test_training_graph_loss_is_cross_entropy_of_clean_and_worst_case_logits():
    proto = build("mlp", (1, 8, 8), 10, seed=1)
    model = model_lib.load(proto)
    backend = make_backend("torch", training_graph(model, "ibp", (0.0, 1.0)), trainable_names(proto, model), 1e-3, None)
    data = load_dataset("digits").head(16)
    feeds = {"image": data.x, "objective": margin_objective(data.y, 10), "epsilon": np.full((1, 1, 1, 1), 0.05, np.float32),
             "kappa": np.array(0.3, np.float32), "sample_weights": np.full(16, 1 / 16, np.float32)}
    result = backend.evaluate(feeds)

    def cross_entropy(margins):  # worst-case logits: 0 for the label, -margin_j for each other class
        logits = np.concatenate([np.zeros((len(margins), 1)), -margins.astype(np.float64)], axis=1)
        return float(np.mean(np.log(np.exp(logits).sum(axis=1))))
    assert result.clean_loss == pytest.approx(cross_entropy(result.margins), rel=1e-5)
    assert result.robust_loss == pytest.approx(cross_entropy(result.margins_lower), rel=1e-5)
    assert result.loss == pytest.approx(0.3 * result.clean_loss + 0.7 * result.robust_loss, rel=1e-5)
    assert result.loss == pytest.approx(float(result.sample_losses.mean()), rel=1e-5)
    assert (result.margins_lower <= result.margins + 1e-5).all()
    # Other weights weigh the per-sample losses (holistic robust training feeds its worst-case weights).
    weights = np.random.default_rng(0).dirichlet(np.ones(16)).astype(np.float32)
    weighted = backend.evaluate({**feeds, "sample_weights": weights})
    assert weighted.loss == pytest.approx(float(weights @ result.sample_losses), rel=1e-5)


def test_a_few_steps_lower_the_robust_loss():
    proto = build("mlp", (1, 8, 8), 10, seed=3)
    model = model_lib.load(proto)
    backend = make_backend("torch", training_graph(model, "ibp", (0.0, 1.0)), trainable_names(proto, model), 1e-3, 10.0)
    data = load_dataset("digits").head(256)
    feeds = {"image": data.x, "objective": margin_objective(data.y, 10), "epsilon": np.full((1, 1, 1, 1), 0.01, np.float32),
             "kappa": np.array(0.0, np.float32), "sample_weights": np.full(256, 1 / 256, np.float32)}
    before = backend.evaluate(feeds).robust_loss
    for _ in range(10):
        backend.train_step(feeds)
    assert backend.evaluate(feeds).robust_loss < 0.9 * before


def test_write_back_gives_the_same_predictions_and_bounds_as_the_trained_parameters():
    proto = build("mlp", (1, 8, 8), 10, seed=2)
    model = model_lib.load(proto)
    names = trainable_names(proto, model)
    backend = make_backend("torch", training_graph(model, "ibp", (0.0, 1.0)), names, 1e-2, 10.0)
    data = load_dataset("digits").head(128)
    feeds = {"image": data.x, "objective": margin_objective(data.y, 10), "epsilon": np.full((1, 1, 1, 1), 0.02, np.float32),
             "kappa": np.array(0.5, np.float32), "sample_weights": np.full(128, 1 / 128, np.float32)}
    for _ in range(5):
        backend.train_step(feeds)
    trained = backend.evaluate(feeds)
    written = write_back(proto, backend.weights())
    assert [(n.op_type, n.name, list(n.input)) for n in written.graph.node] == \
        [(n.op_type, n.name, list(n.input)) for n in proto.graph.node]
    assert [i.name for i in written.graph.initializer] == [i.name for i in proto.graph.initializer]
    assert not np.array_equal(numpy_helper.to_array(written.graph.initializer[0]),
                              numpy_helper.to_array(proto.graph.initializer[0]))
    logits, margins_lower = GraphCertifier(model_lib.load(written), "ibp", (0.0, 1.0))(data.x, 0.02, feeds["objective"])
    margins = np.einsum("bmn,bn->bm", feeds["objective"], logits)
    np.testing.assert_allclose(margins, trained.margins, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(margins_lower, trained.margins_lower, rtol=1e-4, atol=1e-4)


def test_fine_tuning_a_model_file_keeps_its_graph(tmp_path):
    data = load_dataset("mnist5k")
    chosen = np.random.default_rng(0).permutation(len(data))[:300]
    np.savez(tmp_path / "few.npz", x=data.x[chosen], y=data.y[chosen], domain=np.array([0.0, 1.0]))
    source = REPO / "models" / "mnist_mlp.onnx"
    original_bytes = source.read_bytes()
    config = TrainConfig(output=str(tmp_path / "tuned.onnx"), eps=0.01, model=str(source),
                         data=str(tmp_path / "few.npz"), epochs=1, holdout=0.2)
    result = train(config)
    assert source.read_bytes() == original_bytes
    tuned, original = onnx.load(result.output), onnx.load(str(source))
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in original.graph.node]
    assert [i.name for i in tuned.graph.input] == ["image"] and [o.name for o in tuned.graph.output] == ["logits"]
    assert result.holdout is not None and result.holdout.n == 60


def test_crown_ibp_and_the_cnn_train(tmp_path):
    result = train(_digits_config(tmp_path, arch="cnn", method="crown-ibp", epochs=1))
    assert math.isfinite(result.history[0].loss)
    assert result.holdout.method == "crown-ibp"


# ---- resume ----------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _stop_after(epochs: int):
    def callback(stats):
        if stats.epoch == epochs:
            raise _Stop
    return callback


@pytest.mark.parametrize("backend", ["torch", pytest.param("ort-training", marks=needs_ort_training)])
def test_resume_continues_where_it_stopped(tmp_path, backend):
    whole = train(_digits_config(tmp_path, "whole.onnx", backend=backend))
    config = _digits_config(tmp_path, "parts.onnx", backend=backend)
    with pytest.raises(_Stop):
        train(config, on_epoch=_stop_after(1))
    assert load_checkpoint(config.output + ".ckpt").epoch == 1
    config.resume = True
    seen = []
    resumed = train(config, on_epoch=lambda stats: seen.append(stats.epoch))
    assert seen == [2, 3]
    assert [s.epoch for s in resumed.history] == [1, 2, 3]
    expected, got = _weights(whole.output), _weights(resumed.output)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    assert resumed.holdout.certified == whole.holdout.certified


# ---- command line ----------------------------------------------------------------------------------------

def test_cli_train_then_certify_reproduces_the_reported_accuracy(tmp_path):
    out = tmp_path / "trained.onnx"
    proc = graphcert("train", "--arch", "mlp", "--data", "digits", "--eps", "0.01", "--epochs", "4",
                     "--batch-size", "32", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [s["epoch"] for s in report["history"]] == [1, 2, 3, 4]
    assert report["holdout"]["certified_accuracy"] > 0.5
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    check = graphcert("certify", str(out), "--data", str(out) + ".holdout.npz", "--eps", "0.01", "--json")
    assert check.returncode == 0, check.stderr
    certified = json.loads(check.stdout)
    assert (certified["clean"], certified["certified"]) == (report["holdout"]["clean"], report["holdout"]["certified"])


@pytest.mark.parametrize("args, words", [
    (["--arch", "mlp", "--eps", "-0.1"], ["epsilon", ">= 0"]),
    (["--arch", "mlp", "--eps", "0.1", "--epochs", "3", "--warmup", "2", "--rampup", "2"], ["exceed", "--epochs 3"]),
    (["--arch", "resnet", "--eps", "0.1"], ["unknown architecture", "mlp"]),
    (["--arch", "mlp", "--eps", "0.1", "--data", "nowhere.npz"], ["data file not found"]),
    (["--arch", "mlp", "--eps", "0.1", "--method", "magic"], ["unknown method"]),
    (["--arch", "mlp", "--eps", "0.1", "--backend", "tpu"], ["unknown backend"]),
    (["--arch", "mlp", "--eps", "0.1", "--kappa", "2"], ["--kappa"]),
    (["--arch", "mlp"], ["missing --eps"]),
    (["--eps", "0.1"], ["either a MODEL.onnx", "--arch"]),
    (["--arch", "mlp", "--eps", "0.1", "--resume"], ["no checkpoint"]),
])
def test_cli_train_bad_options_give_one_line_errors(tmp_path, capfd, args, words):
    proc = cli_in_process(capfd, "train", *args, "--data" if "--data" not in args else "--seed",
                          "digits" if "--data" not in args else "0", "-o", str(tmp_path / "out.onnx"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_cli_train_refuses_to_overwrite_its_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes((REPO / "models" / "mnist_mlp.onnx").read_bytes())
    proc = graphcert("train", str(model), "--eps", "0.01", "--data", "digits", "-o", str(model))
    # In a process of its own (the bad-option tests above run in this one): exit status 2, one line, no traceback.
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.skipif(HAS_ORT_TRAINING, reason="checks the message shown when onnxruntime-training is missing")
def test_ort_training_missing_gives_install_hint(tmp_path, capfd):
    for args in (("export-training", "mnist_mlp", "-o", tmp_path / "art", "--eps", "0.01"),
                 ("train", "--arch", "mlp", "--data", "digits", "--eps", "0.01", "--epochs", "1",
                  "--backend", "ort-training", "-o", tmp_path / "o.onnx")):
        proc = cli_in_process(capfd, *args)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "onnxruntime-training" in proc.stderr


# ---- onnxruntime-training --------------------------------------------------------------------------------

@pytest.mark.ort_training
@pytest.mark.skipif(not HAS_ORT_TRAINING, reason="onnxruntime-training is not installed")
# The first epoch's mean loss: first steps agree to float precision, then Adam's sign-like first updates of
# near-zero gradients differ by up to 2·lr, and 15 Björck steps per weight amplify that over the epoch.
@pytest.mark.parametrize("method, changes, tolerance", [
    ("ibp", {}, 1e-3), ("crown-ibp", {}, 1e-3), ("gloro", dict(eps=0.3), 1e-3),
    ("orthogonal", dict(eps=0.3, arch="lipmlp", loss="hkr"), 2e-2)])
def test_backends_agree_on_the_loss_and_reach_the_same_accuracy(tmp_path, method, changes, tolerance):
    results = {name: train(_digits_config(tmp_path, f"{name}.onnx", backend=name, method=method, epochs=4,
                                          batch_size=32, **changes))
               for name in ("torch", "ort-training")}
    torch_run, ort_run = results["torch"], results["ort-training"]
    assert ort_run.history[0].loss == pytest.approx(torch_run.history[0].loss, rel=tolerance)
    assert abs(ort_run.holdout.clean_accuracy - torch_run.holdout.clean_accuracy) <= 0.05
    assert abs(ort_run.holdout.certified_accuracy - torch_run.holdout.certified_accuracy) <= 0.05


@pytest.mark.ort_training
@pytest.mark.skipif(not HAS_ORT_TRAINING, reason="onnxruntime-training is not installed")
def test_export_training_writes_loadable_artifacts(tmp_path):
    from onnxruntime.training import api as ort_api
    folder = tmp_path / "artifacts"
    proc = graphcert("export-training", "mnist_mlp", "-o", str(folder), "--eps", "0.01", "--domain", "0", "1")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((folder / "graphcert_training.json").read_text())
    assert manifest["inputs"] == ["image", "objective", "epsilon", "kappa", "sample_weights"]
    assert manifest["eps"] == 0.01
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        assert onnx.load(str(folder / name)).ir_version <= 10
    state = ort_api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = ort_api.Module(str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"))
    optimizer = ort_api.Optimizer(str(folder / "optimizer_model.onnx"), module)
    data = load_dataset("mnist-test").head(64)
    inputs = [data.x, margin_objective(data.y, 10), np.full((1, 1, 1, 1), 0.01, np.float32), np.array(0.0, np.float32),
              np.full(64, 1 / 64, np.float32)]
    module.train()
    first = module(*inputs)[0]
    optimizer.step()
    module.lazy_reset_grad()
    assert module(*inputs)[0] < first


@pytest.mark.ort_training
@pytest.mark.skipif(not HAS_ORT_TRAINING, reason="onnxruntime-training is not installed")
def test_ort_training_names_a_missing_gradient_kernel(tmp_path):
    proc = graphcert("train", "--arch", "cnn", "--method", "crown-ibp", "--data", "digits", "--eps", "0.01",
                     "--epochs", "1", "--backend", "ort-training", "-o", str(tmp_path / "cnn.onnx"))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "ConvTransposeGrad" in proc.stderr
