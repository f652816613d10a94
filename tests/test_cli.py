"""The graphcert command end to end: outputs, JSON, and one-line errors with exit code 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import cli_in_process

REPO = Path(__file__).resolve().parents[1]
MLP = str(REPO / "models" / "mnist_mlp.onnx")


def graphcert(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0]


def test_certify_json_on_shipped_model():
    proc = graphcert("certify", "mnist_mlp", "--data", "mnist-test", "--eps", "0.001", "--limit", "200", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"clean_accuracy", "certified_accuracy", "n", "eps", "method", "seconds"} <= set(result)
    assert result["n"] == 200 and result["eps"] == 0.001 and result["method"] == "ibp"
    assert 0.8 < result["clean_accuracy"] <= 1.0
    assert 0 < result["certified_accuracy"] <= result["clean_accuracy"]


def test_certify_text_output():
    proc = graphcert("certify", MLP, "--data", "mnist-test", "--eps", "0.0", "--limit", "50")
    assert proc.returncode == 0, proc.stderr
    assert "clean accuracy" in proc.stdout and "certified accuracy" in proc.stdout


def test_convert_writes_checked_bound_graph(tmp_path):
    out = tmp_path / "bounds.onnx"
    proc = graphcert("convert", MLP, "-o", str(out), "--domain", "0", "1")
    assert proc.returncode == 0, proc.stderr
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image", "epsilon"]
    assert [o.name for o in proto.graph.output] == ["logits", "logits_lower", "logits_upper"]
    assert {p.key: p.value for p in proto.metadata_props}["graphcert.method"] == "ibp"
    sess = ort.InferenceSession(str(out))
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    logits, lower, upper = sess.run(None, {"image": x, "epsilon": np.full((1, 1, 1, 1), 0.02, np.float32)})
    assert (lower <= logits + 1e-5).all() and (logits <= upper + 1e-5).all()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_convert_refuses_to_overwrite_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(Path(MLP).read_bytes())
    before = model.read_bytes()
    proc = graphcert("convert", str(model), "-o", str(model))
    assert_one_line_error(proc, "overwrite")
    assert model.read_bytes() == before


def test_inspect_lists_ops_and_methods():
    proc = graphcert("inspect", MLP, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["inputs"][0]["name"] == "image"
    assert info["ops"]["Gemm"] == 4
    assert info["methods"]["ibp"] == []


def test_unsupported_ops_are_listed_before_writing(tmp_path):
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("ReduceLogSumExp", ["x"], ["a"], name="prod1", axes=[1], keepdims=1),
         helper.make_node("ReduceLogSum", ["a"], ["b"], name="det1"),
         helper.make_node("ReduceLogSumExp", ["b"], ["y"], name="prod2", keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    path = tmp_path / "prod.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    out = tmp_path / "out.onnx"
    proc = graphcert("convert", str(path), "-o", str(out))
    assert_one_line_error(proc, "ReduceLogSumExp", "ReduceLogSum", "prod1", "prod2", "det1")
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["certify", "missing.onnx"], ["not found"]),
    (["certify", MLP, "--eps", "-0.1"], ["epsilon"]),
    (["certify", MLP, "--eps", "nan"], ["epsilon"]),
    (["certify", MLP, "--data", "nosuchset"], ["unknown data set"]),
    (["certify", MLP, "--limit", "0"], ["limit"]),
    (["convert", MLP, "-o", "/nonexistent-dir/x.onnx"], ["folder"]),
    (["convert", MLP, "-o", "x.onnx", "--method", "magic"], ["unknown method"]),
    (["certify", MLP, "--method", "alpha-crown", "--alpha-iterations", "-1"], ["alpha-CROWN iterations"]),
    (["certify", MLP, "--method", "alpha-crown", "--alpha-lr", "0"], ["alpha-CROWN learning rate"]),
    (["verify", MLP, "p.vnnlib", "--alpha-lr", "nan"], ["alpha-CROWN learning rate"]),
])
def test_bad_input_gives_one_line_error(tmp_path, capfd, monkeypatch, args, words):
    # In this process (a child's 3 s start each); the tests around it check the one-line error of child processes.
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli_in_process(capfd, *args), *words)


def test_malformed_model_and_data(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    assert_one_line_error(graphcert("certify", str(bad)), "ONNX")
    nan = tmp_path / "nan.npz"
    x = np.zeros((4, 1, 28, 28), np.float32)
    x[0, 0, 0, 0] = np.nan
    np.savez(nan, x=x, y=np.zeros(4, np.int64))
    assert_one_line_error(graphcert("certify", MLP, "--data", str(nan)), "NaN")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 10), np.float32), y=np.zeros(4, np.int64))
    assert_one_line_error(graphcert("certify", MLP, "--data", str(wrong)), "expects 784")
    nolabels = tmp_path / "nolabels.npz"
    np.savez(nolabels, x=np.zeros((4, 784), np.float32))
    assert_one_line_error(graphcert("certify", MLP, "--data", str(nolabels)), "y")


SHARED = REPO.parent / "shared" / "benchmarks" / "vnncomp2021"


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared (VNN-COMP networks and properties)")
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_convert_with_spec_bounds_the_property_margins(tmp_path, method):
    from graphcert.vnnlib import load_property
    net, spec = SHARED / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx", SHARED / "acasxu" / "prop_2.vnnlib"
    out = tmp_path / "spec.onnx"
    proc = graphcert("convert", str(net), "--spec", str(spec), "-o", str(out), "--method", method)
    assert proc.returncode == 0, proc.stderr
    prop = load_property(str(spec))
    matrix, offset = prop.stacked_rows()
    lower_box, upper_box = prop.input_boxes[0]
    center, radius = (lower_box + upper_box) / 2, (upper_box - lower_box) / 2
    sess = ort.InferenceSession(str(out))
    rng = np.random.default_rng(0)
    points = center + radius * rng.uniform(-1, 1, (200, 5))
    original = ort.InferenceSession(str(net))
    y = np.concatenate([original.run(None, {"input": p.reshape(1, 1, 1, 5).astype(np.float32)})[0] for p in points])
    margins = y @ matrix.T + offset
    feeds = {"input": center.reshape(1, 1, 1, 5).astype(np.float32), "epsilon": radius.reshape(1, 1, 1, 5).astype(np.float32)}
    lower, upper = sess.run(["margins_lower", "margins_upper"], feeds)
    assert (lower - 1e-4 <= margins).all() and (margins <= upper + 1e-4).all()


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared (VNN-COMP networks and properties)")
def test_convert_with_a_property_of_another_model_is_refused(tmp_path):
    proc = graphcert("convert", str(SHARED / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx"), "--spec",
                     str(SHARED / "mnistfc" / "prop_0_0.03.vnnlib"), "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(proc, "784 inputs")
    assert not (tmp_path / "x.onnx").exists()
