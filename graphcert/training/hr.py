"""Holistic robust (HR) sample weights: the worst-case reweighting of a batch's losses (Bennouna, Lucas and
Van Parys, ICML 2023, "HD" form) without a conic solver.

The HR loss is the largest expected loss over distributions P reachable from the batch's empirical
distribution by moving a fraction `alpha` of its mass anywhere (poisoning; within the batch, onto its worst
loss) and then by a KL step: KL(Q || P) <= r (statistical error). Evasion, the third error source, is in the
per-sample losses themselves: the robust ones are certified bounds at radius epsilon.

Both steps have closed forms. Poisoning: shifting mass towards higher losses never lowers the value of the
KL step, so the mass min(alpha, 1) comes from the lowest losses (each sample holds 1/N) and goes to an extra
atom at the highest loss. KL step: sup {E_P[l] : KL(Q || P) <= r} = min over eta > max l of
eta - e^-r prod_k (eta - l_k)^q_k, whose optimum solves g(eta) = 0 with
g(eta) = -r + sum_k q_k log(eta - l_k) + log sum_k q_k / (eta - l_k), strictly decreasing from +inf (just above
the largest loss, unless it holds all the mass) to -r; the weights are then p_k proportional to
q_k / (eta - l_k). The extra atom's weight goes to a sample with the largest loss, so the HR loss is the
weighted sum of the batch's own losses, and its gradient (Danskin) is that sum's gradient with the weights
held fixed.
"""
from __future__ import annotations

import math

import numpy as np

from graphcert.errors import InputError

_BISECTION_STEPS = 100


def check_hr(alpha: float, r: float) -> None:
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise InputError(f"the HR poisoning fraction alpha must be in [0, 1], got {alpha}")
    if not (math.isfinite(r) and r >= 0.0):
        raise InputError(f"the HR KL radius r must be a finite number >= 0, got {r}")


def hr_weights(losses: np.ndarray, alpha: float, r: float) -> np.ndarray:
    """Weights p (>= 0, summing to 1) with sum_i p_i·losses_i = the HR loss of the batch."""
    check_hr(alpha, r)
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    n = len(losses)
    if n == 0 or not np.all(np.isfinite(losses)):
        raise InputError("HR weights need a non-empty batch of finite losses")
    worst = int(np.argmax(losses))
    mass = _poisoned(losses, min(alpha, 1.0))
    weights = _kl_step(np.append(losses, losses[worst]), mass, r)
    combined = weights[:n].copy()
    combined[worst] += weights[n]
    return combined / combined.sum()


def _poisoned(losses: np.ndarray, alpha: float) -> np.ndarray:
    """Masses of the samples (1/N each) and of an extra atom at the worst loss, after moving `alpha` of the
    mass away from the lowest losses onto that atom."""
    n = len(losses)
    mass = np.full(n + 1, 1.0 / n)
    mass[n] = 0.0
    left = alpha
    for i in np.argsort(losses, kind="stable"):
        if left <= 0:
            break
        taken = min(mass[i], left)
        mass[i] -= taken
        mass[n] += taken
        left -= taken
    return mass


def _kl_step(losses: np.ndarray, mass: np.ndarray, r: float) -> np.ndarray:
    """argmax of E_P[losses] over P with KL(mass || P) <= r."""
    support = mass > 0
    top = losses[support].max()
    at_top = mass[support & (losses == top)].sum()
    if r == 0.0 or at_top >= 1.0 - 1e-12:
        return mass.copy()
    q, l = mass[support], losses[support]

    def g(log_gap: float) -> float:
        gap = (top - l) + math.exp(log_gap)                 # eta - l_k > 0
        return -r + float(np.sum(q * np.log(gap))) + math.log(float(np.sum(q / gap)))

    # Bracket the root in log(eta - top): g > 0 just above the top loss, g < 0 far above it. Where no bracket
    # exists in floating point, the optimum is one of the limits: all weight on the top loss, or none moved.
    low, high = -60.0, 60.0 + math.log1p(float(top - l.min()))
    for _ in range(10):
        if g(low) > 0:
            break
        low -= 60.0
    for _ in range(10):
        if g(high) <= 0 or high > 600.0:
            break
        high += 60.0
    if g(high) > 0:
        return mass.copy()
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if g(middle) > 0:
            low = middle
        else:
            high = middle
    gap = (top - l) + math.exp(0.5 * (low + high))
    weights = np.zeros_like(mass)
    weights[support] = q / gap
    return weights / weights.sum()
