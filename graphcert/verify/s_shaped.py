"""Sigmoid and Tanh units in branch and bound (`relu_bab`): where to split an interval, whether a split can
still gain (the curve's distance from its chord), and when the root's alpha-CROWN has stopped gaining."""
from __future__ import annotations

import numpy as np

# Units other than ReLUs are split while their relaxation can gain: the function strays from its chord by more
# than GAP_FLOOR somewhere on the interval, which is wider than WIDTH_FLOOR relative to its ends (the middle of
# a narrower float32 interval may not lie strictly inside it).
GAP_FLOOR = 1e-6
WIDTH_FLOOR = 1e-5
CHORD_POINTS = 8
CURVES = {"Sigmoid": lambda v: 0.5 * (1.0 + np.tanh(0.5 * v)), "Tanh": np.tanh}


class RootPlateau:
    """True once every box's score (the weakest live conjunct's bound, `score(lower)` per box) is positive or
    gained less than `share` of its distance to 0 over the last `window` steps."""

    def __init__(self, score, window: int, share: float):
        self.score, self.window, self.share, self.history = score, window, share, []

    def __call__(self, lower) -> bool:
        self.history.append(np.atleast_1d(np.asarray(self.score(lower), dtype=np.float64)))
        window, share = self.window, self.share
        if len(self.history) <= window:
            return False
        now, before = self.history[-1], self.history[-1 - window]
        return bool(((now > 0) | (now - before < share * np.abs(now))).all())


class Hopeless:
    """True once every box's score is positive or will not reach 0 if its gains keep shrinking as they did in the
    last step: gains g, g·q, g·q², ... (q the last gain over the one before, at most RATIO_CAP) add up to
    g·q/(1-q). For a first, cheaper bound that is abandoned once it will not prove the property."""

    RATIO_CAP = 0.9

    def __init__(self, score):
        self.score, self.history = score, []

    def __call__(self, lower) -> bool:
        self.history.append(np.atleast_1d(np.asarray(self.score(lower), dtype=np.float64)))
        if len(self.history) < 3:
            return False
        now, last, before = self.history[-1], self.history[-2], self.history[-3]
        gain, previous = np.maximum(now - last, 0.0), np.maximum(last - before, 0.0)
        ratio = np.minimum(np.divide(gain, previous, out=np.full_like(gain, self.RATIO_CAP), where=previous > 0),
                           self.RATIO_CAP)
        reach = now + gain * ratio / (1.0 - ratio)
        return bool(((now > 0) | (reach < 0)).all())


def split_point(lower: np.ndarray, upper: np.ndarray, relu: np.ndarray) -> np.ndarray:
    """Where to split each unit's interval: 0 for a ReLU or an interval holding 0, else the middle (float32)."""
    holds_zero = (lower < 0) & (upper > 0)
    middle = (0.5 * (lower.astype(np.float64) + upper)).astype(np.float32)
    return np.where(relu | holds_zero, np.float32(0), middle).astype(np.float32)


def chord_gap(curve, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The largest distance between curve(z) and its chord over [lower, upper] at CHORD_POINTS inner points
    (0 where the interval is below the width floor), in float64."""
    lower, upper = lower.astype(np.float64), upper.astype(np.float64)
    width = upper - lower
    wide = np.isfinite(width) & (width > WIDTH_FLOOR * (1.0 + np.abs(lower) + np.abs(upper)))
    lower, width = np.where(wide, lower, 0.0), np.where(wide, width, 0.0)
    start, end = curve(lower), curve(lower + width)
    gap = np.zeros_like(lower)
    for k in range(1, CHORD_POINTS + 1):
        t = k / (CHORD_POINTS + 1)
        gap = np.maximum(gap, np.abs(curve(lower + t * width) - (start + t * (end - start))))
    return np.where(gap > GAP_FLOOR, gap, 0.0)
