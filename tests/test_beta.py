"""beta-CROWN: multipliers of ReLU split constraints in the CROWN pass, optimised with alpha, used by verify.

beta = 0 reproduces the bounds without multipliers; every beta >= 0 gives a bound that holds on the inputs
meeting the splits (dense sampling and an attack restricted to the split domain); optimised multipliers only
tighten; verify with them never proves a property that has a counterexample.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from graphcert.alpha import AlphaCrown, AlphaSettings
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.model import load
from graphcert.passes.crown import (CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX, SPLIT_LOWER_PREFIX,
                                    SPLIT_SIGN_PREFIX, SPLIT_UPPER_PREFIX, CrownPass)
from graphcert.passes.spec import SpecPass
from graphcert.runtime import Session
from test_relu_split import (SPEC, box_feeds, crown_upper_bound, open_clamps, pre_activations, relu_network,
                             write_box_property)

WIDTHS = [3, 10, 10, 3]
TOLERANCE = 1e-4


def spec_model(proto):
    return SpecPass(SPEC, None, keep_output=False)(load(proto)).model


def split_domains(layers, units, lower, upper, rng, domains: int, per_layer: int = 3):
    """Clamp feeds and signs of domains that fix `per_layer` units per layer as at a sampled point of the
    box (so that inputs meet them)."""
    hidden_widths = [w.shape[1] for w, _ in layers[:-1]]
    feeds = open_clamps(units, hidden_widths, domains)
    signs = {name: np.zeros((domains, width), dtype=np.float32) for name, width in zip(units, hidden_widths)}
    anchors = rng.uniform(lower, upper, size=(domains, len(lower)))
    hidden, _ = pre_activations(layers, anchors)
    for d in range(domains):
        for name, z, width in zip(units, hidden, hidden_widths):
            chosen = rng.choice(width, size=per_layer, replace=False)
            active = z[d, chosen] >= 0
            feeds[SPLIT_LOWER_PREFIX + name][d, chosen[active]] = 0.0
            feeds[SPLIT_UPPER_PREFIX + name][d, chosen[~active]] = 0.0
            signs[name][d, chosen] = np.where(active, 1.0, -1.0)
    return feeds, signs


def meets_signs(hidden, units, signs, d: int) -> np.ndarray:
    meets = np.ones(len(hidden[0]), dtype=bool)
    for name, z in zip(units, hidden):
        meets &= (signs[name][d] * z >= 0).all(axis=1)
    return meets


def attack_in_domain(layers, units, signs, d: int, lower, upper, rng, starts: int = 32, steps: int = 60):
    """Projected sign-gradient descent on the smallest margin with a penalty for violated splits; the final
    points (to be filtered by the splits, exactly)."""
    weights = [(torch.tensor(w, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)) for w, bias in layers]
    spec = torch.tensor(SPEC, dtype=torch.float64)
    lo, hi = torch.tensor(lower), torch.tensor(upper)
    x = torch.tensor(rng.uniform(lower, upper, size=(starts, len(lower))), requires_grad=True)
    step = 0.05 * (hi - lo)
    for k in range(steps):
        h, penalty = x, 0.0
        for index, (w, bias) in enumerate(weights):
            h = h @ w + bias
            if index < len(weights) - 1:
                sign = torch.tensor(signs[units[index]][d], dtype=torch.float64)
                penalty = penalty + torch.relu(-sign * h).sum(dim=1)
                h = torch.relu(h)
        objective = (h @ spec.T).min(dim=1).values + 10.0 * penalty
        grad, = torch.autograd.grad(objective.sum(), x)
        with torch.no_grad():
            x -= step * (0.98 ** k) * grad.sign()
            x.copy_(torch.max(torch.min(x, hi), lo))
    return x.detach().numpy()


def beta_feeds(graph, signs, rows: int, domains: int, scale: float, rng) -> dict:
    """Split signs and random multipliers (uniform in [0, scale]) for every beta input of the graph."""
    feeds = {SPLIT_SIGN_PREFIX + name: sign for name, sign in signs.items()}
    for name, unit in json.loads(graph.metadata_props["graphcert.beta"]).items():
        feeds[name] = rng.uniform(0, scale, size=(rows, domains, signs[unit].shape[1])).astype(np.float32)
    return feeds


@pytest.mark.parametrize("mode", ["clamp", "given"])
def test_zero_multipliers_reproduce_the_bounds_without_them(mode):
    proto, layers = relu_network(WIDTHS, seed=1)
    spec = spec_model(proto)
    plain = CrownPass(InputSet("box"), keep_original=False, split_bounds=mode)(spec).model
    with_beta = CrownPass(InputSet("box"), keep_original=False, split_bounds=mode, beta=True)(spec).model
    units = json.loads(plain.metadata_props["graphcert.splits"])
    rng = np.random.default_rng(0)
    lower, upper = np.full(3, -0.7), np.full(3, 0.7)
    feeds, signs = split_domains(layers, units, lower, upper, rng, domains=6)
    boxes = box_feeds(np.tile(lower, (6, 1)), np.tile(upper, (6, 1)))
    expected = Session(to_proto(plain)).run({**boxes, **feeds})
    zero = beta_feeds(with_beta, signs, len(SPEC), 6, 0.0, rng)
    found = Session(to_proto(with_beta)).run({**boxes, **feeds, **zero})
    assert set(found) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(found[name], expected[name])


def test_multipliers_need_split_bounds():
    with pytest.raises(ValueError, match="split_bounds"):
        CrownPass(InputSet("box"), beta=True)


@pytest.mark.parametrize("seed", range(4))
def test_any_nonnegative_multipliers_give_a_bound_on_the_split_domain(seed):
    """margins_lower <= every margin at sampled and attacked inputs of the box meeting the split signs, for
    multipliers small and large."""
    proto, layers = relu_network(WIDTHS, seed=seed)
    graph = CrownPass(InputSet("box"), keep_original=False, split_bounds="clamp", beta=True)(spec_model(proto)).model
    session = Session(to_proto(graph))
    units = json.loads(graph.metadata_props["graphcert.splits"])
    rng = np.random.default_rng(seed)
    domains = 4
    center = rng.uniform(-0.5, 0.5, size=3)
    lower, upper = center - 0.6, center + 0.6
    feeds, signs = split_domains(layers, units, lower, upper, rng, domains)
    boxes = box_feeds(np.tile(lower, (domains, 1)), np.tile(upper, (domains, 1)))
    points = rng.uniform(lower, upper, size=(20000, 3))
    hidden, y = pre_activations(layers, points)
    margins = y @ SPEC.T.astype(np.float64)
    in_domain = []
    for d in range(domains):
        attacked = attack_in_domain(layers, units, signs, d, lower, upper, rng)
        attacked_hidden, attacked_y = pre_activations(layers, attacked)
        inside = meets_signs(attacked_hidden, units, signs, d)
        in_domain.append(np.concatenate([margins[meets_signs(hidden, units, signs, d)],
                                         (attacked_y @ SPEC.T.astype(np.float64))[inside]]))
        assert len(in_domain[d]), "every domain is met by the point it was made from"
    for scale in (0.3, 3.0):
        out = session.run({**boxes, **feeds, **beta_feeds(graph, signs, len(SPEC), domains, scale, rng)})
        for d in range(domains):
            assert (in_domain[d] >= out["margins_lower"][d] - TOLERANCE).all()


def test_optimised_multipliers_tighten_and_stay_sound():
    """alpha-beta-CROWN on split domains (given clamped bounds): never looser than CROWN with beta = 0, tighter
    than alpha alone somewhere, and below every margin of the domain's sampled inputs."""
    proto, layers = relu_network([3, 16, 16, 3], seed=3)
    spec = spec_model(proto)
    clamp = CrownPass(InputSet("box"), keep_original=False, split_bounds="clamp")(spec).model
    units = json.loads(clamp.metadata_props["graphcert.splits"])
    rng = np.random.default_rng(5)
    domains = 8
    lower, upper = np.full(3, -0.8), np.full(3, 0.8)
    feeds, signs = split_domains(layers, units, lower, upper, rng, domains, per_layer=4)
    boxes = box_feeds(np.tile(lower, (domains, 1)), np.tile(upper, (domains, 1)))
    clamped = Session(to_proto(clamp)).run({**boxes, **feeds})
    given = {**boxes, **{SPLIT_LOWER_PREFIX + n: clamped[CLAMPED_LOWER_PREFIX + n] for n in units},
             **{SPLIT_UPPER_PREFIX + n: clamped[CLAMPED_UPPER_PREFIX + n] for n in units},
             **{SPLIT_SIGN_PREFIX + n: signs[n] for n in units}}
    start = clamped["margins_lower"]
    bounds = {}
    for beta in (False, True):
        bounder = AlphaCrown(spec, "box", split_bounds="given", beta=beta)
        bounds[beta], _ = bounder.bounds(given, iterations=30, lr=0.1)
    assert (bounds[True] >= start - 1e-5).all()
    assert (bounds[True] > bounds[False] + 1e-3).any()
    points = rng.uniform(lower, upper, size=(40000, 3))
    hidden, y = pre_activations(layers, points)
    margins = y @ SPEC.T.astype(np.float64)
    for d in range(domains):
        inside = meets_signs(hidden, units, signs, d)
        assert (margins[inside] >= bounds[True][d] - TOLERANCE).all()


def test_multipliers_prove_what_clamps_alone_cannot(tmp_path, monkeypatch):
    """y_0 < t on [-1, 1]^4 with t 60 % of the way from the sampled maximum to CROWN's bound. With the first
    choice of split unit (no look-ahead, which finds splits that clamps alone refute in 3.5 s), clamps alone
    end with live domains whose every unit is decided (the network is affine there, but the bound over the
    whole box ignores the split constraints) and answer unknown; their multipliers bring the constraints in
    and prove the property."""
    from graphcert.verify import BRANCH_BETA, relu_bab, verify
    monkeypatch.setattr(relu_bab, "LOOK_AHEAD", 0)
    proto, layers = relu_network([4, 20, 20, 2], seed=1)
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    points = np.random.default_rng(0).uniform(-1, 1, size=(200000, 4))
    top = float(pre_activations(layers, points)[1][:, 0].max())
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, 4, -1, 1, f"(>= Y_0 {top + 0.6 * (crown_upper_bound(proto, 4) - top)})", 2)
    assert verify(model, spec, timeout=5, method="crown", branching="relus", beta=None).status != "holds"
    assert verify(model, spec, timeout=20, method="crown", branching="relus", beta=BRANCH_BETA).status == "holds"


def given_domains(seed: int, domains: int):
    """A 3-16-16-3 network, its spec model and `domains` split domains of [-0.8, 0.8]^3 (4 units fixed per
    layer as at a sampled point): (layers, spec, units, signs, feeds of the given clamped bounds, box)."""
    proto, layers = relu_network([3, 16, 16, 3], seed=seed)
    spec = spec_model(proto)
    clamp = CrownPass(InputSet("box"), keep_original=False, split_bounds="clamp")(spec).model
    units = json.loads(clamp.metadata_props["graphcert.splits"])
    rng = np.random.default_rng(seed)
    lower, upper = np.full(3, -0.8), np.full(3, 0.8)
    feeds, signs = split_domains(layers, units, lower, upper, rng, domains, per_layer=4)
    boxes = box_feeds(np.tile(lower, (domains, 1)), np.tile(upper, (domains, 1)))
    clamped = Session(to_proto(clamp)).run({**boxes, **feeds})
    given = {**boxes, **{SPLIT_LOWER_PREFIX + n: clamped[CLAMPED_LOWER_PREFIX + n] for n in units},
             **{SPLIT_UPPER_PREFIX + n: clamped[CLAMPED_UPPER_PREFIX + n] for n in units},
             **{SPLIT_SIGN_PREFIX + n: signs[n] for n in units}}
    return layers, spec, units, signs, given, (lower, upper)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("warm", ["some default", "complete", "complete in float64"])
def test_any_warm_start_gives_a_bound_on_the_split_domain(seed, warm, monkeypatch):
    """Warm starts (slopes far outside [0, 1], large multipliers, NaN for the default) are projected by the
    graph and the steps: the bounds stay below every margin of the domain's sampled and attacked inputs. A
    complete warm start (no NaN) runs no CROWN start: its bounds are the steps' own (float64 mode: the best
    step's parameters evaluated in float64)."""
    from graphcert import alpha as alpha_module
    domains = 6
    layers, spec, units, signs, given, (lower, upper) = given_domains(seed, domains)
    bounder = AlphaCrown(spec, "box", split_bounds="given", beta=True)
    if warm.endswith("float64"):
        bounder.in_double()
    starts = []
    original = alpha_module.AlphaCrown.crown_start
    monkeypatch.setattr(alpha_module.AlphaCrown, "crown_start",
                        lambda self, *a, **k: starts.append(1) or original(self, *a, **k))
    rng = np.random.default_rng(100 + seed)
    rows = len(SPEC)
    start = {}
    for name, (rows, shape) in bounder.parameter_shapes().items():
        size = (rows, domains, *shape)
        values = rng.uniform(-3, 4, size=size) if name in bounder.units else rng.uniform(0, 20, size=size)
        if warm == "some default":
            values[rng.random(size) < 0.2] = np.nan
        start[name] = values.astype(np.float32)
    points = rng.uniform(lower, upper, size=(40000, 3))
    hidden, y = pre_activations(layers, points)
    margins = y @ SPEC.T.astype(np.float64)
    for iterations in (1, 10):
        starts.clear()
        low, _ = bounder.bounds(given, iterations=iterations, lr=0.1, start=start)
        assert len(starts) == (warm == "some default")
        assert low.dtype == (np.float64 if warm.endswith("float64") else np.float32)
        for d in range(domains):
            attacked = attack_in_domain(layers, units, signs, d, lower, upper, rng, starts=16, steps=40)
            attacked_hidden, attacked_y = pre_activations(layers, attacked)
            inside = meets_signs(hidden, units, signs, d)
            inside_attacked = meets_signs(attacked_hidden, units, signs, d)
            found = np.concatenate([margins[inside], (attacked_y @ SPEC.T.astype(np.float64))[inside_attacked]])
            assert len(found) and (found >= low[d] - TOLERANCE).all()


def test_kept_parameters_resume_the_optimised_bound():
    """`keep` holds each domain's best parameters: one evaluation from them gets (nearly) the bound 30 steps
    reached, well above the default start's."""
    domains = 8
    _, spec, _, _, given, _ = given_domains(3, domains)
    bounder = AlphaCrown(spec, "box", split_bounds="given", beta=True)
    plain, _ = bounder.bounds(given, iterations=0)
    tuned, _ = bounder.bounds(given, iterations=30, lr=0.1, keep=True)
    kept = bounder.kept
    assert set(kept) == set(bounder.units) | set(bounder.betas)
    assert all((value >= 0).all() for name, value in kept.items() if name in bounder.betas)
    resumed, _ = bounder.bounds(given, iterations=1, start=kept)
    gained = tuned.sum(axis=1) - plain.sum(axis=1)
    assert (gained > 1e-3).any()
    # The best summed step's bound: at least the plain one, most of the way to the tuned one.
    assert (resumed.sum(axis=1) >= plain.sum(axis=1) + 0.5 * gained - 1e-4).all()


def test_split_bounds_pack_warm_starts_per_domain(tmp_path):
    """BetaSplitBounds flattens each domain's slopes and multipliers into one row and back, and finds the
    columns of a unit's multipliers (children zero those of their new split)."""
    from graphcert.verify.bounds import BetaSplitBounds, SplitBounds
    from graphcert.verify.network import Network
    proto, _ = relu_network([3, 16, 16, 3], seed=2)
    onnx.save(proto, tmp_path / "m.onnx")
    network = Network(tmp_path / "m.onnx")
    splits = SplitBounds(network, SPEC, np.zeros(len(SPEC)), "clamp")
    beta = BetaSplitBounds(network, SPEC, np.zeros(len(SPEC)), np.eye(len(SPEC), dtype=bool), splits,
                           AlphaSettings(iterations=5))
    assert beta.width == sum(rows * int(np.prod(shape)) for rows, shape, _ in beta.layout.values()) > 0
    domains = 5
    rng = np.random.default_rng(0)
    warm = rng.normal(size=(domains, beta.width)).astype(np.float32)
    unpacked = beta._unpack(warm)
    np.testing.assert_array_equal(beta._pack(unpacked, domains), warm)
    unit = rng.integers(0, splits.units, size=domains)
    columns = beta.beta_columns(unit)
    hits = 0
    for name, z in beta.alpha.betas.items():
        k = splits.names.index(z)
        for (d, u), where in zip(enumerate(unit), columns[list(beta.alpha.betas).index(name)]):
            if splits.offsets[k] <= u < splits.offsets[k + 1]:
                np.testing.assert_array_equal(warm[d, where], unpacked[name][:, d, u - splits.offsets[k]])
                hits += 1
            else:
                assert (where == -1).all()
    assert hits >= domains


@pytest.mark.parametrize("double", [False, True])
def test_split_bounds_give_the_clamps_met_with_ibp_like_the_given_split_graph(tmp_path, double):
    """Children of a split go to beta-CROWN without a CROWN pass first: `clamps=True` gives the bounds of z the
    beta graph used, the given ones met with IBP through the earlier layers (a split at layer 1 tightens layer
    2), as the "given" split graph computes them; on domains whose signs agree with sampled points the sampled
    z lie inside them, and the margins bound the sampled margins (warm starts and cold)."""
    from graphcert.verify.bounds import BetaSplitBounds, SplitBounds
    from graphcert.verify.network import Network
    proto, layers = relu_network([3, 16, 16, 3], seed=4)
    onnx.save(proto, tmp_path / "m.onnx")
    network = Network(tmp_path / "m.onnx")
    offset = np.zeros(len(SPEC))
    clamp = SplitBounds(network, SPEC, offset, "clamp")
    given = SplitBounds(network, SPEC, offset, "given")
    beta = BetaSplitBounds(network, SPEC, offset, np.eye(len(SPEC), dtype=bool), clamp, AlphaSettings(iterations=4))
    if double:
        beta.alpha.in_double()
    rng = np.random.default_rng(5)
    domains = 6
    lower, upper = np.full((domains, 3), -1.0), np.full((domains, 3), 1.0)
    _, unit_lower, unit_upper = clamp(lower, upper, np.full((domains, clamp.units), -np.inf),
                                      np.full((domains, clamp.units), np.inf))
    unit_lower, unit_upper = unit_lower.astype(np.float64), unit_upper.astype(np.float64)
    # Split two unstable first-layer units per domain at 0, on the side a sampled anchor takes.
    anchors = rng.uniform(-1, 1, size=(domains, 3))
    hidden, _ = pre_activations(layers, anchors)
    signs = np.zeros((domains, clamp.units), dtype=np.int8)
    for d in range(domains):
        unstable = np.flatnonzero((unit_lower[d, :16] < 0) & (unit_upper[d, :16] > 0))
        for u in rng.choice(unstable, size=min(2, len(unstable)), replace=False):
            if hidden[0][d, u] >= 0:
                unit_lower[d, u], signs[d, u] = 0.0, 1
            else:
                unit_upper[d, u], signs[d, u] = 0.0, -1
    _, given_lower, given_upper = given(lower, upper, unit_lower, unit_upper)
    assert (given_lower[:, 16:] > unit_lower[:, 16:] + 1e-6).any()   # the splits tightened the second layer
    conjunct = np.zeros(domains, dtype=int)
    points = rng.uniform(-1, 1, size=(20000, 3))
    point_hidden, y = pre_activations(layers, points)
    for warm in (None, rng.uniform(0, 1, size=(domains, beta.width)).astype(np.float32)):
        low, _ = beta(lower, upper, unit_lower, unit_upper, signs, conjunct, stop=lambda low, high: False,
                      warm=warm, clamps=True)
        clamped_lower, clamped_upper = beta.clamped
        np.testing.assert_allclose(clamped_lower, given_lower, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(clamped_upper, given_upper, rtol=1e-5, atol=1e-5)
        for d in range(domains):
            inside = np.ones(len(points), dtype=bool)
            for layer, z in enumerate(point_hidden):
                part = signs[d, 16 * layer:16 * (layer + 1)]
                inside &= (part * z >= 0).all(axis=1)
            z = np.concatenate(point_hidden, axis=1)[inside]
            assert inside.sum() > 10
            assert (z >= clamped_lower[d] - 1e-4).all() and (z <= clamped_upper[d] + 1e-4).all()
            margins = y[inside] @ SPEC.T.astype(np.float64)
            assert (margins[:, np.isfinite(low[d])] >= low[d][np.isfinite(low[d])] - 1e-4).all()
