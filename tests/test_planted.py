"""The planted-counterexample suite (tests/planted.py): verify never answers `holds` where a counterexample was
planted, every counterexample it reports violates the property under onnxruntime, and it never answers
`violated` on the near-miss twins (whose property holds by construction)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcert import methods
from graphcert.verify import verify
from planted import ARCHITECTURES, PLACEMENTS, make_case

# Every verify method that bounds L-inf boxes, with each branching mode it accepts.
COMBINATIONS = [(name, branching) for name in methods.names(role="bounds", norm="linf")
                for branching in ("inputs", "relus")
                if branching == "inputs" or methods.get(name).branches_on_relus]
TIMEOUT = 2.0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), architecture=st.sampled_from(ARCHITECTURES),
       placement=st.sampled_from(PLACEMENTS), boxes=st.integers(1, 3), disjuncts=st.integers(1, 3),
       saturated=st.booleans())
def test_the_pocket_is_the_only_violation_and_sampling_misses_it(seed, architecture, placement, boxes, disjuncts,
                                                                  saturated):
    planted = make_case(seed, architecture, placement, True, boxes, disjuncts, saturated=saturated)
    twin = make_case(seed, architecture, placement, False, boxes, disjuncts, saturated=saturated)
    # make_case has checked the point with onnxruntime (violated / not violated); the float64 reference agrees.
    assert planted.reference_violations(planted.point[None])[0]
    assert not twin.reference_violations(twin.point[None])[0]
    rng = np.random.default_rng(seed)
    for lower, upper in planted.boxes:
        samples = rng.uniform(lower, upper, size=(4000, len(lower)))
        near = planted.point + rng.uniform(-1, 1, size=(4000, len(lower))) * planted.width
        near = np.clip(near, lower, upper)
        assert not planted.reference_violations(samples).any()
        assert not twin.reference_violations(np.concatenate([samples, near])).any()


def test_cases_differ_by_seed():
    a, b = make_case(1, "dense"), make_case(2, "dense")
    assert a.spec != b.spec and not np.array_equal(a.point, b.point)


def cases_for(index: int) -> list:
    """A planted case and a twin per combination, rotating through architectures and placements."""
    chosen = []
    for k, planted in enumerate((True, False)):
        architecture = ARCHITECTURES[(index + 2 * k) % len(ARCHITECTURES)]
        placement = PLACEMENTS[(index + k) % len(PLACEMENTS)]
        chosen.append(make_case(100 + 7 * index + k, architecture, placement, planted, boxes=1 + (index + k) % 3,
                                disjuncts=1 + (index + k) % 2, saturated=(index + k) % 4 == 1))
    return chosen


@pytest.mark.parametrize("index, method, branching",
                         [(i, m, b) for i, (m, b) in enumerate(COMBINATIONS)],
                         ids=[f"{m}-{b}" for m, b in COMBINATIONS])
def test_verify_never_holds_on_a_planted_case(tmp_path, index, method, branching):
    for case in cases_for(index):
        model, spec = case.write(tmp_path)
        result = verify(model, spec, timeout=TIMEOUT, method=method, branching=branching)
        if case.planted:
            assert result.status != "holds", case.name
        else:
            assert result.status != "violated", case.name
        if result.status == "violated":
            x, _ = result.counterexample
            assert case.violates(x), case.name


@pytest.mark.parametrize("seed, architecture", [(3, "dense"), (2, "tanh")])
def test_verify_finds_a_needle_in_three_inputs(tmp_path, seed, architecture):
    """Branch and bound halves boxes towards the pocket (no attack start lands in it) and tries their centers."""
    case = make_case(seed, architecture, "interior", True, inputs=3)
    model, spec = case.write(tmp_path)
    result = verify(model, spec, timeout=8.0, method="crown")
    assert result.status == "violated" and case.violates(result.counterexample[0])


def root_attack(case, folder, bound_graph: bool, seconds: float = 5.0) -> bool:
    """verify's attack on the property's own boxes (its root settings): a counterexample confirmed by onnxruntime?"""
    import time

    from graphcert.verify.network import Network
    from graphcert.verify.search import Search
    from graphcert.vnnlib import load_property
    model, spec = case.write(folder)
    prop = load_property(spec)
    search = Search(prop, Network(model), time.monotonic() + seconds)
    if not bound_graph:
        search.attack.bound_corners = None
    lower, upper, alive = prop.root_boxes()
    found = search.attack_boxes(lower, upper, alive, budget=1.0, samples=1024, restarts=32, steps=100)
    return found and case.violates(search.counterexample[0])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_attack_finds_a_pocket_at_a_vertex(tmp_path, architecture):
    """Few inputs: every vertex is sampled. Conv nets (16-25 inputs): the bound graph's weakest corner."""
    assert root_attack(make_case(11, architecture, "corner", boxes=2, disjuncts=2), tmp_path, bound_graph=True)


def test_without_the_bound_graph_a_vertex_among_many_is_missed(tmp_path):
    """The conv pocket's vertex is one of 2^16 or more: random vertices and gradient corners miss it."""
    case = make_case(11, "conv", "corner", boxes=2, disjuncts=2)
    assert not root_attack(case, tmp_path, bound_graph=False, seconds=3.0)
