"""ReLU branch and bound on the parent's unit bounds: alpha-CROWN's bounds of every unit input at the root
(`AlphaUnitBounds`), which children inherit, hold on sampled and attacked points and are tighter than CROWN's;
the search bounding children on them proves what CROWN cannot and never proves a violated property.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from graphcert.alpha import AlphaSettings
from test_relu_split import (above_the_grid_maximum, pre_activations, relu_network,
                             write_box_property, y0_above_y1_search)

TOLERANCE = 1e-4


def scaled_network(widths, seed: int, scale: float):
    """relu_network with every weight matrix times `scale` (biases too: the units stay unstable)."""
    proto, layers = relu_network(widths, seed)
    layers = [(w * np.float32(scale), bias * np.float32(scale)) for w, bias in layers]
    for init in proto.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * np.float32(scale), init.name))
    return proto, layers


def attacked_unit_extremes(layers, lower, upper, rng, starts: int = 8, steps: int = 80):
    """Per hidden unit (flattened over layers), the smallest and largest input z that projected sign-gradient
    descent finds in the box [lower, upper] (one row), in float64."""
    weights = [(torch.tensor(w, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)) for w, b in layers]
    widths = [w.shape[1] for w, _ in layers[:-1]]
    units = sum(widths)
    lo, hi = torch.tensor(lower), torch.tensor(upper)
    # [2 directions, units, starts, n]: each unit's own points
    x = torch.tensor(rng.uniform(lower, upper, size=(2, units, starts, len(lower))), requires_grad=True)
    direction = torch.tensor([1.0, -1.0], dtype=torch.float64)[:, None, None]
    step = 0.05 * (hi - lo)

    def all_z(points):
        found, h = [], points
        for index, (w, bias) in enumerate(weights[:-1]):
            h = h @ w + bias
            found.append(h)
            h = torch.relu(h)
        return torch.cat(found, dim=-1)     # [..., units]

    for k in range(steps):
        z = torch.diagonal(all_z(x), dim1=1, dim2=3)      # [2, starts, units]: unit u at its own points
        grad, = torch.autograd.grad((direction.squeeze(-1)[:, :, None] * z).sum(), x)
        with torch.no_grad():
            x -= step * (0.97 ** k) * grad.sign()
            x.copy_(torch.max(torch.min(x, hi), lo))
    with torch.no_grad():
        z = torch.diagonal(all_z(x), dim1=1, dim2=3)
    return z[0].min(dim=0).values.numpy(), z[1].max(dim=0).values.numpy()


def float32_ulps(lower, upper, count: int = 4):
    """A few float32 units in the last place of the larger end of each interval (torch and onnxruntime round
    the same bound differently)."""
    return count * np.spacing(np.maximum(np.abs(lower), np.abs(upper)).astype(np.float32))


def assert_hold_on_sampled_and_attacked_points(layers, search, lower, upper, margins, unit_lower, unit_upper, rng):
    """Per box: every unit input z at 20,000 sampled points and at the attacked extremes lies within the unit
    bounds, and the sampled margins are above their lower bounds (float32 bounds of values up to ~scale^3:
    relative tolerance)."""
    for box in range(len(lower)):
        tolerance = TOLERANCE + 1e-5 * np.maximum(np.abs(unit_lower[box]), np.abs(unit_upper[box]))
        points = rng.uniform(lower[box], upper[box], size=(20000, lower.shape[1]))
        hidden, y = pre_activations(layers, points)
        z = np.concatenate(hidden, axis=1)
        low_found, high_found = attacked_unit_extremes(layers, lower[box], upper[box], rng)
        assert (np.minimum(z.min(axis=0), low_found) >= unit_lower[box] - tolerance).all()
        assert (np.maximum(z.max(axis=0), high_found) <= unit_upper[box] + tolerance).all()
        margin = y @ search.matrix.T.astype(np.float64) + search.offset
        assert (margin.min(axis=0) >= margins[box] - TOLERANCE - 1e-5 * np.abs(margins[box])).all()


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_root_alpha_unit_bounds_hold_and_tighten_crown(tmp_path, scale):
    from graphcert.verify.bounds import AlphaUnitBounds
    widths = [3, 16, 16, 16, 2]
    proto, layers = scaled_network(widths, seed=3, scale=scale)
    network, search, clamp = y0_above_y1_search(tmp_path, proto)
    rng = np.random.default_rng(0)
    centers = rng.uniform(-0.5, 0.5, size=(3, 3))
    lower, upper = centers - 0.5, centers + 0.5
    unbounded = np.full((len(lower), clamp.units), np.inf, dtype=np.float32)
    crown_margins, crown_lower, crown_upper = clamp(lower, upper, -unbounded, unbounded)
    bounder = AlphaUnitBounds(network, search.matrix, search.offset, clamp, AlphaSettings(iterations=30))
    margins, unit_lower, unit_upper = bounder(lower, upper, stop=None)
    assert unit_lower.shape == crown_lower.shape == (len(lower), clamp.units)
    # Never looser than CROWN's (up to float32 rounding: torch computes what onnxruntime computed for CROWN),
    # tighter somewhere (the intermediate passes' slopes are optimised)
    ulps = float32_ulps(crown_lower, crown_upper)
    assert (unit_lower >= crown_lower - ulps).all() and (unit_upper <= crown_upper + ulps).all()
    assert (margins >= crown_margins - TOLERANCE - 1e-5 * np.abs(crown_margins)).all()
    gain = (unit_upper - unit_lower) / np.maximum(crown_upper - crown_lower, 1e-9)
    assert (gain < 0.99).any()
    assert_hold_on_sampled_and_attacked_points(layers, search, lower, upper, margins, unit_lower, unit_upper, rng)


@pytest.mark.parametrize("reuse", [True, False])
def test_children_on_parent_bounds_prove_and_never_prove_a_violation(tmp_path, monkeypatch, reuse):
    """y_0 < t on [-1, 1]^2 (a 2-16-16-16-2 net), t 80 % of the way from the grid maximum to CROWN's bound:
    proved by splitting, children bounded on their parent's unit bounds (or, switched off, with every later
    layer recomputed); just below the maximum, violated, never holds."""
    from graphcert.verify import relu_bab, verify
    monkeypatch.setattr(relu_bab, "REUSE_PARENT_BOUNDS", reuse)
    model, spec, top, gap = above_the_grid_maximum(tmp_path, [2, 16, 16, 16, 2], seed=4)
    write_box_property(spec, 2, -1, 1, f"(>= Y_0 {top + 0.8 * gap})", 2)
    result = verify(model, spec, timeout=30, method="crown", branching="relus", rounding="real")
    assert result.status == "holds"
    write_box_property(spec, 2, -1, 1, f"(>= Y_0 {top - 0.02})", 2)
    assert verify(model, spec, timeout=5, method="crown", branching="relus", rounding="real").status == "violated"


@pytest.mark.parametrize("seed", range(2))
def test_beta_bounds_one_conjunct_per_domain(tmp_path, seed):
    """BetaSplitBounds bounds only each domain's conjunct's rows (a conjunct of two rows and one of one row,
    padded): those bounds hold on the domain's sampled and attacked inputs and are never below CROWN's with the
    same given bounds; the other conjunct's rows are -inf; warm starts round-trip at the padded row count."""
    from test_beta import attack_in_domain, given_domains, meets_signs

    from graphcert.passes.crown import SPLIT_LOWER_PREFIX, SPLIT_SIGN_PREFIX, SPLIT_UPPER_PREFIX
    from graphcert.verify.bounds import BetaSplitBounds, SplitBounds
    from graphcert.verify.network import Network
    domains = 6
    layers, _, units, signs, given, (lower, upper) = given_domains(seed, domains)
    proto, _ = relu_network([3, 16, 16, 3], seed=seed)
    onnx.save(proto, tmp_path / "m.onnx")
    network = Network(tmp_path / "m.onnx")
    matrix = np.array([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, -1.0]], dtype=np.float32)
    offset = np.array([0.1, -0.2, 0.05])
    membership = np.array([[True, False], [True, False], [False, True]])
    splits = SplitBounds(network, matrix, offset, "given")
    assert splits.names == units
    flat = lambda prefix: np.concatenate([given[prefix + n].reshape(domains, -1) for n in units], axis=1)  # noqa
    unit_lower, unit_upper, sign = flat(SPLIT_LOWER_PREFIX), flat(SPLIT_UPPER_PREFIX), flat(SPLIT_SIGN_PREFIX)
    box_lower, box_upper = np.tile(lower, (domains, 1)), np.tile(upper, (domains, 1))
    crown, _, _ = splits(box_lower, box_upper, unit_lower, unit_upper)
    beta = BetaSplitBounds(network, matrix, offset, membership, splits, AlphaSettings(iterations=15))
    assert beta.rows == 2 and beta.width > 0
    conjunct = np.arange(domains) % 2
    low, kept = beta(box_lower, box_upper, unit_lower, unit_upper, sign, conjunct, stop=lambda low, high: False)
    assert kept.shape == (domains, beta.width) and np.isfinite(kept).all()
    np.testing.assert_array_equal(beta._pack(beta._unpack(kept), domains), kept)
    own = membership[:, conjunct].T                          # [domains, rows]
    assert np.isneginf(low[~own]).all() and np.isfinite(low[own]).all()
    assert (low[own] >= crown[own] - TOLERANCE).all()
    assert (low[own] > crown[own] + 1e-3).any()
    rng = np.random.default_rng(seed)
    points = rng.uniform(lower, upper, size=(40000, 3))
    hidden, y = pre_activations(layers, points)
    for d in range(domains):
        attacked = attack_in_domain(layers, units, signs, d, lower, upper, rng, starts=16, steps=40)
        attacked_hidden, attacked_y = pre_activations(layers, attacked)
        found = np.concatenate([y[meets_signs(hidden, units, signs, d)],
                                attacked_y[meets_signs(attacked_hidden, units, signs, d)]])
        assert len(found)
        margins = found @ matrix.T.astype(np.float64) + offset
        assert (margins[:, own[d]] >= low[d, own[d]] - TOLERANCE).all()


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_root_alpha_on_the_unstable_units_only_holds(tmp_path, scale):
    """AlphaUnitBounds optimising only the units CROWN leaves unstable (the others fed CROWN's bounds, which
    keep them stable): fewer slope rows, bounds never looser than CROWN's, holding on sampled and attacked
    points."""
    from graphcert.verify.bounds import AlphaUnitBounds
    widths = [3, 16, 16, 16, 2]
    proto, layers = scaled_network(widths, seed=5, scale=scale)
    network, search, clamp = y0_above_y1_search(tmp_path, proto)
    rng = np.random.default_rng(1)
    centers = rng.uniform(-0.5, 0.5, size=(3, 3))
    lower, upper = centers - 0.4, centers + 0.4
    unbounded = np.full((len(lower), clamp.units), np.inf, dtype=np.float32)
    crown_margins, crown_lower, crown_upper = clamp(lower, upper, -unbounded, unbounded)
    unstable = ((crown_lower < 0) & (crown_upper > 0)).any(axis=0)
    assert 0 < unstable.sum() < clamp.units
    every = AlphaUnitBounds(network, search.matrix, search.offset, clamp, AlphaSettings(iterations=30))
    some = AlphaUnitBounds(network, search.matrix, search.offset, clamp, AlphaSettings(iterations=30),
                           unstable=unstable)
    rows = lambda bounder: sum(r for r, _ in bounder.alpha.parameter_shapes().values())  # noqa: E731
    assert rows(some) < rows(every)
    margins, unit_lower, unit_upper = some(lower, upper, stop=None, unit_lower=crown_lower, unit_upper=crown_upper)
    ulps = float32_ulps(crown_lower, crown_upper)
    assert (unit_lower >= crown_lower - ulps).all() and (unit_upper <= crown_upper + ulps).all()
    assert (margins >= crown_margins - TOLERANCE - 1e-5 * np.abs(crown_margins)).all()
    assert (margins > crown_margins + 1e-3).any()
    assert_hold_on_sampled_and_attacked_points(layers, search, lower, upper, margins, unit_lower, unit_upper, rng)


def test_conjuncts_the_root_refutes_get_no_domains(tmp_path, monkeypatch):
    """y_0 < t on [-1, 1]^2 with t just inside CROWN's bound: the root's alpha-CROWN refutes it, and the search
    answers holds without bounding a single split domain; a threshold just below the grid maximum is still
    violated (the shortcut never proves what a counterexample refutes)."""
    from graphcert.verify import relu_bab, verify
    from test_relu_split import crown_upper_bound
    bounded = []
    original = relu_bab.ReluSplitSearch._bound_domains
    monkeypatch.setattr(relu_bab.ReluSplitSearch, "_bound_domains",
                        lambda self, *args, **kwargs: bounded.append(1) or original(self, *args, **kwargs))
    model, spec, top, gap = above_the_grid_maximum(tmp_path, [2, 16, 16, 16, 2], seed=4)
    crown = crown_upper_bound(onnx.load(model), 2)
    write_box_property(spec, 2, -1, 1, f"(>= Y_0 {crown - 0.05 * gap})", 2)
    result = verify(model, spec, timeout=30, method="crown", branching="relus", rounding="real")
    assert result.status == "holds" and not bounded
    write_box_property(spec, 2, -1, 1, f"(>= Y_0 {top - 0.02})", 2)
    assert verify(model, spec, timeout=5, method="crown", branching="relus", rounding="real").status == "violated"
