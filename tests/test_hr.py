"""Holistic robust training: the closed-form worst-case weights against a generic solver, their properties,
and training with them."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from graphcert.errors import InputError
from graphcert.training.hr import hr_weights
from graphcert.training.loop import TrainConfig, train


def solver_value(losses: np.ndarray, alpha: float, r: float, rng) -> float | None:
    """The HR ("HD") program solved by SLSQP from several starts: max p·[l, max l] over p in the simplex,
    with q_i = 1/N - s_i, q_extra = sum s, 0 <= s_i <= 1/N, sum s <= alpha, KL(q || p) <= r."""
    n = len(losses)
    extended = np.append(losses, losses.max())

    def split(z):
        return z[:n + 1], z[n + 1:]

    def kl(z):
        p, s = split(z)
        q = np.append(1.0 / n - s, s.sum())
        keep = q > 1e-15
        return float(np.sum(q[keep] * np.log(q[keep] / np.maximum(p[keep], 1e-300))))

    def kl_gradient(z):
        p, s = split(z)
        q = np.append(1.0 / n - s, s.sum())
        ratio = np.where(q > 1e-15, np.log(np.maximum(q, 1e-300) / np.maximum(p, 1e-300)) + 1.0, 0.0)
        d_p = np.where(q > 1e-15, -q / np.maximum(p, 1e-300), 0.0)
        return -np.concatenate([d_p, ratio[-1] - ratio[:-1]])   # of r - KL: q_i = 1/N - s_i, q_extra = sum s

    # Exact gradients (the program's functions are linear but for the KL term): SLSQP's finite differences
    # took most of the test's time.
    objective_gradient = np.concatenate([-extended, np.zeros(n)])
    constraints = [{"type": "eq", "fun": lambda z: split(z)[0].sum() - 1.0,
                    "jac": lambda z: np.concatenate([np.ones(n + 1), np.zeros(n)])},
                   {"type": "ineq", "fun": lambda z: alpha - split(z)[1].sum(),
                    "jac": lambda z: np.concatenate([np.zeros(n + 1), -np.ones(n)])},
                   {"type": "ineq", "fun": lambda z: r - kl(z), "jac": kl_gradient}]
    bounds = [(1e-12, 1.0)] * (n + 1) + [(0.0, 1.0 / n)] * n
    best = None
    for _ in range(8):
        start = np.concatenate([rng.dirichlet(np.ones(n + 1)), np.full(n, min(alpha, 1.0) / (2 * n))])
        found = minimize(lambda z: -(split(z)[0] @ extended), start, jac=lambda z: objective_gradient, bounds=bounds,
                         constraints=constraints, method="SLSQP", options={"maxiter": 500, "ftol": 1e-12})
        feasible = abs(constraints[0]["fun"](found.x)) < 1e-7 and all(c["fun"](found.x) > -1e-7 for c in constraints[1:])
        if found.success and feasible:
            best = -found.fun if best is None else max(best, -found.fun)
    return best


def test_closed_form_weights_reach_the_solver_optimum():
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(12):
        n = int(rng.integers(3, 9))
        losses = rng.exponential(1.0, n)
        alpha, r = float(rng.choice([0.0, 0.1, 0.3])), float(rng.choice([0.0, 0.05, 0.3, 1.0]))
        ours = float(hr_weights(losses, alpha, r) @ losses)
        reference = solver_value(losses, alpha, r, rng)
        if reference is None:
            continue
        compared += 1
        assert ours == pytest.approx(reference, rel=1e-5, abs=1e-7)
    assert compared >= 8


def test_weights_are_a_distribution_growing_with_the_loss():
    losses = np.random.default_rng(1).normal(1.0, 0.5, 200) ** 2
    for alpha, r in [(0.0, 0.0), (0.05, 0.0), (0.0, 0.1), (0.05, 0.1), (1.0, 0.0)]:
        weights = hr_weights(losses, alpha, r)
        assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
        order = np.argsort(losses)
        assert np.all(np.diff(weights[order][:-1]) >= -1e-12)   # the worst sample also holds the extra atom
    np.testing.assert_allclose(hr_weights(losses, 0.0, 0.0), np.full(200, 1 / 200))
    assert hr_weights(losses, 1.0, 0.0)[np.argmax(losses)] == pytest.approx(1.0)
    # Poisoning removes the lowest alpha of the mass; more of either error source never lowers the loss.
    assert np.count_nonzero(hr_weights(losses, 0.05, 0.0) == 0) == 10
    values = [hr_weights(losses, a, r) @ losses for a, r in [(0, 0), (0, 0.05), (0, 0.2), (0.05, 0.2), (0.2, 0.2)]]
    assert values == sorted(values) and values[0] == pytest.approx(losses.mean())


def test_equal_losses_keep_uniform_weights_and_bad_settings_are_refused():
    np.testing.assert_allclose(hr_weights(np.full(5, 0.7), 0.0, 0.5) @ np.full(5, 0.7), 0.7)
    for alpha, r in [(-0.1, 0.0), (1.5, 0.0), (0.0, -1.0), (float("nan"), 0.0), (0.0, float("inf"))]:
        with pytest.raises(InputError):
            hr_weights(np.ones(3), alpha, r)
    with pytest.raises(InputError):
        hr_weights(np.array([1.0, np.nan]), 0.1, 0.1)


def test_holistic_steps_train_on_the_worst_case_weights_of_the_batch():
    from graphcert.training.backends import StepResult
    from graphcert.training.loop import _step

    losses = np.array([0.2, 1.5, 0.7, 3.0], dtype=np.float32)

    class Recorder:
        def evaluate(self, feeds):
            return StepResult(0.0, 0.0, 0.0, np.ones((4, 1)), np.ones((4, 1)), losses)

        def train_step(self, feeds):
            self.weights = feeds["sample_weights"]
            return None

    config = TrainConfig(output="unused.onnx", eps=0.1, arch="mlp", hr_alpha=0.25, hr_r=0.1)
    backend = Recorder()
    _step(backend, {"sample_weights": np.full(4, 0.25, np.float32)}, config)
    np.testing.assert_allclose(backend.weights, hr_weights(losses, 0.25, 0.1), rtol=1e-6)
    assert backend.weights[0] == 0 and float(backend.weights @ losses) > losses.mean()
    plain = TrainConfig(output="unused.onnx", eps=0.1, arch="mlp")
    _step(backend, {"sample_weights": np.full(4, 0.25, np.float32)}, plain)
    np.testing.assert_allclose(backend.weights, 0.25)


def test_holistic_training_runs_end_to_end(tmp_path):
    common = dict(arch="mlp", data="digits", eps=0.02, epochs=3, batch_size=128, lr=3e-3, holdout=0.2)
    holistic = train(TrainConfig(output=str(tmp_path / "hr.onnx"), hr_alpha=0.05, hr_r=0.1, **common))
    assert holistic.holdout.clean_accuracy > 0.5
    with pytest.raises(InputError, match="alpha"):
        train(TrainConfig(output=str(tmp_path / "bad.onnx"), hr_alpha=2.0, **common))
