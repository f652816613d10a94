"""Regressions of issue 10's unsound bounds: each case is a one- or two-node model whose true output the bounds
of some method missed (IBP LogSoftmax after exp underflows; CROWN on an L2 ball with a non-uniform epsilon;
CROWN Softmax at 1e4, Clip with min > max, a log of an empty sum) or outputs no method bounded (LayerNorm's
Mean/InvStdDev, MaxPool's Indices, a Dropout that may be in training mode)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphcert.alpha import AlphaCrown
from graphcert.api import bound_graph
from graphcert.errors import UnsupportedOpError
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.model import load
from graphcert.runtime import Session
from harness import check_bounds_sound, graph_bound_fn

BOUND_METHODS = ["ibp", "crown-ibp", "crown"]


def one_node_model(nodes, shape, out_shape, initializers=(), opset: int = 17, outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "case", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, out_shape) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def bounds(model, method, x, eps, norm="linf", output="y"):
    graph = to_proto(bound_graph(model, method, InputSet("linf"), norm=norm))
    found = Session(graph).run({"x": np.float32(x), "epsilon": np.float32(eps)})
    return found[f"{output}_lower"], found[f"{output}_upper"]


def assert_contains(lower, upper, value, tolerance=1e-5):
    slack = tolerance * (1 + np.abs(np.where(np.isfinite(value), value, 0)))
    assert np.all((lower <= value + slack) | (lower == value)), (lower, value)
    assert np.all((value <= upper + slack) | (upper == value)), (upper, value)


def test_ibp_log_softmax_bounds_in_log_space():
    """x = [0, -120]: exp(-120) underflows next to exp(0), and the log of softmax bounds was -inf."""
    model = one_node_model([helper.make_node("LogSoftmax", ["x"], ["y"], axis=-1)], [1, 2], [1, 2])
    x = np.float32([[0.0, -120.0]])
    lower, upper = bounds(model, "ibp", x, 1e-3)
    assert np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))
    assert_contains(lower, upper, Session(model).run({"x": x})["y"])
    assert upper[0, 1] - lower[0, 1] < 0.01


def relu_of_first() -> onnx.ModelProto:
    return one_node_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                          [1, 2], [1, 1], {"w": np.float32([[1.0], [0.0]])})


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_l2_ball_is_relaxed_on_the_box_of_its_largest_radius(method):
    """An L2 ball of radius max(eps) = 1 around [0.5, 0.5] holds [1.5, 0.5]: relu(x0) reaches 1.5."""
    lower, upper = bounds(relu_of_first(), method, [[0.5, 0.5]], [[0.01, 1.0]], norm="l2")
    assert lower[0, 0] <= 0.0 and upper[0, 0] >= 1.5


def test_alpha_crown_l2_ball_is_relaxed_on_the_box_of_its_largest_radius():
    bounder = AlphaCrown(relu_of_first(), "linf", norm="l2")
    lower, upper = bounder.bounds(bounder.feeds(x=[[0.5, 0.5]], eps=[[0.01, 1.0]]), iterations=5)
    assert lower[0, 0] <= 0.0 and upper[0, 0] >= 1.5


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_l2_bounds_hold_under_attack_with_a_non_uniform_radius(method):
    """The harness's points lie in the box x ± max(eps), which holds the ball; a two-layer net mixes them."""
    rng = np.random.default_rng(1)
    model = one_node_model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                            helper.make_node("MatMul", ["r", "w2"], ["y"])], [1, 4], [1, 3],
                           {"w1": rng.standard_normal((4, 6)).astype(np.float32),
                            "w2": rng.standard_normal((6, 3)).astype(np.float32)})
    x, eps = rng.standard_normal((1, 4)).astype(np.float32), np.float32([[0.01, 0.5, 0.02, 0.01]])
    graph = to_proto(bound_graph(model, method, InputSet("linf"), norm="l2"))
    found = Session(graph).run({"x": x, "epsilon": eps})
    rng_points = rng.standard_normal((200, 4))
    points = x + rng_points / np.linalg.norm(rng_points, axis=1, keepdims=True) * eps.max()
    values = Session(to_proto(load(model))).run({"x": points.astype(np.float32)})["y"]
    assert np.all(values >= found["y_lower"] - 1e-5) and np.all(values <= found["y_upper"] + 1e-5)


@pytest.mark.parametrize("method", BOUND_METHODS)
def test_softmax_of_large_numbers_at_radius_zero(method):
    """ONNX's test_softmax_large_number: rows at 1e4 cancel in A·x unless the concretisation keeps a slack."""
    model = one_node_model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [2, 4], [2, 4])
    x = np.float32([[0, 1, 2, 3], [10000, 10001, 10002, 10003]])
    lower, upper = bounds(model, method, x, 0.0)
    assert_contains(lower, upper, Session(model).run({"x": x})["y"], tolerance=1e-6)


@pytest.mark.parametrize("method", BOUND_METHODS)
def test_clip_with_min_above_max_is_max(method):
    model = one_node_model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [1, 3], [1, 3],
                           {"lo": np.float32(2.0), "hi": np.float32(1.0)})
    x = np.float32([[0.0, 1.5, 3.0]])
    lower, upper = bounds(model, method, x, 0.1)
    assert_contains(lower, upper, Session(model).run({"x": x})["y"])


@pytest.mark.parametrize("method", BOUND_METHODS)
def test_log_of_an_empty_sum_is_minus_infinity(method):
    """ReduceLogSum over an empty axis (its ONNX function body: Log of ReduceSum) is -inf; so is log(relu(0))."""
    model = one_node_model([helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
                            helper.make_node("Log", ["s"], ["y"])], [2, 0, 4], [2, 1, 4], {"axes": np.int64([1])})
    lower, upper = bounds(model, method, np.zeros((2, 0, 4), np.float32), 0.1)
    assert np.all(np.isneginf(lower))
    model = one_node_model([helper.make_node("Relu", ["x"], ["s"]), helper.make_node("Log", ["s"], ["y"])],
                           [1, 2], [1, 2])
    x = np.float32([[0.0, 1.0]])
    lower, upper = bounds(model, method, x, 0.0)
    assert np.isneginf(lower[0, 0])
    assert_contains(lower, upper, Session(model).run({"x": x})["y"])


def layer_norm_with_statistics() -> onnx.ModelProto:
    """Y, Mean and InvStdDev all used downstream."""
    nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["n", "mean", "inv"], axis=-1),
             helper.make_node("Add", ["n", "mean"], ["m"]), helper.make_node("Mul", ["m", "inv"], ["y"])]
    return one_node_model(nodes, [2, 5], [2, 5], {"scale": np.float32([1, 2, 0.5, -1, 1]),
                                                  "bias": np.float32([0, 1, 0, 0, -1])})


def test_ibp_bounds_layer_norm_mean_and_inverse_deviation():
    model = layer_norm_with_statistics()
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32) * 3
    graph = to_proto(bound_graph(model, "ibp", InputSet("linf")))
    check_bounds_sound(model, graph_bound_fn(graph, "x", "y"), x, 0.2).assert_sound()


@pytest.mark.parametrize("method", ["crown-ibp", "crown"])
def test_linear_bounds_take_or_refuse_layer_norm_statistics(method):
    model = layer_norm_with_statistics()
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32) * 3
    try:
        graph = to_proto(bound_graph(model, method, InputSet("linf")))
    except UnsupportedOpError as error:
        assert "LayerNormalization" in str(error) and "\n" not in str(error)
        return
    check_bounds_sound(model, graph_bound_fn(graph, "x", "y"), x, 0.2).assert_sound()


def max_pool_with_indices() -> onnx.ModelProto:
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "i"], kernel_shape=[2], strides=[2], name="pool"),
             helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT), helper.make_node("Add", ["p", "f"], ["y"])]
    return one_node_model(nodes, [1, 1, 4], [1, 1, 2])


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "lipschitz"])
def test_max_pool_indices_are_refused_with_the_reason(method):
    with pytest.raises(UnsupportedOpError, match=r"MaxPool \(pool: its Indices output is used") as error:
        bound_graph(max_pool_with_indices(), method, InputSet("linf"), norm="l2" if method == "lipschitz" else "linf")
    assert "\n" not in str(error.value)


def dropout(training_mode) -> onnx.ModelProto:
    inputs = ["x", "ratio"] + (["mode"] if training_mode is not None else [])
    initializers = {"ratio": np.float32(0.5)}
    nodes = [helper.make_node("Dropout", inputs, ["y"], name="drop")]
    if isinstance(training_mode, bool):
        initializers["mode"] = np.bool_(training_mode)
    elif training_mode == "computed":   # not a constant: decided by the input at run time
        nodes.insert(0, helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0))
        nodes.insert(1, helper.make_node("Greater", ["top", "ratio"], ["mode"]))
    return one_node_model(nodes, [1, 3], [1, 3], initializers, opset=13)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "lipschitz"])
def test_dropout_in_inference_mode_is_the_identity(method):
    for mode in (None, False):
        x = np.float32([[0.5, -1.0, 2.0]])
        lower, upper = bounds(dropout(mode), method, x, 0.1, norm="l2" if method == "lipschitz" else "linf")
        assert np.all(lower <= x - 0.1 + 1e-5) and np.all(lower >= x - 0.1 - 1e-3) and np.all(upper >= x + 0.1 - 1e-5)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "lipschitz"])
@pytest.mark.parametrize("mode", [True, "computed"])
def test_dropout_that_may_train_is_refused(method, mode):
    with pytest.raises(UnsupportedOpError, match=r"Dropout \(drop: training_mode may be true"):
        bound_graph(dropout(mode), method, InputSet("linf"), norm="l2" if method == "lipschitz" else "linf")
