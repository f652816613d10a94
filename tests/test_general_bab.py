"""alpha slopes (tangent points) of S-shaped activations and branch and bound on their input intervals."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphcert.builder import Builder
from graphcert.export import to_proto
from graphcert.interval import Interval
from graphcert.passes import relaxations
from graphcert.runtime import Session
from test_relu_split import crown_upper_bound, write_box_property

S_SHAPED = {"Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "Tanh": np.tanh}


def tangent_lines_model(op: str) -> onnx.ModelProto:
    """A graph from (l, u, alpha) to the lines `Lines.tangent_lines` gives for alpha on [l, u]."""
    vector = ir.TensorType(ir.DataType.FLOAT)
    inputs = [ir.Value(name=n, type=vector, shape=ir.Shape(["n"])) for n in ("l", "u", "alpha")]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 17}, name="tangent_lines")
    b = Builder(graph)
    node = ir.Node("", op, [inputs[0]])
    lines = relaxations.relax(b, node, Interval.from_bounds(b, inputs[0], inputs[1]))
    found = lines.tangent_lines(inputs[2]) + (lines.adaptive_alpha,)
    zero = b.op("Mul", inputs[0], b.const(0.0))
    for name, value in zip(("lower_slope", "lower_intercept", "upper_slope", "upper_intercept", "start"), found):
        named = b.op("Add", value, zero)
        named.name, named.type, named.shape = name, vector, ir.Shape(["n"])
        graph.outputs.append(named)
    return to_proto(ir.Model(graph, ir_version=10))


def random_intervals(rng, count: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.uniform(-scale, scale, count)
    widths = np.exp(rng.uniform(np.log(1e-5), np.log(4 * scale), count))
    lower = np.concatenate([centers - widths / 2, [0, -3, 0, -1e4, -50]])
    upper = np.concatenate([centers + widths / 2, [0, 3, 5, 1e4, -49]])
    return lower.astype(np.float32), upper.astype(np.float32)


@pytest.mark.parametrize("op", sorted(S_SHAPED))
@pytest.mark.parametrize("scale", [1.0, 8.0, 1e3])
def test_tangent_lines_are_sound_for_every_parameter(op, scale):
    """Random parameters, also outside [0, 1] (the graph clamps them): both lines bound f on [l, u]."""
    rng = np.random.default_rng(7)
    lower, upper = random_intervals(rng, 2000, scale)
    session = Session(tangent_lines_model(op))
    f = S_SHAPED[op]
    x = lower[:, None] + (upper - lower)[:, None].astype(np.float64) * np.linspace(0, 1, 65)[None]
    y = f(x)
    for alpha in (rng.uniform(-0.5, 1.5, len(lower)), np.zeros(len(lower)), np.ones(len(lower))):
        out = session.run({"l": lower, "u": upper, "alpha": alpha.astype(np.float32)})
        below = out["lower_slope"][:, None].astype(np.float64) * x + out["lower_intercept"][:, None]
        above = out["upper_slope"][:, None].astype(np.float64) * x + out["upper_intercept"][:, None]
        assert np.isfinite(below).all() and np.isfinite(above).all()
        tolerance = 1e-6 * (1 + np.abs(x) * np.abs(out["upper_slope"][:, None]))
        assert (below <= y + tolerance).all(), op
        assert (above >= y - tolerance).all(), op


@pytest.mark.parametrize("op", sorted(S_SHAPED))
def test_starting_parameter_gives_the_plain_lines(op):
    """alpha-CROWN starts where CROWN is (its result is then never looser)."""
    rng = np.random.default_rng(3)
    lower, upper = random_intervals(rng, 500, 6.0)
    start = Session(tangent_lines_model(op)).run({"l": lower, "u": upper, "alpha": np.zeros_like(lower)})["start"]
    tuned = Session(tangent_lines_model(op)).run({"l": lower, "u": upper, "alpha": start})
    vector = ir.TensorType(ir.DataType.FLOAT)
    inputs = [ir.Value(name=n, type=vector, shape=ir.Shape(["n"])) for n in ("l", "u")]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 17}, name="plain_lines")
    b = Builder(graph)
    lines = relaxations.relax(b, ir.Node("", op, [inputs[0]]), Interval.from_bounds(b, inputs[0], inputs[1]))
    zero = b.op("Mul", inputs[0], b.const(0.0))
    for name in ("lower_slope", "lower_intercept", "upper_slope", "upper_intercept"):
        named = b.op("Add", getattr(lines, name), zero)
        named.name, named.type, named.shape = name, vector, ir.Shape(["n"])
        graph.outputs.append(named)
    plain = Session(to_proto(ir.Model(graph, ir_version=10))).run({"l": lower, "u": upper})
    for name, value in plain.items():
        np.testing.assert_allclose(tuned[name], value, rtol=1e-5, atol=1e-6)   # l + (u - l)/2 vs (l + u)/2


def activation_network(widths: list[int], activation: str, seed: int, scale: float = 1.0,
                       batch: int | str = 1) -> tuple[onnx.ModelProto, list]:
    """An MLP x [batch, widths[0]] -> y with `activation` (or a list, one per hidden layer) between layers,
    weights times `scale`; and its layers for a float64 reference."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(seed)
    layers = [((rng.normal(size=(a, b)) * scale / np.sqrt(a)).astype(np.float32),
               (rng.normal(size=b) * 0.3 * scale).astype(np.float32)) for a, b in zip(widths[:-1], widths[1:])]
    kinds = activation if isinstance(activation, list) else [activation] * (len(layers) - 1)
    nodes, inits, x = [], [], "x"
    for k, (w, bias) in enumerate(layers):
        inits += [onnx.numpy_helper.from_array(w, f"w{k}"), onnx.numpy_helper.from_array(bias, f"b{k}")]
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]),
                  helper.make_node("Add", [f"m{k}", f"b{k}"], [f"z{k}"])]
        x = f"z{k}"
        if k < len(layers) - 1:
            nodes.append(helper.make_node(kinds[k], [x], [f"a{k}"]))
            x = f"a{k}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, widths[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), (layers, kinds)


ACTIVATIONS = {"Sigmoid": S_SHAPED["Sigmoid"], "Tanh": np.tanh, "Relu": lambda v: np.maximum(v, 0)}


def forward(network, x: np.ndarray) -> np.ndarray:
    """The network in float64."""
    layers, kinds = network
    h = x.astype(np.float64)
    for k, (w, bias) in enumerate(layers):
        h = h @ w + bias
        if k < len(layers) - 1:
            h = ACTIVATIONS[kinds[k]](h)
    return h


def attacked_outputs(network, x0: np.ndarray, eps: float, norm: str, rng) -> np.ndarray:
    """Outputs at random points of the ball (inside and on its surface) and after sign-gradient (linf) or
    gradient (L2) steps towards each output's minimum and maximum, in float64 through torch."""
    import torch
    layers, kinds = network
    activations = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}

    def run(x):
        h = x
        for k, (w, bias) in enumerate(layers):
            h = h @ torch.as_tensor(w, dtype=torch.float64) + torch.as_tensor(bias, dtype=torch.float64)
            if k < len(layers) - 1:
                h = activations[kinds[k]](h)
        return h

    def project(x):
        step = x - x0
        if norm == "linf":
            return x0 + step.clamp(-eps, eps)
        length = step.norm(dim=1, keepdim=True).clamp(min=1e-30)
        return x0 + step * torch.clamp(eps / length, max=1.0)

    n = x0.shape[1]
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    direction = torch.as_tensor(rng.normal(size=(256, n)))
    if norm == "linf":
        starts = x0 + eps * torch.sign(direction) * torch.as_tensor(rng.uniform(0, 1, size=(256, 1)))
    else:
        starts = x0 + eps * direction / direction.norm(dim=1, keepdim=True) * torch.as_tensor(rng.uniform(0, 1, (256, 1)))
    found = [run(starts).detach().numpy()]
    outputs = run(x0).shape[1]
    for target in range(outputs):
        for sign in (1.0, -1.0):
            x = starts[:16].clone().requires_grad_(True)
            for _ in range(20):
                value = sign * run(x)[:, target].sum()
                grad, = torch.autograd.grad(value, x)
                with torch.no_grad():
                    move = torch.sign(grad) if norm == "linf" else grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-30)
                    x = project(x + 0.25 * eps * move).requires_grad_(True)
            found.append(run(x).detach().numpy())
    return np.concatenate(found)


@pytest.mark.parametrize("activation", ["Sigmoid", "Tanh", ["Tanh", "Relu", "Sigmoid"]], ids=str)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_alpha_crown_with_tangent_points_is_sound_and_tighter(activation, norm, scale):
    """alpha-CROWN's bounds with tuned tangent points hold on sampled and attacked points of the ball, in
    both norms and at large weights (saturated units), and are never looser than CROWN's."""
    from graphcert.alpha import AlphaCrown
    proto, network = activation_network([6, 24, 24, 24, 3], activation, seed=11, scale=scale)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, size=(1, 6)).astype(np.float32)
    eps = 0.3 if norm == "linf" else 0.6
    bounder = AlphaCrown(proto, "linf", norm=norm, crown_upper=True)
    assert bounder.units, "the S-shaped units have tangent-point parameters"
    feeds = bounder.feeds(x=x0, eps=np.float32(eps))
    plain = bounder.bounds(feeds, iterations=0)
    tuned = bounder.bounds(feeds, iterations=25, lr=0.2)
    assert (tuned[0] >= plain[0]).all() and (tuned[1] <= plain[1]).all()
    if scale == 1.0:
        assert (tuned[1] - tuned[0]).sum() < 0.99 * (plain[1] - plain[0]).sum()
    outputs = attacked_outputs(network, x0, eps, norm, rng)
    slack = 1e-4 * (1 + np.abs(outputs))
    assert (outputs >= tuned[0] - slack).all() and (outputs <= tuned[1] + slack).all()


@pytest.mark.parametrize("activation", ["Sigmoid", "Tanh", ["Tanh", "Sigmoid"]], ids=str)
def test_splitting_s_shaped_units_proves_what_crown_cannot(tmp_path, activation):
    """y_0 < t on [-1, 1]^2 with the true maximum from a dense grid: with t 90 % of the way from it to
    CROWN's bound the property holds (CROWN alone cannot tell) and splitting the units' intervals proves it;
    just below the maximum it is violated, never holds."""
    from graphcert.verify import verify
    proto, network = activation_network([2, 16, 16, 2], activation, seed=4, scale=2.0, batch="N")
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 401), np.linspace(-1, 1, 401)), -1).reshape(-1, 2)
    outputs = forward(network, grid)[:, 0]
    top = float(outputs.max())
    # Between grid points y_0 moves by at most its gradient's L1 norm times half the spacing.
    steepest = max(np.abs(np.diff(outputs.reshape(401, 401), axis=a)).max() for a in (0, 1))
    gap = crown_upper_bound(proto, 2) - top
    assert gap > 0.1 and 4 * steepest < 0.1 * gap, (gap, steepest)
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, 2, -1, 1, f"(>= Y_0 {top + 0.9 * gap})", 2)
    result = verify(model, spec, timeout=20, method="crown", branching="relus", rounding="real")
    assert result.status == "holds" and result.boxes > 1, result.reason
    write_box_property(spec, 2, -1, 1, f"(>= Y_0 {top - 0.02})", 2)
    assert verify(model, spec, timeout=5, method="crown", branching="relus", rounding="real").status == "violated"


@pytest.mark.parametrize("seed", range(3))
def test_splitting_never_proves_a_property_with_a_counterexample_attacks_miss(tmp_path, seed):
    """The largest of 200,000 sampled outputs minus 1e-4: a violation confined to a tiny region. Whatever the
    search over S-shaped units answers, it must not be `holds`."""
    from graphcert.verify import verify
    proto, network = activation_network([3, 12, 12, 2], ["Sigmoid", "Tanh"], seed=20 + seed, scale=2.0, batch="N")
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    points = np.random.default_rng(seed).uniform(-1, 1, size=(200000, 3))
    top = float(forward(network, points)[:, 0].max())
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, 3, -1, 1, f"(>= Y_0 {top - 1e-4})", 2)
    assert verify(model, spec, timeout=3, method="crown", branching="relus", rounding="real").status != "holds"


def test_root_plateau_stops_once_every_box_is_proved_or_flat():
    """The root's extra alpha steps on S-shaped nets end once every box's weakest conjunct bound is positive
    or gains under ROOT_PLATEAU[1] of its distance to 0 over ROOT_PLATEAU[0] steps, not while one still gains."""
    from graphcert.verify.relu_bab import ROOT_PLATEAU
    from graphcert.verify.s_shaped import RootPlateau
    window, share = ROOT_PLATEAU
    flat = RootPlateau(lambda low: low, window, share)
    assert not any(flat(np.array([-10.0, -1.0 + 0.2 * share * k / window])) for k in range(window))
    assert flat(np.array([-10.0, -1.0 + 0.2 * share]))           # both gained under the share: flat
    gaining = RootPlateau(lambda low: low, window, share)
    found = [gaining(np.array([-10.0 + 0.2 * k, 1.0])) for k in range(3 * window)]
    assert not any(found)                                         # box 0 gains 2 per window at |-4| to |-10|
    proved = RootPlateau(lambda low: low, window, share)
    found = [proved(np.array([-1.0 + 0.1 * k, 0.5])) for k in range(3 * window)]
    assert found[-1] and not found[window]                        # box 0 crosses 0 at step 10
