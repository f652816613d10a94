"""CROWN through ops only IBP has a rule for (passes/crown_fallback.py): the node's IBP interval becomes a leaf
box. For each such op in the middle of a small network, CROWN and CROWN-IBP convert, and their bounds contain
the outputs at sampled points, corners and zeroth-order attack points (the ops are discontinuous: gradients say
nothing), in L-inf and L2, at scales 1 and 1e3; alpha-CROWN and ReLU-split graphs keep working with a leaf in
the graph; a net with an IBP-only op certifies with crown; inspect says which nodes go through IBP."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from graphcert import api
from graphcert.certify import certify
from graphcert.data import Dataset
from graphcert.errors import UnsupportedOpError
from graphcert.export import to_proto
from graphcert.inspect import describe
from graphcert.interface import perturbed_inputs
from graphcert.interpret import perturbed_nodes
from graphcert.passes import crown_support
from graphcert.passes.crown import SPLIT_LOWER_PREFIX, SPLIT_UPPER_PREFIX, CrownPass
from graphcert.interface import InputSet
from graphcert.runtime import Session

N_IN, N_HIDDEN, N_OUT = 5, 6, 3


def _tail(op_nodes, out: str, cast: bool = False) -> list:
    """op_nodes compute `out` from `h` ([batch, N_HIDDEN] after a Relu layer); then a linear layer to y."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["z"]), helper.make_node("Relu", ["z"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["h"]), *op_nodes]
    if cast:
        nodes.append(helper.make_node("Cast", [out], [out + "_f"], to=TensorProto.FLOAT))
        out += "_f"
    nodes.append(helper.make_node("MatMul", [out, "w3"], ["y"]))
    return nodes


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


# op -> (nodes after h producing the named tensor, its name, whether it needs a cast to float, its width,
#        extra initializers)
CASES = {
    "Floor": ([helper.make_node("Floor", ["h"], ["o"])], "o", False, N_HIDDEN, []),
    "Round": ([helper.make_node("Round", ["h"], ["o"])], "o", False, N_HIDDEN, []),
    "Sign": ([helper.make_node("Sign", ["h"], ["o"])], "o", False, N_HIDDEN, []),
    "Erf": ([helper.make_node("Erf", ["h"], ["o"])], "o", False, N_HIDDEN, []),
    "HardSigmoid": ([helper.make_node("HardSigmoid", ["h"], ["o"], alpha=0.3)], "o", False, N_HIDDEN, []),
    "Abs": ([helper.make_node("Abs", ["h"], ["o"])], "o", False, N_HIDDEN, []),
    "Mod": ([helper.make_node("Mod", ["h", "m"], ["o"], fmod=1)], "o", False, N_HIDDEN,
            [_const("m", np.float32(1.5))]),
    "Less": ([helper.make_node("Less", ["h", "k"], ["o"])], "o", True, N_HIDDEN, [_const("k", np.float32(0.25))]),
    "Equal": ([helper.make_node("Floor", ["h"], ["f"]), helper.make_node("Equal", ["f", "k"], ["o"])], "o", True,
              N_HIDDEN, [_const("k", np.float32(0.0))]),
    "ArgMax": ([helper.make_node("ArgMax", ["h"], ["a"], axis=1, keepdims=1)], "a", True, 1, []),
    "OneHot": ([helper.make_node("ArgMax", ["h"], ["a"], axis=1, keepdims=0),
                helper.make_node("OneHot", ["a", "depth", "values"], ["o"], axis=-1)], "o", False, 4,
               [_const("depth", np.int64(4)), _const("values", np.array([0.0, 1.0], np.float32))]),
    "Gather": ([helper.make_node("Gather", ["h", "idx"], ["o"], axis=1)], "o", False, 4,
               [_const("idx", np.array([5, 0, 0, 3], np.int64))]),
    "Max": ([helper.make_node("Neg", ["h"], ["n"]), helper.make_node("Max", ["h", "n", "k"], ["o"])], "o", False,
            N_HIDDEN, [_const("k", np.float32(-0.5))]),
    "ReduceMax": ([helper.make_node("ReduceMax", ["h"], ["o"], axes=[1], keepdims=1)], "o", False, 1, []),
    "Split": ([helper.make_node("Split", ["h", "parts"], ["s0", "s1"], axis=1),
               helper.make_node("Sub", ["s0", "s1"], ["o"])], "o", False, N_HIDDEN // 2,
              [_const("parts", np.array([3, 3], np.int64))]),
    "Slice": ([helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["o"])], "o", False, 4,
              [_const("starts", np.array([1], np.int64)), _const("ends", np.array([5], np.int64)),
               _const("axes", np.array([1], np.int64))]),
    "Where": ([helper.make_node("Less", ["h", "k"], ["c"]), helper.make_node("Where", ["c", "h", "k"], ["o"])], "o",
              False, N_HIDDEN, [_const("k", np.float32(0.5))]),
}


def fallback_model(op: str, scale: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    nodes, out, cast, width, extra = CASES[op]
    rng = np.random.default_rng(seed)
    weights = [_const("w1", (rng.normal(size=(N_IN, N_HIDDEN)) * scale).astype(np.float32)),
               _const("w2", rng.normal(size=(N_HIDDEN, N_HIDDEN)).astype(np.float32)),
               _const("w3", rng.normal(size=(width, N_OUT)).astype(np.float32))]
    graph = helper.make_graph(_tail(nodes, out, cast), op,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N_IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N_OUT])],
                              weights + extra)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def ball_points(rng, x0: np.ndarray, eps: float, norm: str, n: int) -> np.ndarray:
    """Points of the ball around x0 ([1, d]): uniform and corners (linf); the sphere and inside (L2)."""
    d = x0.shape[1]
    if norm == "linf":
        inside = rng.uniform(-eps, eps, size=(n, d))
        corners = np.where(rng.random((n, d)) < 0.5, eps, -eps)
        steps = np.concatenate([inside, corners])
    else:
        directions = rng.normal(size=(2 * n, d))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        steps = directions * eps * np.where(np.arange(2 * n) < n, 1.0, rng.random(2 * n))[:, None]
    return (x0 + steps).astype(np.float32)


def _project(x0, points, eps, norm):
    step = points - x0
    if norm == "linf":
        return (x0 + np.clip(step, -eps, eps)).astype(np.float32)
    lengths = np.maximum(np.linalg.norm(step, axis=1, keepdims=True), 1e-30)
    return (x0 + step * np.minimum(1.0, eps / lengths)).astype(np.float32)


def attacked_points(f, rng, x0, eps, norm, start, rounds: int = 25) -> np.ndarray:
    """Zeroth-order search for each output's extremes: random moves from the best points, kept in the ball."""
    found = [start]
    for k in range(N_OUT):
        for sign in (1.0, -1.0):
            best = start[np.argmax(sign * f(start)[:, k])][None]
            for r in range(rounds):
                scale = eps * (0.5 ** (r % 5))
                moves = _project(x0, best + rng.normal(size=(16, x0.shape[1])) * scale, eps, norm)
                values = sign * f(moves)[:, k]
                if values.max() > sign * f(best)[0, k]:
                    best = moves[np.argmax(values)][None]
                found.append(moves)
            found.append(best)
    return np.concatenate(found)


def assert_sound(proto, bound, x0, eps, norm, seed=0):
    model_session, bound_session = Session(proto), Session(bound)
    lower_upper = bound_session.run({"x": x0, "epsilon": np.float32(eps)})
    lower, upper = lower_upper["y_lower"], lower_upper["y_upper"]
    f = lambda points: model_session.run({"x": points})["y"]  # noqa: E731
    rng = np.random.default_rng(seed)
    points = ball_points(rng, x0, eps, norm, 200)
    points = np.concatenate([x0, points, attacked_points(f, rng, x0, eps, norm, points)])
    y = f(points).astype(np.float64)
    # The model's own float32 rounding (the harness's tolerance; certify adds it by graphcert.rounding).
    tolerance = 1e-5 + 1e-5 * np.abs(y)
    assert not np.isnan(lower).any() and not np.isnan(upper).any()
    below, above = y < lower - tolerance, y > upper + tolerance
    assert not below.any() and not above.any(), (
        f"{int(below.sum() + above.sum())} outside: worst {np.max(lower - y):.6g} below, "
        f"{np.max(y - upper):.6g} above")
    return lower, upper


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_crown_bounds_an_ibp_only_op_soundly(op, method):
    for scale in (1.0, 1e3):
        proto = fallback_model(op, scale)
        model = api.load(proto)
        x0 = np.random.default_rng(1).normal(size=(1, N_IN)).astype(np.float32)
        for norm in ("linf", "l2"):
            bound = to_proto(api.bound_graph(model, method, norm=norm))
            assert json.loads(dict((p.key, p.value) for p in bound.metadata_props)["graphcert.fallback"])
            for eps in (0.0, 0.02, 0.3):
                lower, upper = assert_sound(proto, bound, x0, eps, norm)
                if eps == 0.0 and op not in ("Floor", "Round", "Sign", "Mod", "Less", "Equal", "ArgMax", "OneHot",
                                             "Where"):
                    # continuous ops at a point: the bounds close in on the value
                    assert np.all(upper - lower <= 1e-3 * (1 + np.abs(upper))), (upper - lower)


def test_leaf_bounds_are_tighter_than_ibp_where_crown_tightens_the_input():
    """The leaf's interval comes from IBP on CROWN-tightened inputs, and the layers after it are bounded by
    CROWN from the leaf: never looser than IBP on this net, tighter in total."""
    proto = fallback_model("Erf")
    model = api.load(proto)
    x0 = np.random.default_rng(1).normal(size=(1, N_IN)).astype(np.float32)
    feeds = {"x": x0, "epsilon": np.float32(0.3)}
    crown = Session(to_proto(api.bound_graph(model, "crown"))).run(feeds)
    ibp = Session(to_proto(api.bound_graph(model, "ibp"))).run(feeds)
    assert np.all(crown["y_lower"] >= ibp["y_lower"] - 1e-5) and np.all(crown["y_upper"] <= ibp["y_upper"] + 1e-5)
    assert (crown["y_upper"] - crown["y_lower"]).sum() < (ibp["y_upper"] - ibp["y_lower"]).sum()


def test_a_leaf_with_an_infinite_end_makes_only_the_bounds_that_lean_on_it_infinite():
    """Log of a tensor whose interval reaches 0 has a lower end of -inf: coefficients that meet it give -inf,
    the others stay finite (no NaN)."""
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Log", ["a"], ["l"]),
             helper.make_node("ReduceMin", ["l"], ["m"], axes=[1], keepdims=1),   # IBP only
             helper.make_node("Concat", ["m", "x"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "inf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    bound = to_proto(api.bound_graph(api.load(proto), "crown"))
    found = Session(bound).run({"x": np.array([[0.1, 2.0]], np.float32), "epsilon": np.float32(0.5)})
    assert found["y_lower"][0, 0] == -np.inf and np.isfinite(found["y_upper"][0, 0])
    assert np.all(np.isfinite(found["y_lower"][0, 1:])) and not np.isnan(found["y_lower"]).any()


def test_a_multi_output_leaf_at_large_magnitudes():
    """Split's two outputs are leaves of one node; both reach the bound (here their difference, at 1e4)."""
    proto = fallback_model("Split", scale=1e4)
    x0 = np.full((1, N_IN), 3e2, np.float32)
    assert_sound(proto, to_proto(api.bound_graph(api.load(proto), "crown")), x0, 0.5, "linf")


def test_alpha_crown_and_relu_splits_keep_working_with_a_leaf():
    """alpha parameters only for the ReLU (not the leaf); ReLU-split clamps only on ReLU inputs; both graphs run
    and stay sound; alpha-CROWN through the torch executor is never looser than CROWN."""
    from graphcert.alpha import AlphaCrown
    proto = fallback_model("Floor")
    model = api.load(proto)
    alpha = CrownPass(InputSet(), alpha="inputs")(model).model
    units = json.loads(alpha.metadata_props["graphcert.alpha"])
    assert set(units.values()) == {"r"}
    split = to_proto(CrownPass(InputSet(), split_bounds="clamp")(model).model)
    assert json.loads(dict((p.key, p.value) for p in split.metadata_props)["graphcert.splits"]) == ["z"]
    x0 = np.random.default_rng(1).normal(size=(1, N_IN)).astype(np.float32)
    feeds = {"x": x0, "epsilon": np.float32(0.3), SPLIT_LOWER_PREFIX + "z": np.full((1, N_HIDDEN), -np.inf, np.float32),
             SPLIT_UPPER_PREFIX + "z": np.full((1, N_HIDDEN), np.inf, np.float32)}
    plain = Session(to_proto(api.bound_graph(model, "crown"))).run({"x": x0, "epsilon": np.float32(0.3)})
    clamped = Session(split).run(feeds)
    np.testing.assert_allclose(clamped["y_lower"], plain["y_lower"], rtol=1e-6, atol=1e-6)
    optimiser = AlphaCrown(model, "linf", spec=None)
    lower, upper = optimiser.bounds(optimiser.feeds(x=x0, eps=0.3), iterations=10)
    assert np.all(lower >= plain["y_lower"] - 1e-5) and np.all(upper <= plain["y_upper"] + 1e-5)


def test_a_net_with_an_ibp_only_op_certifies_with_crown():
    """HardSigmoid (no CROWN relaxation) in the middle of a classifier: crown certifies its own predictions at a
    small radius, float32 rounding included."""
    proto = fallback_model("HardSigmoid", scale=0.1)
    x = np.random.default_rng(2).normal(size=(8, N_IN)).astype(np.float32)
    labels = Session(proto).run({"x": x})["y"].argmax(axis=1)
    data = Dataset("hard_sigmoid", x, labels.astype(np.int64), None)
    result = certify(api.load(proto), data, eps=0.001, method="crown", clip=False)
    assert result.method == "crown" and result.clean == 8 and result.certified >= 5, result


def test_inspect_says_which_nodes_crown_bounds_through_ibp(tmp_path):
    path = tmp_path / "argmax.onnx"
    onnx.save(fallback_model("OneHot"), path)
    info = describe(path)
    assert info["methods"]["crown"] == [] and info["refused"]["crown"] == {}
    notes = info["fallback"]["crown"]
    assert set(notes) == {n.name for n in api.load(fallback_model("OneHot")).graph
                          if n.op_type in ("ArgMax", "OneHot")}
    assert all(why.startswith("via IBP fallback") for why in notes.values())


def test_what_neither_crown_nor_ibp_bounds_is_refused_with_ibp_reason():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Dropout", ["h", "ratio", "training"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
                                           helper.make_tensor_value_info("training", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                              [_const("w", np.eye(3, dtype=np.float32)), _const("ratio", np.float32(0.5))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(UnsupportedOpError, match="training_mode"):
        api.bound_graph(api.load(proto), "crown")


@pytest.mark.parametrize("name", ["torch_attention", "torch_cnn", "torch_layernorm"])
def test_inspect_reports_per_node_what_the_crown_table_says(name, tmp_path):
    """inspect's CROWN refusals and fallback notes are the table's verdicts (crown_support.RULES, then IBP's)."""
    proto = (zoo.ZOO.get(name) or zoo.ATTENTION_ZOO[name])()
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)
    info = describe(path)
    model = api.load(proto)
    sources = perturbed_inputs(model)
    nodes = perturbed_nodes(model.graph, set(sources))
    tainted = set(sources) | {out for node in nodes for out in node.outputs}
    found = crown_support.fallbacks(model, nodes, "crown", sources, tainted)
    assert info["refused"]["crown"] == {}
    assert info.get("fallback", {}).get("crown", {}) == {node.name: why for node, why in found.items()}
    if name == "torch_attention":
        assert any("One perturbed operand" in why for why in found.values())


@pytest.mark.parametrize("op", ["Erf", "Gather", "Split"])
def test_training_graphs_with_a_leaf_run_on_torch_and_send_gradients_to_every_weight(op):
    """CROWN-IBP training graphs with a leaf: the torch executor agrees with onnxruntime and the width's
    gradient reaches the weights before and after the leaf (the leaf's interval depends on them)."""
    import torch
    from graphcert.torch_exec import TorchGraph
    graph = CrownPass(InputSet("linf"), intermediate="ibp", trainable=True)(api.load(fallback_model(op))).model
    executor = TorchGraph(graph, trainable=True)
    x = np.random.default_rng(0).normal(size=(2, N_IN)).astype(np.float32)
    found = executor({"x": torch.tensor(x), "epsilon": torch.tensor(0.1)}, outputs=["y_lower", "y_upper"])
    (found["y_upper"] - found["y_lower"]).sum().backward()
    want = Session(to_proto(graph)).run({"x": x, "epsilon": np.float32(0.1)})
    np.testing.assert_allclose(found["y_lower"].detach().numpy(), want["y_lower"], rtol=1e-5, atol=1e-5)
    for name in ("w1", "w2", "w3"):
        assert executor.parameter(name).grad is not None and executor.parameter(name).grad.abs().sum() > 0
