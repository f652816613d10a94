"""Averages of a conjunct's margins: appended rows, sound learned mixtures in alpha-CROWN, proofs no single
row gives."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphcert.alpha import AlphaCrown
from graphcert.runtime import Session
from graphcert.verify import verify
from graphcert.vnnlib import parse_property

TWO_CONJUNCTS = """
(declare-const X_0 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (>= X_0 -1.0))
(assert (<= X_0 1.0))
(assert (or (and (<= Y_0 0.0) (<= Y_1 0.0)) (and (>= Y_2 3.0))))
"""


def test_rows_with_mixtures_appends_the_average_of_each_conjunct_of_several_rows():
    prop = parse_property(TWO_CONJUNCTS)
    matrix, offset = prop.stacked_rows()
    mixed, mixed_offset, conjuncts, mixtures = prop.rows_with_mixtures()
    first, second = prop.conjunct_rows
    assert len(first) == 2 and len(second) == 1
    assert len(mixtures) == 1 and list(mixtures[0]) == list(first)
    np.testing.assert_allclose(mixed[:len(offset)], matrix)
    np.testing.assert_allclose(mixed[-1], matrix[first].mean(axis=0))
    np.testing.assert_allclose(mixed_offset[-1], offset[first].mean())
    assert list(conjuncts[0]) == [*first, len(offset)] and list(conjuncts[1]) == list(second)


def stable_relu_network(path) -> None:
    """y0 = 2x and y1 = 0.9 - x on [-1, 1], through ReLUs that never switch off (h = x + 5)."""
    w1 = np.array([[1.0]], dtype=np.float32)
    b1 = np.array([5.0], dtype=np.float32)
    w2 = np.array([[2.0, -1.0]], dtype=np.float32)
    b2 = np.array([-10.0, 5.9], dtype=np.float32)
    onnx.save(relu_network(w1, b1, w2, b2), path)


def relu_network(w1, b1, w2, b2) -> onnx.ModelProto:
    """y = relu(x·w1 + b1)·w2 + b2 for one sample x."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
         helper.make_node("Add", ["o", "b2"], ["y"])],
        "relu_network", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w2.shape[1]])],
        [onnx.numpy_helper.from_array(v, n) for n, v in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CROSSING = """
(declare-const X_0 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (>= X_0 -1.0))
(assert (<= X_0 1.0))
(assert (<= Y_0 0.0))
(assert (<= Y_1 0.0))
"""


def test_a_learned_mixture_refutes_a_conjunct_that_no_single_row_or_the_average_refutes(tmp_path):
    # max(2x, 0.9 - x) > 0 on [-1, 1], but 2x reaches -2, 0.9 - x reaches -0.1 and their average -0.05;
    # lambda·(2x) + (1 - lambda)·(0.9 - x) is positive throughout for 1 - lambda in (0.52, 0.95).
    stable_relu_network(tmp_path / "net.onnx")
    prop = parse_property(CROSSING)
    matrix, offset, _, mixtures = prop.rows_with_mixtures()
    bounder = AlphaCrown(str(tmp_path / "net.onnx"), "box", spec="runtime")
    base = len(offset) - len(mixtures)
    lower, upper = (np.array([[-1.0]], dtype=np.float32), np.array([[1.0]], dtype=np.float32))
    feeds = bounder.feeds(lower, upper, objective=matrix[None, :base].astype(np.float32))
    plain, _ = bounder.bounds(feeds, iterations=0, offset=offset[:base], mixtures=mixtures)
    assert plain.shape == (1, 3)
    np.testing.assert_allclose(plain[0], [-2.0, -0.1, -0.05], atol=1e-5)
    learned, _ = bounder.bounds(feeds, iterations=40, offset=offset[:base], mixtures=mixtures,
                                stop=lambda low, high: bool(low[0, 2] > 0))
    assert learned[0, 2] > 0
    np.testing.assert_allclose(learned[0, :2], [-2.0, -0.1], atol=1e-5)
    # Sound: a convex combination of the margins is at most their maximum, whose minimum is 0.0667 at x = 0.3.
    x = np.linspace(-1, 1, 2001)
    assert learned[0, 2] <= np.maximum(2 * x, 0.9 - x).min() + 1e-6


def test_verify_proves_the_crossing_property_without_splitting_with_alpha_crown(tmp_path):
    stable_relu_network(tmp_path / "net.onnx")
    (tmp_path / "prop.vnnlib").write_text(CROSSING)
    with_mixture = verify(tmp_path / "net.onnx", tmp_path / "prop.vnnlib", timeout=60, method="alpha-crown")
    assert with_mixture.status == "holds"
    assert with_mixture.boxes == 1
    split = verify(tmp_path / "net.onnx", tmp_path / "prop.vnnlib", timeout=60, method="crown")
    assert split.status == "holds" and split.boxes > 1


def test_mixture_bounds_stay_below_every_sampled_maximum_on_a_random_network(tmp_path):
    rng = np.random.default_rng(7)
    w1, b1 = rng.normal(size=(3, 12)).astype(np.float32), rng.normal(size=12).astype(np.float32)
    w2, b2 = rng.normal(size=(12, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    model = relu_network(w1, b1, w2, b2)
    matrix = np.array([[1, -1, 0, 0], [1, 0, -1, 0], [1, 0, 0, -1]], dtype=np.float32)
    offset = np.array([0.5, -0.2, 0.1], dtype=np.float32)
    lower = np.array([[-0.6, -0.2, 0.1], [0.0, 0.0, 0.0]], dtype=np.float32)
    upper = lower + np.array([[0.5, 0.4, 0.6], [0.3, 0.3, 0.3]], dtype=np.float32)
    bounder = AlphaCrown(model, "box", spec="runtime")
    feeds = bounder.feeds(lower, upper, objective=np.broadcast_to(matrix, (2, 3, 4)).copy())
    found, _ = bounder.bounds(feeds, iterations=30, offset=offset, mixtures=[np.arange(3)])
    session = Session(model)
    for box in range(2):
        points = lower[box] + rng.random((4000, 3), dtype=np.float32) * (upper[box] - lower[box])
        y = np.concatenate([session.run({"x": p[None]})["y"] for p in points[:400]])
        margins = y @ matrix.T + offset
        assert np.all(found[box, :3] <= margins.min(axis=0) + 1e-4)
        assert found[box, 3] <= margins.max(axis=1).min() + 1e-4
