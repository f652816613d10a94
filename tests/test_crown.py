"""CROWN, CROWN-IBP and alpha-CROWN bound graphs: relaxations sound on every interval, bounds sound on the zoo
and the shared networks (harness), equal to a dense-numpy CROWN on ReLU MLPs, never looser than IBP (CROWN)
or CROWN (alpha-CROWN), and ordinary ONNX with the interval pass's interface."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import reference_crown
import zoo
from conftest import VNNCOMP, shared_path
from graphcert.alpha import AlphaCrown, alpha_crown_bounds
from graphcert.api import bound_graph
from graphcert.builder import Builder
from graphcert.errors import UnsupportedOpError
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.interval import Interval
from graphcert.model import load
from graphcert.passes import relaxations
from graphcert.passes.crown import CrownPass
from graphcert.passes.ibp import IntervalPass
from graphcert.passes.spec import SpecPass
from graphcert.runtime import Session
from graphcert.vnnlib import load_property
from harness import check_bounds_sound, graph_bound_fn

CROWN_ZOO = sorted(zoo.ZOO)
CROWN_IBP_ZOO = ["torch_cnn", "torch_residual", "torch_activations", "torch_concat", "tf2onnx_nhwc", "opset17"]
RELU_MLPS = ["torch_mlp", "matlab_like", "skl2onnx_1d"]
SHARED_CASES = [("mnistfc", "mnist-net_256x2.onnx", "prop_0_0.03.vnnlib"),
                ("mnistfc", "mnist-net_256x4.onnx", "prop_1_0.05.vnnlib"),
                ("acasxu", "ACASXU_run2a_1_1_batch_2000.onnx", "prop_1.vnnlib"),
                ("acasxu", "ACASXU_run2a_2_3_batch_2000.onnx", "prop_2.vnnlib")]


@functools.lru_cache(maxsize=None)
def crown_graph(name: str, intermediate: str = "crown", kind: str = "linf") -> onnx.ModelProto:
    model = zoo.ZOO[name]
    return to_proto(CrownPass(InputSet(kind, model.domain), intermediate=intermediate)(load(model())).model)


@functools.lru_cache(maxsize=None)
def shared_case(family: str, network: str, prop: str):
    """The normalised network, its property, and box feeds for the property's first input box."""
    model = load(shared_path("benchmarks", "vnncomp2021", family, network))
    found = load_property(VNNCOMP / family / prop)
    lower, upper = found.input_boxes[0]
    source = model.graph.inputs[0]
    shape = [1] + list(source.shape)[1:]
    feeds = {f"{source.name}_lower": lower.reshape(shape).astype(np.float32),
             f"{source.name}_upper": upper.reshape(shape).astype(np.float32)}
    return model, found, feeds


def run_box(model: ir.Model, method, feeds, output: str):
    out = Session(to_proto(method(model).model)).run(feeds, [f"{output}_lower", f"{output}_upper"])
    return out[f"{output}_lower"], out[f"{output}_upper"]


# ---- relaxations ------------------------------------------------------------------------------------------

RELAXED_OPS = {
    "Relu": ({}, lambda x: np.maximum(x, 0)),
    "LeakyRelu": ({"alpha": 0.1}, lambda x: np.where(x > 0, x, 0.1 * x)),
    "Sigmoid": ({}, lambda x: 1 / (1 + np.exp(-x))),
    "Tanh": ({}, np.tanh),
    "Softplus": ({}, lambda x: np.logaddexp(0, x)),
    "Elu": ({"alpha": 0.7}, lambda x: np.where(x > 0, x, 0.7 * np.expm1(np.minimum(x, 0)))),
    "Clip": ({}, lambda x: np.clip(x, -0.5, 0.8)),
}


def intervals() -> tuple[np.ndarray, np.ndarray]:
    """Wide, narrow, one-sided, straddling and point intervals."""
    rng = np.random.default_rng(0)
    centers = np.concatenate([rng.uniform(-6, 6, 300), [0, 0, 0.8, -0.5, 3, -3, 20, -20]])
    widths = np.concatenate([np.exp(rng.uniform(np.log(1e-4), np.log(30), 300)), [0, 1e-7, 0.3, 1, 0, 0, 40, 40]])
    return (centers - widths / 2).astype(np.float32), (centers + widths / 2).astype(np.float32)


def lines_model(op: str, attributes: dict, alpha: bool) -> onnx.ModelProto:
    """A graph from (l, u[, alpha]) to the relaxation lines of `op` on [l, u]."""
    float_vector = ir.TensorType(ir.DataType.FLOAT)
    names = ["l", "u"] + (["alpha"] if alpha else [])
    inputs = [ir.Value(name=n, type=float_vector, shape=ir.Shape(["n"])) for n in names]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 17}, name="lines")
    b = Builder(graph)
    clip_bounds = [b.const(np.float32(-0.5)), b.const(np.float32(0.8))] if op == "Clip" else []
    node = ir.Node("", op, [inputs[0], *clip_bounds], attributes=[ir.AttrFloat32(k, v) for k, v in attributes.items()])
    lines = relaxations.relax(b, node, Interval.from_bounds(b, inputs[0], inputs[1]))
    zero = b.op("Mul", inputs[0], b.const(0.0))
    lower_slope = lines.lower_slope_for(b, inputs[2]) if alpha else lines.lower_slope
    for name, value in (("lower_slope", lower_slope), ("lower_intercept", lines.lower_intercept),
                        ("upper_slope", lines.upper_slope), ("upper_intercept", lines.upper_intercept)):
        named = b.op("Add", value if value is not None else zero, zero)
        named.name, named.type, named.shape = name, float_vector, ir.Shape(["n"])
        graph.outputs.append(named)
    return to_proto(ir.Model(graph, ir_version=10))


@pytest.mark.parametrize("op", sorted(RELAXED_OPS))
def test_relaxation_lines_bound_the_function_on_every_interval(op):
    attributes, f = RELAXED_OPS[op]
    lower, upper = intervals()
    lines = Session(lines_model(op, attributes, alpha=False)).run({"l": lower, "u": upper})
    t = np.linspace(0, 1, 401)[:, None]
    x = (lower + t * (upper - lower)).astype(np.float64)
    y = f(x)
    below = lines["lower_slope"] * x + lines["lower_intercept"]
    above = lines["upper_slope"] * x + lines["upper_intercept"]
    tolerance = 1e-5 * (1 + np.abs(y))
    assert np.all(below <= y + tolerance), f"lower line above {op} by {np.max(below - y):.3g}"
    assert np.all(above >= y - tolerance), f"upper line below {op} by {np.max(y - above):.3g}"


@pytest.mark.parametrize("op", ["Relu", "LeakyRelu"])
def test_any_alpha_gives_a_sound_lower_line(op):
    attributes, f = RELAXED_OPS[op]
    lower, upper = intervals()
    alpha = np.random.default_rng(1).uniform(-0.5, 1.5, lower.shape).astype(np.float32)
    lines = Session(lines_model(op, attributes, alpha=True)).run({"l": lower, "u": upper, "alpha": alpha})
    x = (lower + np.linspace(0, 1, 101)[:, None] * (upper - lower)).astype(np.float64)
    below = lines["lower_slope"] * x + lines["lower_intercept"]
    assert np.all(below <= f(x) + 1e-5 * (1 + np.abs(x)))


# ---- soundness --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CROWN_ZOO)
def test_crown_sound_on_zoo(name):
    model = zoo.ZOO[name]
    proto = model()
    x0 = zoo.sample_input(model, proto)
    name_in, out = zoo.input_name(proto), proto.graph.output[0].name
    for eps in (0.02, 0.2):
        report = check_bounds_sound(proto, graph_bound_fn(crown_graph(name), name_in, out, "linf", model.domain),
                                    x0, eps, model.domain, pgd_steps=5, n_random=16, corners=16)
        report.assert_sound()


@pytest.mark.parametrize("name", CROWN_IBP_ZOO)
def test_crown_ibp_sound_on_zoo(name):
    model = zoo.ZOO[name]
    proto = model()
    report = check_bounds_sound(proto, graph_bound_fn(crown_graph(name, "ibp", "box"), zoo.input_name(proto),
                                                      proto.graph.output[0].name, "box", model.domain),
                                zoo.sample_input(model, proto), 0.1, model.domain, pgd_steps=5)
    report.assert_sound()


@pytest.mark.parametrize("case", SHARED_CASES[::2], ids=lambda c: c[1])
def test_crown_sound_on_shared_networks(case):
    model, found, feeds = shared_case(*case)
    proto = onnx.load(VNNCOMP / case[0] / case[1])
    lower, upper = found.input_boxes[0]
    shape = zoo.input_shape(proto)
    x0, eps = ((lower + upper) / 2).reshape(shape), ((upper - lower) / 2).reshape(shape)
    bound = to_proto(CrownPass(InputSet("box"))(model).model)
    report = check_bounds_sound(proto, graph_bound_fn(bound, zoo.input_name(proto), model.graph.outputs[0].name,
                                                      "box"), x0.astype(np.float32), eps, pgd_steps=5)
    report.assert_sound()


def test_l2_ball_bounds_contain_sampled_points():
    model = zoo.ZOO["torch_cnn"]
    proto = model()
    x0 = zoo.sample_input(model, proto)
    bound = to_proto(CrownPass(InputSet("linf"), norm="l2")(load(proto)).model)
    out = proto.graph.output[0].name
    radius = 0.5
    found = Session(bound).run({zoo.input_name(proto): x0, "epsilon": np.float32(radius)})
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(400,) + x0.shape[1:])
    norms = np.linalg.norm(steps.reshape(400, -1), axis=1).reshape((400,) + (1,) * (x0.ndim - 1))
    steps = steps / norms * radius * np.where(np.arange(400) < 100, 1.0, rng.random(400)).reshape(norms.shape)
    y = Session(to_proto(load(proto))).run({zoo.input_name(proto): (x0 + steps).astype(np.float32)})[out]
    assert np.all(y >= found[f"{out}_lower"] - 1e-5) and np.all(y <= found[f"{out}_upper"] + 1e-5)
    box = Session(crown_graph("torch_cnn")).run({zoo.input_name(proto): x0, "epsilon": np.float32(radius)})
    assert np.all(found[f"{out}_upper"] - found[f"{out}_lower"] <= box[f"{out}_upper"] - box[f"{out}_lower"] + 1e-5)


# ---- against the dense reference ------------------------------------------------------------------------

@pytest.mark.parametrize("case", SHARED_CASES, ids=lambda c: c[1])
def test_crown_equals_dense_reference_on_shared_networks(case):
    model, found, feeds = shared_case(*case)
    lower, upper = found.input_boxes[0]
    layers = reference_crown.affine_layers(model)
    out = model.graph.outputs[0].name
    got = run_box(model, CrownPass(InputSet("box")), feeds, out)
    want = reference_crown.crown_bounds(layers, lower, upper)
    np.testing.assert_allclose(np.ravel(got[0]), want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.ravel(got[1]), want[1], rtol=1e-5, atol=1e-5)
    matrix, offset = found.stacked_rows()
    spec_model = SpecPass(matrix, offset)(model).model
    got = run_box(spec_model, CrownPass(InputSet("box"), crown_upper=True), feeds, "margins")
    want = reference_crown.crown_bounds(reference_crown.with_objective(layers, matrix, offset), lower, upper)
    np.testing.assert_allclose(np.ravel(got[0]), want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.ravel(got[1]), want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", RELU_MLPS)
def test_crown_equals_dense_reference_on_zoo_mlps(name):
    model = zoo.ZOO[name]
    proto = model()
    normalised = load(proto)
    x0 = zoo.sample_input(model, proto, batch=3)
    eps = 0.1
    lower, upper = np.clip(x0 - eps, *model.domain), np.clip(x0 + eps, *model.domain)
    out = normalised.graph.outputs[0].name
    found = Session(crown_graph(name)).run({zoo.input_name(proto): x0, "epsilon": np.float32(eps)})
    layers = reference_crown.affine_layers(normalised)
    samples = range(len(x0)) if model.batched else [None]
    for i in samples:
        box = (lower, upper) if i is None else (lower[i], upper[i])
        want = reference_crown.crown_bounds(layers, *box)
        got_lower, got_upper = (found[f"{out}_{side}"] if i is None else found[f"{out}_{side}"][i]
                                for side in ("lower", "upper"))
        np.testing.assert_allclose(np.ravel(got_lower), want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.ravel(got_upper), want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", SHARED_CASES, ids=lambda c: c[1])
def test_linear_bounds_never_looser_than_intervals(case):
    model, found, feeds = shared_case(*case)
    matrix, offset = found.stacked_rows()
    spec_model = SpecPass(matrix, offset)(model).model
    ibp = run_box(spec_model, IntervalPass(InputSet("box")), feeds, "margins")
    crown_ibp = run_box(spec_model, CrownPass(InputSet("box"), intermediate="ibp"), feeds, "margins")
    crown = run_box(spec_model, CrownPass(InputSet("box")), feeds, "margins")
    assert np.all(crown_ibp[0] >= ibp[0] - 1e-5) and np.all(crown[0] >= ibp[0] - 1e-5)
    assert np.mean(crown[0]) > np.mean(ibp[0]) and np.mean(crown[0]) >= np.mean(crown_ibp[0]) - 1e-5


# ---- alpha-CROWN ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [SHARED_CASES[0], SHARED_CASES[3]], ids=lambda c: c[1])
def test_alpha_crown_never_looser_than_crown(case):
    model, found, feeds = shared_case(*case)
    matrix, offset = found.stacked_rows()
    lower, upper = (feeds[k] for k in sorted(feeds))
    crown = alpha_crown_bounds(model, "box", lower, upper, spec=matrix, spec_offset=offset, iterations=0)
    tuned = alpha_crown_bounds(model, "box", lower, upper, spec=matrix, spec_offset=offset, iterations=8)
    assert np.all(tuned[0] >= crown[0]) and np.all(tuned[1] <= crown[1])
    assert np.mean(tuned[0] - crown[0]) > 1e-3
    both = alpha_crown_bounds(model, "box", lower, upper, iterations=5, crown_upper=True)
    plain = alpha_crown_bounds(model, "box", lower, upper, iterations=0, crown_upper=True)
    assert np.all(both[0] >= plain[0]) and np.all(both[1] <= plain[1])


def _switch_case(name: str):
    """(model, input set, feeds) for the start-switch test: a zoo model on an L-inf ball, or an MLP of my own
    ("mlp-Sigmoid", "mlp-Tanh") on a box wide enough that the tangent points matter."""
    if name.startswith("mlp-"):
        from test_relu_split import relu_network
        proto, _ = relu_network([4, 16, 16, 3], seed=5, activation=name[4:], batch=2)
        centre = np.random.default_rng(1).uniform(-1, 1, size=(2, 4)).astype(np.float32)
        return load(proto), InputSet("box"), {"x_lower": centre - 1.0, "x_upper": centre + 1.0}
    entry = zoo.ZOO[name]
    proto = entry()
    x = zoo.sample_input(entry, proto, batch=2)
    return load(proto), InputSet("linf", entry.domain), {zoo.input_name(proto): x, "epsilon": np.float32(0.05)}


@pytest.mark.parametrize("name", ["torch_mlp", "torch_cnn", "torch_activations", "mlp-Sigmoid", "mlp-Tanh"])
def test_the_start_switch_gives_crowns_bounds_and_slopes(name):
    """alpha-CROWN's graph with ALPHA_START on: whatever slopes are fed, its bounds are plain CROWN's (the graph
    without slopes) and its `alpha_init` outputs are slopes that, fed with the switch off, give those bounds
    again; with the switch off, other slopes give other linear bounds (where any unit is left unstable)."""
    import json

    from graphcert.passes.crown import ALPHA_INIT_PREFIX, ALPHA_START
    model, input_set, feeds = _switch_case(name)
    tuned = CrownPass(input_set, alpha="inputs", keep_original=False)(model).model
    units = json.loads(tuned.metadata_props["graphcert.alpha"])
    assert units
    plain = Session(to_proto(CrownPass(input_set, keep_original=False)(model).model)).run(feeds)
    session = Session(to_proto(tuned))
    rng = np.random.default_rng(3)
    shapes = {v.name: [d if isinstance(d, int) else 2 for d in v.shape] for v in tuned.graph.inputs if v.name in units}
    other = {n: rng.uniform(0, 1, size=shape).astype(np.float32) for n, shape in shapes.items()}
    started = session.run({**feeds, **other, ALPHA_START: np.array(True)})
    fed = {n: np.broadcast_to(started[ALPHA_INIT_PREFIX + units[n]], shapes[n]).astype(np.float32) for n in units}
    again = session.run({**feeds, **fed, ALPHA_START: np.array(False)})
    moved = session.run({**feeds, **other, ALPHA_START: np.array(False)})
    for output in plain:
        scale = 1e-4 * max(1.0, float(np.abs(plain[output]).max()))
        np.testing.assert_allclose(started[output], plain[output], rtol=1e-4, atol=scale, err_msg=output)
        np.testing.assert_allclose(again[output], plain[output], rtol=1e-4, atol=scale, err_msg=output)
    if name != "torch_activations":   # (its bounds at this radius are nearly points: no slope moves them)
        assert any(not np.allclose(moved[o], started[o], rtol=1e-3, atol=1e-3) for o in started)


def test_alpha_crown_with_run_time_objective_matches_constant_spec():
    model, found, feeds = shared_case(*SHARED_CASES[2])
    matrix, offset = found.stacked_rows()
    lower, upper = (feeds[k] for k in sorted(feeds))
    runtime = AlphaCrown(model, "box", spec="runtime")
    objective = matrix[None].astype(np.float32)
    constant = AlphaCrown(model, "box", spec=matrix)
    for iterations in (0, 3):
        got = runtime.bounds(runtime.feeds(lower, upper, objective=objective), iterations)[0]
        want = constant.bounds(constant.feeds(lower, upper), iterations)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["torch_mlp", "torch_cnn", "opset17"])
def test_alpha_crown_sound(name):
    model = zoo.ZOO[name]
    proto = model()
    x0 = zoo.sample_input(model, proto)

    def bounds(x, eps):
        return alpha_crown_bounds(proto, "linf", x=x, eps=eps, domain=model.domain, iterations=10, lr=0.5,
                                  crown_upper=True)
    check_bounds_sound(proto, bounds, x0, 0.1, model.domain, pgd_steps=5).assert_sound()


# ---- the bound graph as a model -------------------------------------------------------------------------

def test_bound_graph_runs_at_any_batch_size_and_matches_per_sample():
    model = zoo.ZOO["torch_cnn"]
    proto = model()
    session = Session(crown_graph("torch_cnn"))
    x = zoo.sample_input(model, proto, batch=5)
    out = proto.graph.output[0].name
    name = zoo.input_name(proto)
    batch = session.run({name: x, "epsilon": np.float32(0.05)})
    for i in (0, 4):
        single = session.run({name: x[i:i + 1], "epsilon": np.float32(0.05)})
        np.testing.assert_allclose(single[f"{out}_lower"], batch[f"{out}_lower"][i:i + 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(single[f"{out}_upper"], batch[f"{out}_upper"][i:i + 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch[out], Session(to_proto(load(proto))).run({name: x})[out], rtol=1e-5, atol=1e-6)


def test_interface_matches_interval_pass():
    proto = zoo.ZOO["torch_mlp"]()
    for kind in ("linf", "box"):
        ibp = to_proto(IntervalPass(InputSet(kind))(load(proto)).model)
        for method in ("crown", "crown-ibp"):
            crown = to_proto(bound_graph(proto, method, InputSet(kind)))
            assert [i.name for i in crown.graph.input] == [i.name for i in ibp.graph.input]
            assert [o.name for o in crown.graph.output] == [o.name for o in ibp.graph.output]
            assert {p.key: p.value for p in crown.metadata_props}["graphcert.method"] == method


def test_runtime_objective_equals_folded_matrix():
    """After SpecPass(matrix=None) the bound graph takes `objective`; per sample it equals a constant spec."""
    model, found, feeds = shared_case(*SHARED_CASES[0])
    rng = np.random.default_rng(0)
    x = np.concatenate([feeds["0_lower"], feeds["0_upper"], (feeds["0_lower"] + feeds["0_upper"]) / 2])
    eps = np.float32(0.02)
    objective = rng.normal(size=(3, 4, 10)).astype(np.float32)
    runtime = Session(to_proto(CrownPass(InputSet("linf", (0.0, 1.0)), crown_upper=True)(
        SpecPass(None)(model).model).model)).run({"0": x, "epsilon": eps, "objective": objective})
    for i in range(3):
        folded = Session(to_proto(CrownPass(InputSet("linf", (0.0, 1.0)), crown_upper=True)(
            SpecPass(objective[i])(model).model).model)).run({"0": x[i:i + 1], "epsilon": eps})
        for side in ("lower", "upper"):
            np.testing.assert_allclose(runtime[f"margins_{side}"][i], folded[f"margins_{side}"][0], rtol=1e-5, atol=1e-4)


def test_crown_ibp_is_differentiable_in_the_weights():
    import torch

    from graphcert.torch_exec import TorchGraph
    proto = zoo.ZOO["torch_cnn"]()
    normalised = load(proto)
    graph = CrownPass(InputSet("linf", (0.0, 1.0)), intermediate="ibp", trainable=True)(normalised).model
    weights = {v.name for v in normalised.graph.initializers.values() if v.const_value.numpy().ndim >= 2}
    executor = TorchGraph(graph, trainable=True)
    assert weights <= set(executor.parameter_names)
    x = zoo.sample_input(zoo.ZOO["torch_cnn"], proto, batch=2)
    out = proto.graph.output[0].name
    bounds = executor({zoo.input_name(proto): torch.tensor(x), "epsilon": torch.tensor(0.05)},
                      outputs=[f"{out}_lower", f"{out}_upper"])
    (bounds[f"{out}_upper"] - bounds[f"{out}_lower"]).sum().backward()
    for name in weights:
        assert executor.parameter(name).grad is not None and executor.parameter(name).grad.abs().sum() > 0


def test_unsupported_ops_are_all_listed_before_emitting():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    # Ops neither CROWN nor IBP has a rule for (CROWN bounds IBP's ops through its IBP fallback): ops of a domain
    # no method knows, which stays so as IBP gains rules (random ops, the earlier example, are bounded now).
    custom = "example.custom"
    nodes = [helper.make_node("Mystery", ["x"], ["a"], name="mystery_1", domain=custom),
             helper.make_node("Mystery", ["a"], ["b"], name="mystery_2", domain=custom),
             helper.make_node("Enigma", ["b"], ["c"], name="enigma", domain=custom), helper.make_node("Relu", ["c"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(custom, 1)])
    with pytest.raises(UnsupportedOpError) as error:
        CrownPass(InputSet())(load(proto))
    assert set(error.value.nodes_by_op) == {"Mystery", "Enigma"}
    assert error.value.nodes_by_op["Mystery"] == ["mystery_1", "mystery_2"]


def window_ops_model() -> onnx.ModelProto:
    """Ops the zoo's exporters leave out, in unusual settings: strided, dilated, grouped and padded windows,
    overlapping MaxPool, AveragePool without padded counts, constant-value Pad, Concat of two branches,
    c - x, Neg, Sum, Flatten and Transpose."""
    rng = np.random.default_rng(3)

    def tensor(name, shape, scale=0.5):
        return onnx.numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)
    inits = [tensor("w1", [4, 2, 3, 3]), tensor("b1", [4]), tensor("w2", [4, 2, 2, 2]), tensor("shift", [1, 4, 6, 5]),
             tensor("w3", [8 * 6 * 5, 3], 0.2), tensor("scale", [4], 1.0),
             tensor("bias", [4]), tensor("mean", [4]), onnx.numpy_helper.from_array(
                 rng.uniform(0.5, 2, 4).astype(np.float32), "var"),
             onnx.numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64), "pads"),
             onnx.numpy_helper.from_array(np.array(0.5, np.float32), "pad_value")]
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2]),
        helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("LeakyRelu", ["bn"], ["r1"], alpha=0.2),
        helper.make_node("Pad", ["r1", "pads", "pad_value"], ["padded"]),
        helper.make_node("MaxPool", ["padded"], ["mp"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["mp", "w2"], ["c2"], group=2, pads=[1, 1, 0, 0]),
        helper.make_node("AveragePool", ["c2"], ["ap"], kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 0, 0],
                         count_include_pad=0),
        helper.make_node("Sub", ["shift", "ap"], ["flipped"]),
        helper.make_node("Neg", ["flipped"], ["negated"]),
        helper.make_node("Sum", ["negated", "ap", "shift"], ["summed"]),
        helper.make_node("Tanh", ["summed"], ["t"]),
        helper.make_node("Concat", ["t", "ap"], ["joined"], axis=1),
        helper.make_node("Flatten", ["joined"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w3"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "window_ops", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                  ["batch", 8, 7, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_window_and_placement_adjoints_are_exact_at_zero_radius_and_sound():
    proto = window_ops_model()
    normalised = load(proto)
    x0 = np.random.default_rng(0).uniform(-1, 1, (2, 8, 7, 2)).astype(np.float32)
    want = Session(to_proto(normalised)).run({"x": x0})["y"]
    for intermediate in ("crown", "ibp"):
        bound = to_proto(CrownPass(InputSet("linf"), intermediate=intermediate)(normalised).model)
        found = Session(bound).run({"x": x0, "epsilon": np.float32(0.0)})
        np.testing.assert_allclose(found["y_lower"], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(found["y_upper"], want, rtol=1e-4, atol=1e-4)
        report = check_bounds_sound(proto, graph_bound_fn(bound, "x", "y"), x0[:1], 0.1, pgd_steps=5)
        report.assert_sound()
