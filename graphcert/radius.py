"""The largest radius a method certifies for each sample: batched bisection on a per-sample epsilon.

Every radius reported is one at which the bound graph itself certified the sample (fed as float32, exactly the
value reported), so a reported radius is as sound as `certify` at that radius. Bisection assumes that
certification is monotone in the radius; where a method is not, the answer is smaller than the true largest
radius, never larger.

`lipschitz` margins are affine in the radius (margin - eps * K * ||row W||, minus a float32 slack), so two
runs, at 0 and at 1, give the closed form min over rows of lower(0) / (lower(0) - lower(1)) (taken 2^-12
relatively inside, so float32 rounding does not decide it); the graph then confirms it, and bisection takes over only where float rounding made the closed form miss.
"""
from __future__ import annotations

import numpy as np

from .certify import certified_mask

DEFAULT_TOLERANCE = 1e-4
CLOSED_FORM = ("lipschitz",)
# Radii are doubled this many times at most while a sample stays certified (a model certified on every ball
# up to 2^40 times the first probe is reported at that radius).
MAX_DOUBLINGS = 40
MAX_BISECTIONS = 64
# The closed-form radius is confirmed this fraction inside its zero crossing.
CLOSED_FORM_MARGIN = 2.0 ** -12


def _per_sample(radii: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(radii, dtype=np.float32).reshape((-1,) + (1,) * (x.ndim - 1))


class _Probe:
    """Runs the certifier on a subset of samples at per-sample radii; returns which are certified."""

    def __init__(self, bounder, x, objective, y):
        self.bounder, self.x, self.objective, self.y = bounder, x, objective, y

    def __call__(self, index: np.ndarray, radii: np.ndarray) -> np.ndarray:
        if not len(index):
            return np.zeros(0, dtype=bool)
        logits, lower = self.bounder(self.x[index], _per_sample(radii, self.x), self.objective[index])
        return certified_mask(logits, lower, self.y[index])


def radius_search(bounder, method: str, x: np.ndarray, objective: np.ndarray, y: np.ndarray, norm: str,
                  domain, tolerance: float = DEFAULT_TOLERANCE, known=None) -> tuple[np.ndarray, np.ndarray]:
    """(logits at x, certified radius per sample): 0 where the sample is misclassified or not certified even at
    radius 0. `known` = (radii, certified [batch, len(radii)]) from a sweep narrows the first bracket."""
    logits, lower = bounder(x, np.float32(0.0), objective)
    start = certified_mask(logits, lower, y)
    n = len(y)
    lo = np.zeros(n, dtype=np.float32)
    hi = np.full(n, np.inf, dtype=np.float32)
    probe = _Probe(bounder, x, objective, y)
    if method in CLOSED_FORM:
        _, lower_one = bounder(x, np.float32(1.0), objective)
        slope = lower.astype(np.float64) - lower_one.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            each = np.where(slope > 0, lower / slope, np.inf)
        # a hair inside the zero crossing, so that float32 rounding of the graph does not decide the confirmation
        guess = np.where(start, each.min(axis=1) * (1 - CLOSED_FORM_MARGIN), 0.0).astype(np.float32)
        index = np.flatnonzero(start & np.isfinite(guess) & (guess > 0))
        confirmed = probe(index, guess[index])
        lo[index[confirmed]] = hi[index[confirmed]] = guess[index[confirmed]]
        hi[index[~confirmed]] = guess[index[~confirmed]]
    elif known is not None:
        radii, flags = known
        radii = np.asarray(radii, dtype=np.float32)
        for k, r in enumerate(radii):
            lo = np.where(flags[:, k], np.maximum(lo, r), lo)
            hi = np.where(~flags[:, k] & start, np.minimum(hi, r), hi)
    hi = np.where(start, hi, 0.0).astype(np.float32)
    _double(probe, start, lo, hi, first=np.float32(max(float(np.max(known[0])) * 2 if known is not None else 0.0,
                                                         tolerance * 16)))
    _bisect(probe, lo, hi, tolerance)
    return logits, lo.astype(np.float64)


def _double(probe, start, lo, hi, first) -> None:
    """Grow an upper bracket for samples that have none: double while certified."""
    for _ in range(MAX_DOUBLINGS):
        index = np.flatnonzero(start & np.isinf(hi))
        if not len(index):
            return
        radii = np.maximum(lo[index] * 2, first).astype(np.float32)
        ok = probe(index, radii)
        lo[index[ok]] = radii[ok]
        hi[index[~ok]] = radii[~ok]
    hi[np.isinf(hi)] = lo[np.isinf(hi)]   # certified up to the last doubling: report that radius


def _bisect(probe, lo, hi, tolerance) -> None:
    for _ in range(MAX_BISECTIONS):
        index = np.flatnonzero(hi - lo > tolerance)
        if not len(index):
            return
        mid = ((lo[index].astype(np.float64) + hi[index]) / 2).astype(np.float32)
        moved = (mid > lo[index]) & (mid < hi[index])   # float32 cannot split the bracket further: stop there
        index, mid = index[moved], mid[moved]
        if not len(index):
            return
        ok = probe(index, mid)
        lo[index[ok]] = mid[ok]
        hi[index[~ok]] = mid[~ok]
