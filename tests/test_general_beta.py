"""beta-CROWN multipliers of Sigmoid and Tanh split constraints at any split point p (z >= p, z <= p).

Every beta >= 0 gives a bound that holds on the inputs meeting the splits (dense sampling and an attack
restricted to the split domain), at weights x1 and x30, in "clamp" and "given" mode; optimised multipliers
tighten what alpha alone finds. (The split graphs take input boxes only: L2 balls do not apply.)
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from graphcert.alpha import AlphaCrown
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.model import load
from graphcert.passes.crown import (CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX, SPLIT_LOWER_PREFIX,
                                    SPLIT_SIGN_PREFIX, SPLIT_UPPER_PREFIX, CrownPass)
from graphcert.passes.spec import SpecPass
from graphcert.runtime import Session
from test_general_bab import activation_network
from test_relu_split import SPEC, box_feeds, open_clamps

WIDTHS = [3, 10, 10, 3]
TORCH_ACTIVATIONS = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh}


def run(network, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every unit's input z and the margins SPEC·y, in float64."""
    layers, kinds = network
    hidden, h = [], x
    for k, (w, bias) in enumerate(layers):
        h = h @ torch.as_tensor(w, dtype=torch.float64) + torch.as_tensor(bias, dtype=torch.float64)
        if k < len(layers) - 1:
            hidden.append(h)
            h = TORCH_ACTIVATIONS[kinds[k]](h)
    return hidden, h @ torch.as_tensor(SPEC.T, dtype=torch.float64)


def split_domains(network, units, lower, upper, rng, domains: int, per_layer: int = 3):
    """Clamp feeds and signs of domains that split `per_layer` units per layer at a point p off 0 (and off the
    middle), on the side a sampled point of the box is on (so that inputs meet them): z >= p as lower clamp
    p with sign +1, z <= p as upper clamp p with sign -1. Returns feeds, signs and [(unit index per layer,
    p, sign)] per domain."""
    widths = [w.shape[1] for w, _ in network[0][:-1]]
    feeds = open_clamps(units, widths, domains)
    signs = {name: np.zeros((domains, width), dtype=np.float32) for name, width in zip(units, widths)}
    anchors = rng.uniform(lower, upper, size=(domains, len(lower)))
    spread = [z.std(axis=0).numpy() for z in run(network, torch.as_tensor(rng.uniform(lower, upper, (2000, len(lower)))))[0]]
    hidden, _ = run(network, torch.as_tensor(anchors))
    for d in range(domains):
        for name, z, width, scale in zip(units, hidden, widths, spread):
            chosen = rng.choice(width, size=per_layer, replace=False)
            sign = rng.choice([-1.0, 1.0], size=per_layer)
            point = (z[d, chosen].numpy() - sign * rng.uniform(0.05, 0.6, per_layer) * scale[chosen]).astype(np.float32)
            up = sign > 0
            feeds[SPLIT_LOWER_PREFIX + name][d, chosen[up]] = point[up]
            feeds[SPLIT_UPPER_PREFIX + name][d, chosen[~up]] = point[~up]
            signs[name][d, chosen] = sign
    return feeds, signs


def meets(hidden, units, feeds, d: int) -> np.ndarray:
    """Points whose every z lies within domain d's clamps."""
    inside = np.ones(len(hidden[0]), dtype=bool)
    for name, z in zip(units, hidden):
        z = z.detach().numpy()
        inside &= ((z >= feeds[SPLIT_LOWER_PREFIX + name][d]) & (z <= feeds[SPLIT_UPPER_PREFIX + name][d])).all(axis=1)
    return inside


def domain_margins(network, units, feeds, d: int, lower, upper, rng, samples: int = 20000) -> np.ndarray:
    """Margins at sampled points of the box in domain d and after projected sign-gradient descent on the
    smallest margin with a penalty for leaving the domain (the final points filtered by the clamps, exactly)."""
    points = torch.as_tensor(rng.uniform(lower, upper, size=(samples, len(lower))))
    hidden, margins = run(network, points)
    found = [margins.numpy()[meets(hidden, units, feeds, d)]]
    lo, hi = torch.as_tensor(lower), torch.as_tensor(upper)
    x = torch.as_tensor(rng.uniform(lower, upper, size=(64, len(lower)))).requires_grad_(True)
    step = 0.05 * (hi - lo)
    for k in range(60):
        hidden, margins = run(network, x)
        penalty = sum((torch.relu(torch.as_tensor(feeds[SPLIT_LOWER_PREFIX + n][d], dtype=torch.float64) - z)
                       + torch.relu(z - torch.as_tensor(feeds[SPLIT_UPPER_PREFIX + n][d], dtype=torch.float64))).sum(1)
                      for n, z in zip(units, hidden))
        objective = margins.min(dim=1).values + 10.0 * penalty
        grad, = torch.autograd.grad(objective.sum(), x)
        with torch.no_grad():
            x -= step * (0.98 ** k) * grad.sign()
            x.copy_(torch.max(torch.min(x, hi), lo))
    hidden, margins = run(network, x.detach())
    found.append(margins.numpy()[meets(hidden, units, feeds, d)])
    return np.concatenate(found)


def beta_feeds(graph, signs, rows: int, domains: int, scale: float, rng) -> dict:
    feeds = {SPLIT_SIGN_PREFIX + name: sign for name, sign in signs.items()}
    for name, unit in json.loads(graph.metadata_props["graphcert.beta"]).items():
        feeds[name] = rng.uniform(0, scale, size=(rows, domains, signs[unit].shape[1])).astype(np.float32)
    return feeds


@pytest.mark.parametrize("activation", ["Sigmoid", "Tanh", ["Tanh", "Sigmoid"]], ids=str)
@pytest.mark.parametrize("weights", [1.0, 30.0])
@pytest.mark.parametrize("mode", ["clamp", "given"])
def test_any_nonnegative_multipliers_bound_the_split_domain(activation, weights, mode):
    """margins_lower <= every margin at sampled and attacked inputs meeting the splits, for multipliers from
    small to large (a wrong constant term p·beta shows as soon as beta is large)."""
    proto, network = activation_network(WIDTHS, activation, seed=7, scale=weights)
    spec = SpecPass(SPEC, None, keep_output=False)(load(proto)).model
    clamp = CrownPass(InputSet("box"), keep_original=False, split_bounds="clamp")(spec).model
    graph = CrownPass(InputSet("box"), keep_original=False, split_bounds=mode, beta=True)(spec).model
    units = json.loads(graph.metadata_props["graphcert.splits"])
    rng = np.random.default_rng(3)
    domains = 4
    lower, upper = np.full(3, -0.6), np.full(3, 0.8)
    feeds, signs = split_domains(network, units, lower, upper, rng, domains)
    boxes = box_feeds(np.tile(lower, (domains, 1)), np.tile(upper, (domains, 1)))
    if mode == "given":   # the clamped bounds of z on each domain, as branch and bound gives them
        clamped = Session(to_proto(clamp)).run({**boxes, **feeds})
        given = {**{SPLIT_LOWER_PREFIX + n: clamped[CLAMPED_LOWER_PREFIX + n] for n in units},
                 **{SPLIT_UPPER_PREFIX + n: clamped[CLAMPED_UPPER_PREFIX + n] for n in units}}
    in_domain = [domain_margins(network, units, feeds, d, lower, upper, rng) for d in range(domains)]
    assert all(len(found) for found in in_domain), "every domain is met by the point it was made from"
    session = Session(to_proto(graph))
    for scale in (0.3, 3.0, 30.0):
        out = session.run({**boxes, **(given if mode == "given" else feeds),
                           **beta_feeds(graph, signs, len(SPEC), domains, scale, rng)})
        for d in range(domains):
            slack = 1e-4 * (1 + np.abs(in_domain[d]))
            assert (in_domain[d] >= out["margins_lower"][d] - slack).all(), (scale, d)


@pytest.mark.parametrize("activation", ["Sigmoid", "Tanh"])
def test_optimised_multipliers_tighten_off_zero_splits_and_stay_sound(activation):
    """alpha-beta-CROWN on domains split at points off 0 (given clamped bounds): never looser than CROWN,
    tighter than alpha alone somewhere, and below every margin of the domain's sampled and attacked inputs."""
    proto, network = activation_network([3, 16, 16, 3], activation, seed=5, scale=2.0)
    spec = SpecPass(SPEC, None, keep_output=False)(load(proto)).model
    clamp = CrownPass(InputSet("box"), keep_original=False, split_bounds="clamp")(spec).model
    units = json.loads(clamp.metadata_props["graphcert.splits"])
    rng = np.random.default_rng(11)
    domains = 8
    lower, upper = np.full(3, -0.8), np.full(3, 0.8)
    feeds, signs = split_domains(network, units, lower, upper, rng, domains, per_layer=5)
    boxes = box_feeds(np.tile(lower, (domains, 1)), np.tile(upper, (domains, 1)))
    clamped = Session(to_proto(clamp)).run({**boxes, **feeds})
    given = {**boxes, **{SPLIT_LOWER_PREFIX + n: clamped[CLAMPED_LOWER_PREFIX + n] for n in units},
             **{SPLIT_UPPER_PREFIX + n: clamped[CLAMPED_UPPER_PREFIX + n] for n in units},
             **{SPLIT_SIGN_PREFIX + n: signs[n] for n in units}}
    start = Session(to_proto(CrownPass(InputSet("box"), keep_original=False, split_bounds="given")(spec).model)
                    ).run(given)["margins_lower"]
    bounds = {}
    for beta in (False, True):
        bounder = AlphaCrown(spec, "box", split_bounds="given", beta=beta)
        bounds[beta], _ = bounder.bounds(given, iterations=40, lr=0.1)
    assert (bounds[True] >= start - 1e-4).all()
    assert (bounds[True] > bounds[False] + 1e-2).any(), (bounds[True] - bounds[False])
    for d in range(domains):
        found = domain_margins(network, units, feeds, d, lower, upper, rng)
        assert (found >= bounds[True][d] - 1e-4 * (1 + np.abs(found))).all()
