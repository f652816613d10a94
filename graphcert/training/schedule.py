"""Per-step schedules of the training radius and the clean-loss weight kappa.

Training runs `warmup` epochs at epsilon = 0 (kappa = 1, plain cross-entropy), then `rampup` epochs in
which epsilon grows to its target and kappa falls to its final value, then the remaining epochs at the
target. Both change every batch, not every epoch.

The `smooth` shape is the schedule of Shi et al. 2021 ("Fast certified robust training with short
warmup"): epsilon grows as a power p**beta of the ramp progress p for the first quarter of the ramp and
then linearly, the two pieces meeting with equal value and slope, so bounds are not hit by a large radius
while the weights still suit epsilon = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

SHAPES = ("linear", "smooth")
SMOOTH_MID_POINT = 0.25
SMOOTH_POWER = 4.0


@dataclass(frozen=True)
class Schedule:
    eps: float
    warmup: int
    rampup: int
    kappa: float
    shape: str
    steps_per_epoch: int

    def progress(self, step: int) -> float:
        """How far the ramp is after `step` + 1 batches (0-based step): 0 during warm-up, 1 from its end."""
        start = self.warmup * self.steps_per_epoch
        length = self.rampup * self.steps_per_epoch
        if step < start:
            return 0.0
        if length == 0:
            return 1.0
        return min(1.0, (step + 1 - start) / length)

    def epsilon(self, step: int) -> float:
        p = self.progress(step)
        return self.eps * (smooth_ramp(p) if self.shape == "smooth" else p)

    def kappa_at(self, step: int) -> float:
        return 1.0 - (1.0 - self.kappa) * self.progress(step)


def smooth_ramp(p: float, mid: float = SMOOTH_MID_POINT, power: float = SMOOTH_POWER) -> float:
    """a·p**power up to `mid`, then the tangent line there, with a chosen so the line reaches 1 at p = 1:
    a·mid**power + a·power·mid**(power-1)·(1 - mid) = 1."""
    a = 1.0 / (mid ** (power - 1) * (mid + power * (1.0 - mid)))
    if p <= mid:
        return a * p ** power
    return min(1.0, a * mid ** power + a * power * mid ** (power - 1) * (p - mid))


def default_phases(epochs: int, warmup: int | None, rampup: int | None) -> tuple[int, int]:
    """Warm-up and ramp-up epochs when not given: a fifth of the epochs (rounded) warm up, the rest ramp
    (the 2 + 8 recipe for 10 epochs); a given value is kept and the other fills the remaining epochs."""
    if warmup is None:
        warmup = int((epochs if rampup is None else max(0, epochs - rampup)) / 5 + 0.5)
    if rampup is None:
        rampup = max(0, epochs - warmup)
    return warmup, rampup
