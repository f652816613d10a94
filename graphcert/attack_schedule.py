"""The sign-step schedule and float32 boxes of projected descent (`graphcert.attack`, `graphcert.verify.descent`): apart from the
attack so that a search can descend without importing torch."""
from __future__ import annotations

import math

import numpy as np


def step_scale(step: int, steps: int) -> float:
    """Sign-step size relative to the box width: cosine-decayed over the first 70 % of the steps (large moves
    escape flat regions), then geometric from 1e-2 to 1e-5 (counterexamples can sit in slivers thinner than
    the cosine schedule's last step)."""
    coarse = max(1, int(0.7 * steps))
    if step < coarse:
        return 0.25 * 0.5 * (1 + math.cos(math.pi * step / coarse)) + 1e-3
    fraction = (step - coarse) / max(1, steps - coarse - 1)
    return 1e-2 * 1e-3 ** fraction


def inner_float32(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 box inside [lower, upper]: clamped attack points never leave the real input set."""
    lo = lower.astype(np.float32)
    hi = upper.astype(np.float32)
    lo = np.where(lo < lower, np.nextafter(lo, np.float32(np.inf)), lo)
    hi = np.where(hi > upper, np.nextafter(hi, np.float32(-np.inf)), hi)
    return lo, np.maximum(hi, lo)
