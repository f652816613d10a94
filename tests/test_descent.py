"""The torch-free descent (`graphcert.verify.descent`): its gradients, its points, and verify ending on them before
torch loads."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from conftest import shared_path
from graphcert.verify import descent as descent_module
from graphcert.verify.descent import CoefficientDescent
from graphcert.verify.network import Network
from graphcert.verify.resources import Budget
from graphcert.verify.search import Search, unsafe_objective
from graphcert.vnnlib import load_property
from test_relu_split import relu_network, write_box_property
from test_verify import confirmed_by_onnxruntime


def activation_mlp(path, activation: str, widths: list[int], seed: int):
    """A batched MLP with `activation` between its layers (`relu_network`'s), saved to path; its layers."""
    proto, layers = relu_network(widths, seed, activation, batch="batch")
    onnx.save(proto, path)
    return layers


def model_outputs(layers, x: np.ndarray, activation: str) -> np.ndarray:
    act = {"Relu": lambda v: np.maximum(v, 0), "Sigmoid": lambda v: 1 / (1 + np.exp(-v)), "Tanh": np.tanh}[activation]
    h = x.astype(np.float64)
    for k, (w, bias) in enumerate(layers):
        h = h @ w + bias
        if k < len(layers) - 1:
            h = act(h)
    return h


def interval_top(layers, activation: str) -> float:
    """A sound upper bound of y_0 over [-1, 1]^4 (interval arithmetic in float64)."""
    act = {"Relu": lambda v: np.maximum(v, 0), "Sigmoid": lambda v: 1 / (1 + np.exp(-v))}[activation]
    lo, hi = -np.ones(4), np.ones(4)
    for k, (w, bias) in enumerate(layers):
        centre, radius = (lo + hi) / 2 @ w + bias, (hi - lo) / 2 @ np.abs(w)
        lo, hi = centre - radius, centre + radius
        if k < len(layers) - 1:
            lo, hi = act(lo), act(hi)
    return float(hi[0])


def descent_for(tmp_path, activation: str, constraint: str, seed: int = 0):
    model = tmp_path / f"{activation}.onnx"
    layers = activation_mlp(model, activation, [4, 24, 24, 3], seed)
    spec = tmp_path / "p.vnnlib"
    write_box_property(spec, 4, -1, 1, constraint, 3)
    network = Network(model)
    search = Search(load_property(spec), network, time.monotonic() + 60, rounding="real")
    return layers, network, search, CoefficientDescent(network, search.matrix, search.offset, search.membership)


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid", "Tanh"])
def test_coefficients_around_a_point_are_the_margins_gradient(tmp_path, activation):
    """CROWN-IBP's input coefficients on a small box centred on a point match central finite differences of
    the margins there, and the margins returned are the point's own."""
    layers, network, search, descent = descent_for(tmp_path, activation, "(>= Y_0 Y_1)")
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.8, 0.8, size=(6, 4))
    margins, gradients = descent.coefficients_on(x - 1e-3, x + 1e-3, chunk=4)
    rows = lambda points: model_outputs(layers, points, activation) @ search.matrix.T + search.offset  # noqa: E731
    np.testing.assert_allclose(margins, rows(x), rtol=1e-4, atol=1e-4)
    h = 1e-4
    for i in range(4):
        step = np.zeros(4)
        step[i] = h
        numeric = (rows(x + step) - rows(x - step)) / (2 * h)
        # a ReLU net's gradient jumps where a unit's input crosses 0 inside the small box: most points agree
        close = np.isclose(gradients[:, :, i], numeric, rtol=2e-2, atol=2e-3)
        assert close.mean() >= (0.8 if activation == "Relu" else 1.0)


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid"])
def test_descent_reaches_a_reachable_threshold_and_never_claims_an_unreachable_one(tmp_path, activation):
    """y_0 >= t with t just below the largest y_0 over a dense sample of the box: the descent finds a point
    whose y_0 (recomputed) reaches t, inside the box; with t above the box's largest value (a sound interval
    bound) every objective it returns stays positive and matches the model's margins."""
    layers, network, search, descent = descent_for(tmp_path, activation, "(>= Y_0 0)")
    grid = np.random.default_rng(2).uniform(-1, 1, size=(200000, 4))
    top = model_outputs(layers, grid, activation)[:, 0].max()
    lower, upper = -np.ones((1, 4)), np.ones((1, 4))
    write_box_property(tmp_path / "p.vnnlib", 4, -1, 1, f"(>= Y_0 {top - 0.05})", 3)
    search = Search(load_property(tmp_path / "p.vnnlib"), network, time.monotonic() + 60, rounding="real")
    descent = CoefficientDescent(network, search.matrix, search.offset, search.membership)
    points, objective = descent.run(lower, upper, np.ones((1, 1), bool), time.monotonic() + 20, Budget())
    assert objective[0] <= 0
    assert (points[0] >= -1).all() and (points[0] <= 1).all()
    assert model_outputs(layers, points[:1].astype(np.float32), activation)[0, 0] >= top - 0.05 - 1e-5
    # Unreachable: above an interval bound of y_0 over the box
    bound = interval_top(layers, activation) + 0.1
    write_box_property(tmp_path / "q.vnnlib", 4, -1, 1, f"(>= Y_0 {bound})", 3)
    search = Search(load_property(tmp_path / "q.vnnlib"), network, time.monotonic() + 60, rounding="real")
    descent = CoefficientDescent(network, search.matrix, search.offset, search.membership)
    calls = []
    original = descent.coefficients_on
    descent.coefficients_on = lambda *args: calls.append(1) or original(*args)
    points, objective = descent.run(lower, upper, np.ones((1, 1), bool), time.monotonic() + 20, Budget(), steps=40)
    assert (objective > 0).all()
    # it stopped once its best settled (one call on the box, then one per step)
    assert descent_module.PLATEAU[0] <= len(calls) - 2 < 40
    recomputed = model_outputs(layers, points.astype(np.float32), activation) @ search.matrix.T + search.offset
    alive = np.ones((len(points), 1), bool)
    np.testing.assert_allclose(objective, unsafe_objective(recomputed, search.membership, alive), rtol=1e-4, atol=1e-4)


def test_descent_searches_nothing_when_one_point_would_not_fit_the_memory_budget(tmp_path):
    layers, network, search, descent = descent_for(tmp_path, "Relu", "(>= Y_0 100)")
    points, objective = descent.run(-np.ones((1, 4)), np.ones((1, 4)), np.ones((1, 1), bool), time.monotonic() + 5,
                                    Budget(descent.bytes_per_point - 1))
    assert len(points) == len(objective) == 0


@pytest.mark.parametrize("network, spec", [
    (("mnistfc", "mnist-net_256x2.onnx"), ("mnistfc", "prop_0_0.05.vnnlib")),
    (("eran", "nets", "ffnnSIGMOID__Point_6x200.onnx"), ("eran", "specs", "mnist", "mnist_spec_idx_7259_eps_0.01200.vnnlib"))])
def test_verify_finds_these_counterexamples_without_loading_torch(network, spec):
    """Two violated properties of the shared benchmarks (a ReLU net whose counterexample PGD from the box's
    samples misses, a Sigmoid net) end in a confirmed counterexample before torch is imported."""
    model = shared_path("benchmarks", "vnncomp2021", *network)
    prop = shared_path("benchmarks", "vnncomp2021", *spec)
    script = ("import sys, numpy as np; from graphcert.verify import verify; "
              f"r = verify({str(model)!r}, {str(prop)!r}, timeout=60); "
              "np.save(sys.argv[1], r.counterexample[0]) if r.counterexample else None; "
              "print(r.status, 'torch' in sys.modules)")
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        saved = f"{folder}/x.npy"
        out = subprocess.run([sys.executable, "-c", script, saved], capture_output=True, text=True, check=True,
                             timeout=300).stdout.split()
        assert out == ["violated", "False"]
        x = np.load(saved)
    network_ = Network(model)
    found = network_.confirm(load_property(prop), x)
    assert found is not None and confirmed_by_onnxruntime(model, prop, found)
