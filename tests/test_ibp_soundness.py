"""IBP bound graphs of every zoo model and shared benchmark network: sound (harness), exact at eps = 0, equal to
a textbook numpy IBP, plain ONNX that runs at any batch size, and with the interface the contract promises."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import helper

import reference_ibp
import zoo
from conftest import benchmark_networks
from graphcert.api import convert
from graphcert.errors import UnsupportedOpError
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.model import load
from graphcert.passes.ibp import IntervalPass
from graphcert.runtime import Session
from harness import check_bounds_sound, graph_bound_fn

MODELS = {**zoo.ZOO, **zoo.ATTENTION_ZOO}
ZOO_NAMES = sorted(MODELS)
# Models whose every op the numpy reference implements.
REFERENCE_ZOO = ["torch_mlp", "torch_cnn", "torch_conv_bn", "torch_residual", "torch_activations",
                 "torch_normalised_input", "tf2onnx_nhwc", "matlab_like", "skl2onnx_1d", "mul_div_constants",
                 "reshape_baked_batch"]
BENCHMARKS = benchmark_networks("mnistfc") + benchmark_networks("acasxu", every=9) + benchmark_networks("test")


@functools.lru_cache(maxsize=None)
def zoo_bound_graph(name: str, kind: str) -> onnx.ModelProto:
    model = MODELS[name]
    return to_proto(IntervalPass(InputSet(kind, model.domain))(load(model())).model)


def bound_graph(proto: onnx.ModelProto, kind: str = "linf", domain=None) -> onnx.ModelProto:
    return to_proto(IntervalPass(InputSet(kind, domain))(load(proto)).model)


@functools.lru_cache(maxsize=None)
def mnist_image() -> np.ndarray:
    from graphcert.data import mnist_test
    return mnist_test().x[0]


def benchmark_case(path):
    """The network, an input (a shipped MNIST test image for mnistfc) and its domain (pixels live in [0, 1])."""
    proto = onnx.load(path)
    shape = zoo.input_shape(proto)
    if "mnist" in path.stem:
        return proto, mnist_image().reshape(shape), (0.0, 1.0)
    return proto, np.random.default_rng(0).uniform(-0.5, 0.5, shape).astype(np.float32), None


def assert_sound(proto, bound, x0, eps, domain, kind="linf", **options):
    name, out = zoo.input_name(proto), proto.graph.output[0].name
    report = check_bounds_sound(proto, graph_bound_fn(bound, name, out, kind, domain), x0, eps, domain, **options)
    report.assert_sound()
    return report


def assert_exact_at_zero_radius(proto, bound, x0):
    name, out = zoo.input_name(proto), proto.graph.output[0].name
    want = Session(proto).run({name: x0})[out]
    got = Session(bound).run({name: x0, "epsilon": np.float32(0.0)})
    for suffix in ("lower", "upper"):
        np.testing.assert_allclose(got[f"{out}_{suffix}"], want, rtol=1e-5, atol=1e-5, err_msg=suffix)


# ---- the zoo ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_zoo_bounds_are_sound(name, eps):
    model = MODELS[name]
    proto = model()
    assert_sound(proto, zoo_bound_graph(name, "linf"), zoo.sample_input(model, proto, seed=3), eps, model.domain)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_box_bounds_are_sound(name):
    model = MODELS[name]
    proto = model()
    assert_sound(proto, zoo_bound_graph(name, "box"), zoo.sample_input(model, proto, seed=4), 0.05, model.domain,
                 kind="box", pgd_steps=5)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_bounds_are_exact_at_zero_radius(name):
    model = MODELS[name]
    proto = model()
    assert_exact_at_zero_radius(proto, zoo_bound_graph(name, "linf"), zoo.sample_input(model, proto, seed=5))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_bound_graph_interface_and_batches(name):
    model = MODELS[name]
    proto, bound = model(), zoo_bound_graph(name, "linf")
    onnx.checker.check_model(bound, full_check=True)
    x_name, out = zoo.input_name(proto), proto.graph.output[0].name
    assert [v.name for v in bound.graph.input] == [x_name, "epsilon"]
    assert [v.name for v in bound.graph.output] == [out, f"{out}_lower", f"{out}_upper"]
    assert bound.metadata_props and {p.key: p.value for p in bound.metadata_props}["graphcert.method"] == "ibp"
    session = Session(bound)
    for batch in (1, 7) if model.batched else (1,):
        x = zoo.sample_input(model, proto, batch=batch, seed=batch)
        got = session.run({x_name: x, "epsilon": np.float32(0.02)})
        assert got[f"{out}_lower"].shape == got[f"{out}_upper"].shape == got[out].shape
        assert got[out].shape[0] == (batch if model.batched else got[out].shape[0])
        assert np.all(got[f"{out}_lower"] <= got[out] + 1e-5) and np.all(got[out] <= got[f"{out}_upper"] + 1e-5)


@pytest.mark.parametrize("name", ["torch_cnn", "torch_conv_bn", "torch_layernorm", "tf2onnx_nhwc"])
def test_trainable_bound_graphs_compute_the_same_bounds(name):
    """trainable=True keeps |W| in the graph (computed by Abs) instead of precomputing it."""
    model = MODELS[name]
    trainable = to_proto(IntervalPass(InputSet("linf", model.domain), trainable=True)(load(model())).model)
    x = zoo.sample_input(model, batch=3, seed=10)
    feeds = {zoo.input_name(trainable): x, "epsilon": np.float32(0.05)}
    want, got = Session(zoo_bound_graph(name, "linf")).run(feeds), Session(trainable).run(feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_unclipped_ball_with_a_shared_radius_equals_its_box(name):
    """Without clipping the ball keeps epsilon as one radius row for all samples through linear layers; its bounds
    must equal those of the same box given as lower and upper, for scalar, per-element and per-sample epsilon."""
    model = MODELS[name]
    proto = model()
    ball, box = bound_graph(proto, "linf"), bound_graph(proto, "box")
    x_name, out = zoo.input_name(proto), proto.graph.output[0].name
    x = zoo.sample_input(model, proto, batch=3, seed=11)
    rng = np.random.default_rng(12)
    batch_axis = [x.shape[0]] if model.batched else [1]
    for eps in (np.float32(0.03), rng.uniform(0, 0.05, [1, *x.shape[1:]]).astype(np.float32),
                rng.uniform(0, 0.05, batch_axis + [1] * (x.ndim - 1)).astype(np.float32)):
        eps = eps if np.ndim(eps) == 0 or eps.ndim == x.ndim else eps.reshape(x.shape)
        got = Session(ball).run({x_name: x, "epsilon": eps})
        want = Session(box).run({f"{x_name}_lower": x - eps, f"{x_name}_upper": x + eps})
        for side in ("lower", "upper"):
            key = f"{out}_{side}"
            scale = 1e-5 * (1 + np.abs(want[key]).max())
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=scale, err_msg=f"{name} {key} {np.shape(eps)}")


def test_box_bound_graph_takes_lower_and_upper_inputs():
    bound = zoo_bound_graph("torch_cnn", "box")
    assert [v.name for v in bound.graph.input] == ["x_lower", "x_upper"]
    assert [v.name for v in bound.graph.output] == ["y", "y_lower", "y_upper"]


def test_epsilon_per_element_and_per_channel():
    model = MODELS["torch_normalised_input"]
    proto = model()
    x0 = zoo.sample_input(model, proto, seed=6)
    per_channel = np.array([0.02, 0.1], np.float32).reshape(1, 2, 1, 1)
    per_element = np.random.default_rng(6).uniform(0.0, 0.1, x0.shape).astype(np.float32)
    for eps in (per_channel, per_element):
        assert_sound(proto, zoo_bound_graph(model.name, "linf"), x0, eps, model.domain)


@pytest.mark.parametrize("name", REFERENCE_ZOO)
@pytest.mark.parametrize("eps", [0.0, 0.01, 0.1])
def test_zoo_bounds_equal_textbook_ibp(name, eps):
    model = MODELS[name]
    proto = model()
    assert_equal_to_reference(proto, zoo_bound_graph(name, "linf"), zoo.sample_input(model, proto, seed=7), eps,
                              model.domain)


def assert_equal_to_reference(proto, bound, x0, eps, domain):
    name, out = zoo.input_name(proto), proto.graph.output[0].name
    low, high = x0 - np.float32(eps), x0 + np.float32(eps)
    if domain is not None:
        low, high = np.maximum(low, np.float32(domain[0])), np.minimum(high, np.float32(domain[1]))
    want_lower, want_upper = reference_ibp.reference_bounds(proto, low, high)[out]
    got = Session(bound).run({name: x0, "epsilon": np.float32(eps)})
    # Float32 sums of many products: compare relative to the output's magnitude.
    scale = max(1.0, float(np.abs(want_lower).max()), float(np.abs(want_upper).max()))
    np.testing.assert_allclose(got[f"{out}_lower"], want_lower, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got[f"{out}_upper"], want_upper, rtol=1e-5, atol=1e-5 * scale)


# ---- the shared benchmark networks ----------------------------------------------------------------------

@pytest.mark.parametrize("path", BENCHMARKS)
def test_benchmark_bounds_are_sound_and_exact_at_zero_radius(path):
    proto, x0, domain = benchmark_case(path)
    bound = bound_graph(proto, "linf", domain)
    assert_exact_at_zero_radius(proto, bound, x0)
    for eps in (0.005, 0.03):
        assert_sound(proto, bound, x0, eps, domain)
    assert_sound(proto, bound_graph(proto, "box", domain), x0, 0.02, domain, kind="box", pgd_steps=5)


@pytest.mark.parametrize("path", [p for p in BENCHMARKS if p.id.startswith(("mnist", "ACAS", "test_sat"))
                                  or p.id.endswith("absent")])
def test_benchmark_bounds_equal_textbook_ibp(path):
    proto, x0, domain = benchmark_case(path)
    bound = bound_graph(proto, "linf", domain)
    for eps in (0.0, 0.005, 0.03):
        assert_equal_to_reference(proto, bound, x0, eps, domain)


# ---- non-monotone ops: many samples against true interval rules -----------------------------------------

@pytest.mark.parametrize("name", ["torch_layernorm", "torch_softmax"])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_layernorm_and_softmax_bounds_hold_on_many_samples(name, eps):
    model = MODELS[name]
    proto = model()
    assert_sound(proto, zoo_bound_graph(name, "linf"), zoo.sample_input(model, proto, seed=8), eps, model.domain,
                 n_random=3000, corners=1000)


# ---- the harness itself -------------------------------------------------------------------------------

@pytest.mark.parametrize("gradients", ["auto", "zeroth-order"])
@pytest.mark.parametrize("name", ["torch_cnn", "torch_layernorm", "matlab_like"])
def test_harness_catches_bounds_that_miss_reachable_outputs(name, gradients):
    """Bounds from the outputs at the box centre and a few random points must be reported unsound."""
    model = MODELS[name]
    proto = model()
    x_name, out = zoo.input_name(proto), proto.graph.output[0].name
    session = Session(proto)
    rng = np.random.default_rng(9)

    def sampled_hull(x0, eps):
        outs = [session.run({x_name: (x0 + rng.uniform(-eps, eps, x0.shape)).astype(np.float32)})[out]
                for _ in range(20)]
        return np.min(outs, axis=0), np.max(outs, axis=0)

    report = check_bounds_sound(proto, sampled_hull, zoo.sample_input(model, proto, seed=9), 0.05, None,
                                n_random=0, corners=0, gradients=gradients)
    assert not report.sound
    assert report.gradients == ("torch" if gradients == "auto" else "zeroth-order")
    with pytest.raises(AssertionError, match="bounds violated"):
        report.assert_sound()


@pytest.mark.parametrize("name", ["torch_layernorm", "torch_softmax"])
def test_harness_catches_copying_a_non_monotone_op_onto_both_ends(name):
    """The well-known unsound shortcut: f(lower) and f(upper) as bounds, right only for monotone f."""
    model = MODELS[name]
    proto = model()
    session, x_name, out = Session(proto), zoo.input_name(proto), proto.graph.output[0].name

    def ends_only(x0, eps):
        at_lower, at_upper = (session.run({x_name: (x0 + s * eps).astype(np.float32)})[out] for s in (-1, 1))
        return np.minimum(at_lower, at_upper), np.maximum(at_lower, at_upper)

    report = check_bounds_sound(proto, ends_only, zoo.sample_input(model, proto, seed=11), 0.2, model.domain)
    assert not report.sound


# ---- unsupported ops ------------------------------------------------------------------------------------

def trigonometric_model() -> onnx.ModelProto:
    # Sin and Cos have IBP rules now: two ops that have none (log-sum-exp and log-sum reductions).
    info = lambda name, shape: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)  # noqa: E731
    nodes = [helper.make_node("ReduceLogSumExp", ["x"], ["c1"], name="first_cos", axes=[2], keepdims=1),
             helper.make_node("ReduceLogSum", ["c1"], ["s"], name="the_sin"),
             helper.make_node("ReduceLogSumExp", ["s"], ["y"], name="second_cos", axes=[0], keepdims=1)]
    graph = helper.make_graph(nodes, "trig", [info("x", [1, 3, 3])], [info("y", [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_unsupported_ops_are_all_listed_with_their_nodes(tmp_path):
    with pytest.raises(UnsupportedOpError) as caught:
        IntervalPass(InputSet("linf"))(load(trigonometric_model()))
    assert caught.value.nodes_by_op == {"ReduceLogSumExp": ["first_cos", "second_cos"], "ReduceLogSum": ["the_sin"]}
    message = str(caught.value)
    assert all(word in message for word in ("ReduceLogSumExp", "ReduceLogSum", "first_cos", "second_cos", "the_sin"))

    source, target = tmp_path / "trig.onnx", tmp_path / "trig_ibp.onnx"
    onnx.save(trigonometric_model(), source)
    with pytest.raises(UnsupportedOpError):
        convert(source, target)
    assert list(tmp_path.iterdir()) == [source]


def test_overflowing_bounds_are_infinite_not_nan():
    """exp(90) overflows float32; the layer after it meets inf - inf. The bounds must stay sound: infinite."""
    weights = onnx.numpy_helper.from_array(np.array([[1.0, -1.0], [2.0, 1.0]], np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])], [weights])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    got = Session(bound_graph(proto)).run({"x": np.array([[80.0, 1.0]], np.float32), "epsilon": np.float32(10)})
    assert not np.isnan(got["y_lower"]).any() and not np.isnan(got["y_upper"]).any()
    assert np.all(got["y_lower"] <= got["y"]) and np.all(got["y"] <= got["y_upper"])
    assert np.isinf(got["y_lower"][0, 0]) and np.isinf(got["y_upper"][0, 1])
