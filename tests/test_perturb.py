"""Multi-input models: `--perturb NAME[,NAME]` chooses the perturbed inputs (default: the first float input),
each with its own radius; the other inputs (float or not) are fed as given."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphcert import api
from graphcert.errors import InputError
from graphcert.runtime import Session


def _two_inputs() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "mask"], ["xm"]), helper.make_node("Add", ["xm", "x"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
    graph = helper.make_graph(nodes, "two_inputs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                                    helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _contained(proto, feeds, eps_feeds, moving, rng):
    bound = Session(proto).run({**feeds, **eps_feeds})
    model = Session(_two_inputs())
    for _ in range(50):
        point = dict(feeds)
        for name, radius in moving.items():
            point[name] = feeds[name] + rng.uniform(-radius, radius, feeds[name].shape).astype(np.float32)
        y = model.run(point)["y"]
        assert np.all(bound["y_lower"] <= y + 1e-5) and np.all(y - 1e-5 <= bound["y_upper"])


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_default_perturbs_the_first_float_input_only(tmp_path, method):
    source, out = tmp_path / "m.onnx", tmp_path / "b.onnx"
    onnx.save(_two_inputs(), source)
    proto = api.convert(source, out, method=method)
    assert [i.name for i in proto.graph.input] == ["x", "mask", "epsilon"]
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((5, 4)).astype(np.float32), "mask": rng.standard_normal((5, 4)).astype(np.float32)}
    _contained(proto, feeds, {"epsilon": np.full((1, 1), 0.1, np.float32)}, {"x": 0.1}, rng)


def test_each_perturbed_input_has_its_own_radius(tmp_path):
    source, out = tmp_path / "m.onnx", tmp_path / "b.onnx"
    onnx.save(_two_inputs(), source)
    done = subprocess.run([sys.executable, "cli.py", "convert", str(source), "-o", str(out), "--perturb", "x,mask"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    proto = onnx.load(out)
    assert {"x_epsilon", "mask_epsilon"} <= {i.name for i in proto.graph.input}
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32), "mask": rng.standard_normal((3, 4)).astype(np.float32)}
    radii = {"x_epsilon": np.full((1, 1), 0.05, np.float32), "mask_epsilon": np.full((1, 1), 0.2, np.float32)}
    _contained(proto, feeds, radii, {"x": 0.05, "mask": 0.2}, rng)


def test_unknown_perturbed_input_is_a_one_line_error(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(_two_inputs(), source)
    with pytest.raises(InputError, match="floating-point inputs are: x, mask"):
        api.convert(source, tmp_path / "b.onnx", perturb=["nope"])
