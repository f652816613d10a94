"""Deciding VNN-LIB properties: synthetic networks with known answers, the shared VNN-COMP families, result files."""
from __future__ import annotations

import csv

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import cli
from conftest import VNNCOMP, shared_path
from graphcert.runtime import Session
from graphcert.verify import Result, run_instances, summarize, verify, write_result
from graphcert.vnnlib import load_property
from test_relu_split import write_box_property

METHOD = "crown"


def tiny_network(path, batched: bool = True) -> np.ndarray:
    """y = W2·relu(W1·x + b1) + b2 with 2 inputs and 2 outputs; returns a dense grid of (x, y) for reference."""
    rng = np.random.default_rng(3)
    w1, b1 = rng.normal(size=(2, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    w2, b2 = rng.normal(size=(8, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    shape = [1, 2] if batched else [2]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
         helper.make_node("Add", ["o", "b2"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2] if batched else [2])],
        [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 401), np.linspace(-1, 1, 401)), -1).reshape(-1, 2)
    return np.maximum(grid @ w1 + b1, 0) @ w2 + b2


def write_property(path, boxes, output_constraint: str):
    text = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    terms = " ".join(f"(and (>= X_0 {lo[0]}) (<= X_0 {hi[0]}) (>= X_1 {lo[1]}) (<= X_1 {hi[1]}))" for lo, hi in boxes)
    text += f"(assert (or {terms}))\n(assert {output_constraint})\n"
    path.write_text(text)


def confirmed_by_onnxruntime(model_path, spec_path, counterexample) -> bool:
    """An independent check: the original file under onnxruntime, the property re-read from disk."""
    x, y = counterexample
    proto = onnx.load(model_path)
    session = Session(proto)
    constants = {init.name for init in proto.graph.initializer}
    [x_info] = [i for i in proto.graph.input if i.name not in constants]
    dims = [d.dim_value or 1 for d in x_info.type.tensor_type.shape.dim]
    out = session.run({x_info.name: x.reshape(dims)})[session.output_names[0]].reshape(-1)
    assert np.array_equal(out, y)
    return load_property(spec_path).is_counterexample(x, out)


def check_holds_above_maximum_and_violated_below(tmp_path, method: str, batched: bool = True) -> None:
    model = tmp_path / "tiny.onnx"
    outputs = tiny_network(model, batched)
    top = float(outputs[:, 0].max())
    spec = tmp_path / "p.vnnlib"
    write_property(spec, [([-1, -1], [1, 1])], f"(>= Y_0 {top + 0.05 * abs(top) + 0.05})")
    assert verify(model, spec, timeout=20, method=method).status == "holds"
    write_property(spec, [([-1, -1], [1, 1])], f"(>= Y_0 {top - 0.05 * abs(top) - 0.05})")
    result = verify(model, spec, timeout=20, method=method)
    assert result.status == "violated" and confirmed_by_onnxruntime(model, spec, result.counterexample)


@pytest.mark.parametrize("batched", [True, False])
def test_tiny_network_holds_just_above_its_maximum_and_is_violated_just_below(tmp_path, batched):
    check_holds_above_maximum_and_violated_below(tmp_path, METHOD, batched)


def test_branching_refutes_a_disjunction_of_boxes_and_conjuncts(tmp_path):
    model = tmp_path / "tiny.onnx"
    outputs = tiny_network(model)
    gap = outputs[:, 0] - outputs[:, 1]
    spec = tmp_path / "p.vnnlib"
    below = float(gap.min()) - 0.05
    write_property(spec, [([-1, -1], [0, 1]), ([0, -1], [1, 1])],
                   f"(or (and (<= (- Y_0 Y_1) {below})) (and (>= Y_0 {outputs[:, 0].max() + 0.05}) (>= Y_1 -1000)))")
    result = verify(model, spec, timeout=20, method="ibp")
    assert result.status == "holds" and result.boxes > 2


def hopeless_instance(tmp_path):
    """y = -|x0| - |x1| peaks at exactly 0; "y >= 1e-9" is never reached, yet no bound can refute it within
    the float32 slack around the origin, and no attack reaches it: the search must run until the clock stops."""
    w1 = np.array([[1, -1, 0, 0], [0, 0, 1, -1]], dtype=np.float32)
    w2 = -np.ones((4, 1), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "peak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    model = tmp_path / "peak.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, 2, -1, 1, "(>= Y_0 0.000000001)", 1)
    return model, spec


def test_a_hopeless_proof_stops_at_the_timeout(tmp_path):
    model, spec = hopeless_instance(tmp_path)
    result = verify(model, spec, timeout=2.0, method="ibp")
    assert result.status == "timeout" and 2.0 <= result.seconds < 3.0 and result.boxes > 100


def test_result_files_in_the_competition_format(tmp_path):
    path = tmp_path / "result.txt"
    for status, word in (("holds", "unsat"), ("unknown", "unknown"), ("timeout", "timeout")):
        write_result(Result(status, None, 1.0), path)
        assert path.read_text() == word + "\n"
    x, y = np.array([0.5, -0.25], dtype=np.float32), np.array([1.5], dtype=np.float32)
    write_result(Result("violated", (x, y), 1.0), path)
    assert path.read_text() == "sat\n((X_0 0.5)\n (X_1 -0.25)\n (Y_0 1.5))\n"


def test_mismatched_property_is_a_spec_error(tmp_path):
    model = tmp_path / "tiny.onnx"
    tiny_network(model)
    spec = tmp_path / "p.vnnlib"
    spec.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 0))\n(assert (<= X_0 1))\n"
                    "(assert (>= Y_0 0))\n")
    assert cli.main(["verify", str(model), str(spec)]) == 2


def test_cli_prints_the_answer_and_writes_the_result(tmp_path, capsys):
    model = tmp_path / "tiny.onnx"
    outputs = tiny_network(model)
    spec, out = tmp_path / "p.vnnlib", tmp_path / "out.txt"
    write_property(spec, [([-1, -1], [1, 1])], f"(>= Y_0 {float(outputs[:, 0].min())})")
    assert cli.main(["verify", str(model), str(spec), "--timeout", "10", "--out", str(out)]) == cli.VERDICT_EXIT_CODES["violated"]
    assert capsys.readouterr().out.strip() == "violated"
    assert out.read_text().startswith("sat\n((X_0 ")
    assert cli.main(["verify", str(model)]) == 2


# ---- the shared VNN-COMP 2021 benchmarks ----------------------------------------------------------------

def truth(family: str) -> dict:
    with open(shared_path("benchmarks", "vnncomp2021", "truth.csv"), newline="") as handle:
        return {(r["onnx"], r["vnnlib"]): r["truth"] for r in csv.DictReader(handle) if r["benchmark"] == family}


def test_the_whole_test_family_matches_the_truth(tmp_path):
    instances = shared_path("benchmarks", "vnncomp2021", "test", "test_instances.csv")
    expected = truth("test")
    out = tmp_path / "results.csv"
    # The competition reads properties in real arithmetic: test_unsat holds with a margin of about 0.006, which
    # the float32 rounding analysis does not prove within these timeouts.
    results = run_instances(instances, out, method=METHOD, progress=False, timeout_scale=0.5, rounding="real")
    assert [r.status for r in results] == [expected[(r.onnx, r.vnnlib)] for r in results]
    assert summarize(results)["holds"] == 4 and len(out.read_text().splitlines()) == 6


@pytest.mark.parametrize("family, onnx_name, spec_name", [
    ("acasxu", "ACASXU_run2a_1_1_batch_2000.onnx", "prop_1.vnnlib"),
    ("acasxu", "ACASXU_run2a_3_5_batch_2000.onnx", "prop_2.vnnlib"),
    ("acasxu", "ACASXU_run2a_5_4_batch_2000.onnx", "prop_2.vnnlib"),
    ("acasxu", "ACASXU_run2a_2_8_batch_2000.onnx", "prop_4.vnnlib"),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_1_0.05.vnnlib"),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_2_0.03.vnnlib"),
])
def test_shared_instances_are_decided_as_the_competition_did(family, onnx_name, spec_name):
    folder = VNNCOMP / family
    model, spec = shared_path(folder / onnx_name), folder / spec_name
    expected = truth(family)[(onnx_name, spec_name)]
    result = verify(model, spec, timeout=30, method=METHOD, rounding="real")  # the competition's reading
    assert result.status == expected
    if expected == "violated":
        assert confirmed_by_onnxruntime(model, spec, result.counterexample)


def test_a_property_the_bounds_prove_at_the_root_never_loads_torch(tmp_path):
    """Start-up: torch (1.5-1.8 s to import) loads only for an attack or alpha/beta-CROWN, so a property CROWN
    proves on the property's own box is answered without it (so is one whose box centre is a counterexample)."""
    import subprocess
    import sys
    script = ("import sys; from graphcert.verify import verify; "
              "r = verify(sys.argv[1], sys.argv[2], timeout=60); print(r.status, r.boxes, 'torch' in sys.modules)")
    model = shared_path("benchmarks", "vnncomp2021", "acasxu", "ACASXU_run2a_5_7_batch_2000.onnx")
    for prop, status, torch_loaded in (("prop_3.vnnlib", "holds", "False"), ("prop_2.vnnlib", "violated", "False")):
        done = subprocess.run([sys.executable, "-c", script, str(model), str(model.parent / prop)],
                              capture_output=True, text=True, timeout=120, cwd=str(cli.__file__).rsplit("/", 1)[0])
        assert done.returncode == 0, done.stderr
        found = done.stdout.split()
        assert (found[0], found[-1]) == (status, torch_loaded), done.stdout
        if status == "holds":
            assert found[1] == "1"   # decided on the property's own box
