"""ReLU branch and bound: the CROWN pass's split clamps, and verify's search over ReLU splits.

Clamps of -inf / +inf reproduce CROWN; clamped bounds hold for every sampled input that meets the clamps;
the search never proves a violated property and proves true ones that CROWN alone cannot.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.model import load
from graphcert.passes.crown import (CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX, SPLIT_LOWER_PREFIX,
                                    SPLIT_UPPER_PREFIX, CrownPass)
from graphcert.passes.spec import SpecPass
from graphcert.runtime import Session


def relu_network(widths: list[int], seed: int, activation: str = "Relu", batch=1
                 ) -> tuple[onnx.ModelProto, list[tuple[np.ndarray, np.ndarray]]]:
    """A batched MLP x [batch, widths[0]] -> ... -> y [batch, widths[-1]] with `activation` units (ReLUs by
    default) between layers, and its weights."""
    rng = np.random.default_rng(seed)
    layers = [((rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32), (rng.normal(size=b) * 0.3).astype(np.float32))
              for a, b in zip(widths[:-1], widths[1:])]
    nodes, inits, x = [], [], "x"
    for k, (w, bias) in enumerate(layers):
        inits += [onnx.numpy_helper.from_array(w, f"w{k}"), onnx.numpy_helper.from_array(bias, f"b{k}")]
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]), helper.make_node("Add", [f"m{k}", f"b{k}"], [f"z{k}"])]
        x = f"z{k}"
        if k < len(layers) - 1:
            nodes.append(helper.make_node(activation, [x], [f"r{k}"]))
            x = f"r{k}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, widths[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), layers


def pre_activations(layers, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The inputs of every ReLU and the output, in float64."""
    found, h = [], x.astype(np.float64)
    for k, (w, bias) in enumerate(layers):
        h = h @ w + bias
        if k < len(layers) - 1:
            found.append(h)
            h = np.maximum(h, 0)
    return found, h


SPEC = np.array([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=np.float32)


def sessions(proto):
    spec = SpecPass(SPEC, None)(load(proto)).model
    plain = CrownPass(InputSet("box"))(spec).model
    split = CrownPass(InputSet("box"), split_bounds="clamp")(spec).model
    return Session(to_proto(plain)), Session(to_proto(split)), json.loads(split.metadata_props["graphcert.splits"])


def box_feeds(lower: np.ndarray, upper: np.ndarray) -> dict:
    return {"x_lower": lower.astype(np.float32), "x_upper": upper.astype(np.float32)}


def open_clamps(units: list[str], widths: list[int], batch: int) -> dict:
    feeds = {}
    for name, width in zip(units, widths):
        feeds[SPLIT_LOWER_PREFIX + name] = np.full((batch, width), -np.inf, dtype=np.float32)
        feeds[SPLIT_UPPER_PREFIX + name] = np.full((batch, width), np.inf, dtype=np.float32)
    return feeds


def test_open_clamps_reproduce_crown():
    widths = [4, 12, 10, 3]
    proto, _ = relu_network(widths, seed=1)
    plain, split, units = sessions(proto)
    assert len(units) == 2
    rng = np.random.default_rng(0)
    center = rng.uniform(-1, 1, size=(5, 4))
    lower, upper = center - 0.4, center + 0.4
    expected = plain.run(box_feeds(lower, upper))
    found = split.run({**box_feeds(lower, upper), **open_clamps(units, widths[1:-1], 5)})
    for name in ("margins_lower", "margins_upper", "y_lower", "y_upper", "margins"):
        np.testing.assert_array_equal(found[name], expected[name])


@pytest.mark.parametrize("seed", range(6))
def test_clamped_bounds_hold_on_inputs_meeting_the_clamps(seed):
    widths = [3, 10, 10, 3]
    proto, layers = relu_network(widths, seed=seed)
    _, split, units = sessions(proto)
    rng = np.random.default_rng(seed)
    domains = 6
    center = rng.uniform(-1, 1, size=3)
    lower, upper = np.tile(center - 0.6, (domains, 1)), np.tile(center + 0.6, (domains, 1))
    feeds = {**box_feeds(lower, upper), **open_clamps(units, widths[1:-1], domains)}
    points = rng.uniform(center - 0.6, center + 0.6, size=(20000, 3)).astype(np.float32)
    hidden, y = pre_activations(layers, points)
    # Each domain fixes 3 units per layer active or inactive: odd domains as at some sampled point (so that
    # inputs meet them), even ones at random (often infeasible).
    for d in range(domains):
        anchor = rng.integers(len(points))
        for name, z in zip(units, hidden):
            chosen = rng.choice(10, size=3, replace=False)
            active = z[anchor, chosen] >= 0 if d % 2 else rng.random(3) < 0.5
            feeds[SPLIT_LOWER_PREFIX + name][d, chosen[active]] = 0.0
            feeds[SPLIT_UPPER_PREFIX + name][d, chosen[~active]] = 0.0
    out = split.run(feeds)
    margins = y @ SPEC.T.astype(np.float64)
    tolerance = 1e-4
    met_somewhere = 0
    for d in range(domains):
        meets = np.ones(len(points), dtype=bool)
        for name, z in zip(units, hidden):
            meets &= (z >= feeds[SPLIT_LOWER_PREFIX + name][d]).all(axis=1)
            meets &= (z <= feeds[SPLIT_UPPER_PREFIX + name][d]).all(axis=1)
        empty = any((out[CLAMPED_LOWER_PREFIX + name][d] > out[CLAMPED_UPPER_PREFIX + name][d] + tolerance).any()
                    for name in units)
        if empty:
            assert not meets.any(), "a domain with crossed clamped bounds has inputs meeting its clamps"
            continue
        met_somewhere += meets.any()
        assert (margins[meets] >= out["margins_lower"][d] - tolerance).all()
        assert (margins[meets] <= out["margins_upper"][d] + tolerance).all()
        for name, z in zip(units, hidden):
            assert (z[meets] >= out[CLAMPED_LOWER_PREFIX + name][d] - tolerance).all()
            assert (z[meets] <= out[CLAMPED_UPPER_PREFIX + name][d] + tolerance).all()
    assert met_somewhere >= domains // 2


def test_fixing_every_unit_makes_the_margins_exact():
    """With every ReLU decided as at a point's own pattern, the network is affine on the domain: the margin
    bounds over a tiny box around the point shrink to (nearly) the point's margins."""
    widths = [3, 8, 8, 3]
    proto, layers = relu_network(widths, seed=7)
    _, split, units = sessions(proto)
    point = np.array([0.2, -0.1, 0.3])
    hidden, y = pre_activations(layers, point[None])
    feeds = {**box_feeds(point[None] - 1e-3, point[None] + 1e-3), **open_clamps(units, widths[1:-1], 1)}
    for name, z in zip(units, hidden):
        feeds[SPLIT_LOWER_PREFIX + name][z >= 0] = 0.0
        feeds[SPLIT_UPPER_PREFIX + name][z < 0] = 0.0
    out = split.run(feeds)
    margins = y @ SPEC.T.astype(np.float64)
    assert (out["margins_lower"] <= margins + 1e-4).all()
    assert (out["margins_lower"] >= margins - 0.05).all()


def write_box_property(path, n_inputs: int, lower: float, upper: float, output_constraint: str, n_outputs: int):
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_inputs))
    text += "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_outputs))
    text += "".join(f"(assert (>= X_{i} {lower}))\n(assert (<= X_{i} {upper}))\n" for i in range(n_inputs))
    path.write_text(text + f"(assert {output_constraint})\n")


def y0_above_y1_search(tmp_path, proto):
    """(network, search, clamp split graph) of the 3-input model `proto` with the property y0 >= y1 over
    [-1, 1]^3, in real arithmetic."""
    import time

    from graphcert.verify.bounds import SplitBounds
    from graphcert.verify.network import Network
    from graphcert.verify.search import Search
    from graphcert.vnnlib import load_property
    onnx.save(proto, tmp_path / "m.onnx")
    write_box_property(tmp_path / "p.vnnlib", 3, -1, 1, "(>= Y_0 Y_1)", 2)
    network = Network(tmp_path / "m.onnx")
    search = Search(load_property(tmp_path / "p.vnnlib"), network, time.monotonic() + 60, rounding="real")
    return network, search, SplitBounds(network, search.matrix, search.offset, "clamp")


def crown_upper_bound(proto, n_inputs: int) -> float:
    """Plain CROWN's bound of max y_0 over [-1, 1]^n."""
    session = Session(to_proto(CrownPass(InputSet("box"))(load(proto)).model))
    box = box_feeds(-np.ones((1, n_inputs)), np.ones((1, n_inputs)))
    return float(session.run(box)["y_upper"][0, 0])


def above_the_grid_maximum(tmp_path, widths: list[int], seed: int):
    """A 2-input ReLU net saved to tmp_path, the maximum `top` of y_0 over a 301 x 301 grid of [-1, 1]^2 and
    the `gap` from it to CROWN's upper bound (at least 0.1): (model path, spec path, top, gap). A property
    y_0 >= top + f·gap (f in (0, 1)) holds where CROWN alone cannot tell; top - 0.02 is violated."""
    proto, layers = relu_network(widths, seed)
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 301), np.linspace(-1, 1, 301)), -1).reshape(-1, 2)
    top = float(pre_activations(layers, grid)[1][:, 0].max())
    gap = crown_upper_bound(proto, 2) - top
    assert gap > 0.1
    return model, tmp_path / "p.vnnlib", top, gap


@pytest.mark.parametrize("seed", range(2))
def test_relu_splitting_proves_what_crown_cannot_and_never_proves_a_violation(tmp_path, seed):
    """y_0 < t on [-1, 1]^2 with the true maximum from a dense grid: with t 70 % of the way from it to
    CROWN's bound the property holds (CROWN alone cannot tell); just below the maximum it is violated."""
    from graphcert.verify import verify
    model, spec, top, gap = above_the_grid_maximum(tmp_path, [2, 16, 16, 2], seed)
    write_box_property(spec, 2, -1, 1, f"(>= Y_0 {top + 0.7 * gap})", 2)
    # The clock includes importing torch on first use (8 s under a load of 11).
    result = verify(model, spec, timeout=30, method="crown", branching="relus")
    assert result.status == "holds" and result.boxes > 1
    write_box_property(spec, 2, -1, 1, f"(>= Y_0 {top - 0.02})", 2)
    assert verify(model, spec, timeout=5, method="crown", branching="relus").status == "violated"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("beta", ["default", None])
def test_relu_splitting_never_proves_a_property_with_a_counterexample_attacks_miss(tmp_path, seed, beta):
    """A spike: a violation confined to a tiny region that sampling and PGD rarely find. Whatever the
    search answers (with β-CROWN multipliers, by default, or clamps alone), it must not be `holds`."""
    from graphcert.verify import verify
    options = {} if beta == "default" else {"beta": None}
    proto, layers = relu_network([3, 12, 12, 2], seed + 10 * (2 if beta == "default" else 1))
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    points = np.random.default_rng(seed).uniform(-1, 1, size=(200000, 3))
    top = float(pre_activations(layers, points)[1][:, 0].max())
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, 3, -1, 1, f"(>= Y_0 {top - 1e-4})", 2)
    assert verify(model, spec, timeout=3, method="crown", branching="relus", **options).status != "holds"


def test_a_wide_input_branches_on_relus(tmp_path):
    """Beyond BRANCH_DIMENSIONS inputs the search splits ReLUs: a true property CROWN cannot prove at the
    root is proved."""
    from graphcert.verify import BRANCH_DIMENSIONS, verify
    n = BRANCH_DIMENSIONS + 6
    proto, layers = relu_network([n, 16, 16, 2], seed=5)
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    points = np.random.default_rng(0).uniform(-1, 1, size=(20000, n))
    sampled = float(pre_activations(layers, points)[1][:, 0].max())
    bound = crown_upper_bound(proto, n)
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, n, -1, 1, f"(>= Y_0 {sampled + 0.9 * (bound - sampled)})", 2)
    result = verify(model, spec, timeout=10, method="crown")
    assert result.status == "holds" and result.boxes > 1


def test_a_wide_network_without_relus_is_unknown(tmp_path):
    """Nothing to split: y_0 reaches t only at a corner of the box, so the answer is violated (if the attack
    finds that corner) or unknown, never holds."""
    from graphcert.verify import BRANCH_DIMENSIONS, verify
    n = BRANCH_DIMENSIONS + 1
    proto, _ = relu_network([n, 2], seed=0)
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    w, bias = relu_network([n, 2], seed=0)[1][0]
    top = float(np.abs(w[:, 0]).sum() + bias[0])
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, n, -1, 1, f"(>= Y_0 {top})", 2)
    assert verify(model, spec, timeout=2, method="crown").status in ("unknown", "violated")


def test_look_ahead_split_is_at_least_as_good_as_the_first_choice(tmp_path):
    """Filtered smart branching (`_look_ahead`): on split domains of a 3-24-24-24-2 network, the chosen unit's
    weaker child (bounded on the parent's unit bounds) is never below the first choice's, is better for some
    domain, and the chosen units are unstable ReLUs of the domain."""
    from graphcert.verify import relu_bab
    proto, layers = relu_network([3, 24, 24, 24, 2], seed=7)
    network, search, clamp = y0_above_y1_search(tmp_path, proto)
    rng = np.random.default_rng(0)
    centers = rng.uniform(-0.7, 0.7, size=(12, 3))
    lower, upper = centers - 0.3, centers + 0.3
    bab = relu_bab.ReluSplitSearch(search, clamp, lower, upper, beta=None)
    unbounded = np.full((len(lower), clamp.units), np.inf, dtype=np.float32)
    margins, unit_lower, unit_upper = clamp(lower, upper, -unbounded, unbounded)
    parents = bab._live_domains(np.arange(len(lower)), np.ones((len(lower), 1), bool), unit_lower, unit_upper,
                                np.zeros(unit_lower.shape, np.int8), margins.astype(np.float64),
                                np.zeros((len(lower), 0), np.float32))
    assert len(parents) >= 4 and (parents.unit >= 0).all()
    chosen = bab._look_ahead(parents)
    rows = np.arange(len(parents))
    assert clamp.relu[chosen].all()
    assert ((parents.unit_lower[rows, chosen] < 0) & (parents.unit_upper[rows, chosen] > 0)).all()
    weaker = bab._weaker_child(parents, np.stack([parents.unit, chosen], axis=1))
    assert (weaker[:, 1] >= weaker[:, 0] - 1e-6).all()
    assert (weaker[:, 1] > weaker[:, 0] + 1e-4).any()


@pytest.mark.parametrize("seed", range(3))
def test_bounding_some_units_keeps_the_clamped_bounds_of_the_rest(seed):
    """`intermediate_rows`: the picked units of each layer get the same CROWN bounds as in the full graph when
    the clamps hold the full graph's bounds (so alpha-CROWN can leave the stable units out); with open clamps
    the units not picked keep IBP's interval, looser but still holding on every sampled input."""
    widths = [3, 12, 12, 12, 3]
    proto, layers = relu_network(widths, seed=seed)
    spec = SpecPass(SPEC, None)(load(proto)).model
    _, full, units = sessions(proto)
    rng = np.random.default_rng(seed)
    center = rng.uniform(-1, 1, size=(4, 3))
    lower, upper = center - 0.5, center + 0.5
    found = full.run({**box_feeds(lower, upper), **open_clamps(units, widths[1:-1], 4)})
    unstable = {name: np.flatnonzero(((found[CLAMPED_LOWER_PREFIX + name] < 0)
                                      & (found[CLAMPED_UPPER_PREFIX + name] > 0)).any(axis=0)) for name in units}
    assert 0 < sum(len(rows) for rows in unstable.values()) < sum(widths[1:-1])
    picked = Session(to_proto(CrownPass(InputSet("box"), split_bounds="clamp",
                                        intermediate_rows=unstable)(spec).model))
    clamps = {}
    for name in units:
        clamps[SPLIT_LOWER_PREFIX + name] = found[CLAMPED_LOWER_PREFIX + name]
        clamps[SPLIT_UPPER_PREFIX + name] = found[CLAMPED_UPPER_PREFIX + name]
    again = picked.run({**box_feeds(lower, upper), **clamps})
    for name in ["margins_lower"] + [p + n for n in units for p in (CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX)]:
        np.testing.assert_allclose(again[name], found[name], rtol=1e-5, atol=1e-5)
    # Open clamps: only IBP for the units left out
    loose = picked.run({**box_feeds(lower, upper), **open_clamps(units, widths[1:-1], 4)})
    assert (loose["margins_lower"] <= found["margins_lower"] + 1e-5).all()
    for box in range(4):
        points = rng.uniform(lower[box], upper[box], size=(20000, 3))
        hidden, y = pre_activations(layers, points)
        margins = y @ SPEC.T.astype(np.float64)
        assert (margins >= loose["margins_lower"][box] - 1e-4).all()
        for name, z in zip(units, hidden):
            assert (z >= loose[CLAMPED_LOWER_PREFIX + name][box] - 1e-4).all()
            assert (z <= loose[CLAMPED_UPPER_PREFIX + name][box] + 1e-4).all()
