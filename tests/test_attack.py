"""The attack: memory within its budget on specs with thousands of boxes and conjuncts, and its candidates."""
from __future__ import annotations

import subprocess
import time
import sys
import textwrap

import numpy as np
import pytest
import torch

from graphcert.attack import conjunct_margins, unsafe_objective
from conftest import shared_path
from test_verify import confirmed_by_onnxruntime, tiny_network

MANY_BOXES = textwrap.dedent("""
    import resource, sys, time
    import numpy as np
    from graphcert.verify import Network
    from graphcert.attack import Attack
    network = Network(sys.argv[1])
    boxes = 2000
    rng = np.random.default_rng(0)
    centers = rng.uniform(-1, 1, size=(boxes, 2))
    lower, upper = centers - 0.01, centers + 0.01
    # One conjunct per box, each of two rows (y0 >= t_i and y1 <= s_i): 2000 x 2000 liveness, 4000 rows.
    matrix = np.tile(np.array([[-1.0, 0.0], [0.0, 1.0]]), (boxes, 1))
    offset = np.tile(np.array([100.0, -100.0]), boxes)
    if sys.argv[2] == "reachable":      # the last box's conjunct is met at its center
        y = network.differentiable(__import__("torch").tensor(centers[-1:], dtype=__import__("torch").float32))
        offset[-2:] = [float(y[0, 0]) - 1e-3, -float(y[0, 1]) - 1e-3]
    membership = np.zeros((2 * boxes, boxes), dtype=bool)
    membership[np.arange(2 * boxes), np.arange(2 * boxes) // 2] = True
    alive = np.eye(boxes, dtype=bool)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attack = Attack(network.differentiable, matrix, offset, membership, memory_bytes=64 << 20)
    points, objective = attack.run(lower, upper, alive, time.monotonic() + 60, samples=256, restarts=8, steps=5)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    inside = bool(np.all((points >= lower[-1] - 1e-6) & (points <= upper[-1] + 1e-6), axis=1)[0])
    print(f"{grown:.0f} {objective[0]:.6g} {inside} {len(points)}")
""")


def run_many_boxes(tmp_path, mode):
    model = tmp_path / "tiny.onnx"
    tiny_network(model)
    out = subprocess.run([sys.executable, "-c", MANY_BOXES, str(model), mode], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return float(out[0]), float(out[1]), out[2] == "True", int(out[3])


def test_two_thousand_boxes_and_conjuncts_stay_within_the_memory_budget(tmp_path):
    grown_mb, objective, _, kept = run_many_boxes(tmp_path, "unreachable")
    # The former attack materialised [points, conjuncts, rows] at once here (tens of GB).
    assert grown_mb < 300, f"the attack grew by {grown_mb:.0f} MB"
    assert objective > 0 and kept <= 16


def test_the_only_reachable_conjunct_among_thousands_is_found(tmp_path):
    _, objective, inside, _ = run_many_boxes(tmp_path, "reachable")
    assert objective <= 0 and inside


def test_unsafe_objective_matches_the_dense_definition():
    rng = np.random.default_rng(1)
    margins = torch.tensor(rng.normal(size=(7, 5)), dtype=torch.float32)
    membership = torch.tensor(rng.random((5, 3)) < 0.5)
    membership[:, 2] = False                      # a conjunct without rows is met by every output
    alive = torch.tensor(rng.random((7, 3)) < 0.7)
    dense = margins.unsqueeze(1).masked_fill(~membership.T.unsqueeze(0), -np.inf).amax(dim=2)
    assert torch.equal(conjunct_margins(margins, membership), dense)
    assert torch.equal(unsafe_objective(margins, membership, alive), dense.masked_fill(~alive, np.inf).amin(dim=1))


# ---- starting points: the bound graph's weakest corners and the box's vertices ------------------------------

def linear_network(path, weights: np.ndarray) -> None:
    """y = x @ weights, batch axis symbolic."""
    import onnx
    from onnx import TensorProto, helper
    n, m = weights.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m])],
                              [onnx.numpy_helper.from_array(weights.astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_the_weakest_corner_of_a_linear_row_is_the_vertex_minimising_it(tmp_path):
    from graphcert.attack import BoundCorners
    from graphcert.verify.network import Network
    rng = np.random.default_rng(4)
    weights = rng.normal(size=(7, 3))
    linear_network(tmp_path / "linear.onnx", weights)
    network = Network(tmp_path / "linear.onnx")
    matrix = np.array([[1.0, -1.0, 0.0], [0.0, 0.5, 2.0]])
    corners = BoundCorners(network.model, network.differentiable, matrix, np.zeros(2), 1 << 30)
    lower = torch.tensor(rng.uniform(-2, 0, size=(2, 7)), dtype=torch.float32)
    upper = lower + torch.tensor(rng.uniform(0.1, 1, size=(2, 7)), dtype=torch.float32)
    slopes = matrix @ weights.T                                   # each row's slope in x: [rows, n]
    for row in range(2):
        found = corners(lower, upper, torch.tensor([row]), 1, time.monotonic() + 60)
        assert found is not None and found.shape == (2, 1, 7)
        expected = torch.where(torch.tensor(slopes[row]) > 0, lower, upper)
        assert torch.equal(found[:, 0], expected)
    # Ranked by lower bound: asked for both rows, each box's first corner belongs to its weaker row.
    both = corners(lower, upper, torch.tensor([0, 1]), 2, time.monotonic() + 60)
    for box in range(2):
        low = [float(slopes[r] @ np.where(slopes[r] > 0, lower[box], upper[box])) for r in range(2)]
        weaker = int(np.argmin(low))
        assert torch.equal(both[box, 0], torch.where(torch.tensor(slopes[weaker]) > 0, lower[box], upper[box]))


@pytest.mark.parametrize("network, spec", [("mnist-net_256x2.onnx", "prop_0_0.05.vnnlib"),
                                           ("mnist-net_256x4.onnx", "prop_14_0.05.vnnlib"),
                                           ("mnist-net_256x6.onnx", "prop_3_0.05.vnnlib")])
def test_mnistfc_counterexamples_that_start_from_weakest_corners(network, spec):
    """PGD from every other start stalls at margins 0.96 / 0.73 on 256x2 prop_0 and 256x6 prop_3 (α,β-CROWN
    times out on the first); from the CROWN weakest corner of the weakest rows it crosses zero."""
    from graphcert.verify.network import Network
    from graphcert.verify.search import Search
    from graphcert.vnnlib import load_property
    folder = shared_path("benchmarks", "vnncomp2021", "mnistfc")
    prop = load_property(folder / spec)
    search = Search(prop, Network(folder / network), time.monotonic() + 10)
    [(lower, upper)] = prop.input_boxes
    alive = np.ones((1, len(prop.unsafe)), dtype=bool)
    assert search.attack_boxes(lower[None], upper[None], alive, budget=1.0, samples=1024, restarts=32, steps=100)
    assert confirmed_by_onnxruntime(folder / network, folder / spec, search.counterexample)


def test_the_search_s_numpy_unsafe_objective_equals_the_attack_s():
    """verify.search.unsafe_objective (numpy, so that a search the bounds decide never loads torch) gives
    graphcert.attack's values: conjuncts of several rows, of none (-inf), and none alive (+inf)."""
    import torch

    from graphcert.verify.search import unsafe_objective as numpy_objective
    rng = np.random.default_rng(0)
    membership = np.zeros((7, 4), dtype=bool)
    membership[[0, 1, 2], 0] = membership[[3], 1] = membership[[4, 5, 6], 2] = True   # conjunct 3: no rows
    margins = rng.normal(size=(50, 7))
    alive = rng.random((50, 4)) < 0.6
    alive[0] = False
    alive[1] = [False, False, False, True]
    expected = unsafe_objective(torch.from_numpy(margins), torch.from_numpy(membership), torch.from_numpy(alive))
    found = numpy_objective(margins, membership, alive)
    assert found[0] == np.inf and found[1] == -np.inf
    np.testing.assert_array_equal(found, expected.numpy())
