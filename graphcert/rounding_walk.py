"""What graphcert.rounding's rules read and emit while they walk a model: the builder, the error E of every
perturbed value, and bounds of every value over the input set (from which magnitudes M come)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .arithmetic import FLOAT32
from .builder import Builder
from .model import static_shape

SAFETY = 1.0 + 2.0 ** -10         # the A/E graph itself rounds: every rule's result is pushed up by this


class Walk:
    """What rules read and emit: the builder, E of every perturbed value, and bounds of every value over the
    input set: IBP intervals over boxes, or for L2 balls the value at the centre ± K·ε, K its Lipschitz
    constant (IBP over the box around an L2 ball is far looser)."""

    def __init__(self, b: Builder, intervals: dict, lipschitz: dict | None = None, radius: ir.Value | None = None):
        self.b = b
        self.intervals = intervals
        self.lipschitz, self.radius = lipschitz, radius
        self.spreads: dict = {}   # L2 balls: per-element spreads of some values (rounding_norms.element_spreads)
        self.reach: dict = {}     # L2 balls, linear outputs z = W·h: bounds on |W|·|h(x) - h(centre)| per element
        self.errors: dict[ir.Value, ir.Value] = {}
        self.norms = None   # a rounding_norms.NormTracker when L2 norms of the errors are tracked too
        # 1 for a float64 model narrowed to float32 when loaded (graphcert.dtypes): each weight w32 = w64·(1 + δ),
        # |δ| <= u, is one more rounding in every product, so γ_n becomes γ_{n+1}; the float64 model's own
        # rounding (u = 2^-53) is far below what the float32 analysis allows.
        self.weight_rounding = 0
        self.arithmetic = FLOAT32   # the arithmetic analysed (graphcert.arithmetic); `unit` is its u
        self._magnitudes: dict[ir.Value, ir.Value] = {}

    @property
    def unit(self) -> float:
        return self.arithmetic.unit

    def gamma(self, n: int) -> float:
        return self.arithmetic.gamma(n + self.weight_rounding)

    def c(self, number: float) -> ir.Value:
        return self.b.const(np.float32(number))

    def upper(self, value: ir.Value) -> ir.Value:
        if self.lipschitz is not None:
            return self.b.op("Add", value, self._spread(value))
        interval = self.intervals[value]
        return (interval.materialised() if getattr(interval, "shared", False) else interval).upper

    def _spread(self, value: ir.Value) -> ir.Value:
        rank = len(static_shape(value))
        radius = self.b.op("Reshape", self.radius, self.b.ints([-1, *([1] * (rank - 1))]))
        per_element = self.spreads.get(value)
        if per_element is not None:
            return self.spread_of(value, per_element)
        return self.b.op("Mul", radius, self.c(self.lipschitz[value.name]))

    def spread_of(self, value: ir.Value, per_element: np.ndarray) -> ir.Value:
        """radius · a per-element float64 array (rounded up to float32), shaped like `value`."""
        rank = len(static_shape(value))
        radius = self.b.op("Reshape", self.radius, self.b.ints([-1, *([1] * (rank - 1))]))
        array = per_element.astype(np.float32)
        array = np.where(array < per_element, np.nextafter(array, np.float32(np.inf)), array)
        return self.b.op("Mul", radius, self.b.const(array[None] if rank > array.ndim else array))

    def magnitude(self, value: ir.Value) -> ir.Value:
        """A bound on |value| over the input set (the value itself when it does not depend on the input)."""
        if value not in self._magnitudes:
            if value in self.errors and self.lipschitz is not None:
                found = self.b.op("Add", self.b.op("Abs", value), self._spread(value))
            elif value in self.intervals:
                interval = self.intervals[value]
                interval = interval.materialised() if getattr(interval, "shared", False) else interval
                found = self.b.op("Max", self.b.op("Abs", interval.lower), self.b.op("Abs", interval.upper))
            elif value.const_value is not None:
                found = self.b.const(np.abs(value.const_value.numpy()).astype(np.float32))
            else:
                found = self.b.op("Abs", value)
            self._magnitudes[value] = found
        return self._magnitudes[value]

    def forget_magnitude(self, value: ir.Value) -> None:
        self._magnitudes.pop(value, None)

    def up(self, value: ir.Value) -> ir.Value:
        return self.b.op("Mul", value, self.c(SAFETY))

    def rounding(self, magnitude: ir.Value, factor: float) -> ir.Value:
        """factor·magnitude + k·η: what a rounding of relative size factor = k·u adds at most, with k underflow
        steps η below the normal range (a normal float32 constant at the least)."""
        steps = factor / self.unit * max(self.arithmetic.underflow, 2.0 ** -126)
        return self.b.op("Add", self.b.op("Mul", magnitude, self.c(factor)), self.c(steps))

    def plus(self, error: ir.Value, magnitude: ir.Value, factor: float) -> ir.Value:
        """error + factor·magnitude + k·η, pushed up: a rounding of relative size factor = k·u adds at most k
        underflow steps η below the normal range. Where magnitude + error may reach the arithmetic's largest
        number the computed value may overflow: the error is then unbounded (+inf)."""
        found = self.up(self.b.op("Add", error, self.rounding(magnitude, factor)))
        if self.arithmetic.largest >= FLOAT32.largest:
            return found
        b = self.b
        over = b.op("Greater", b.op("Add", magnitude, found), self.c(self.arithmetic.largest * (1 - 2 * self.unit)))
        return b.op("Where", over, self.c(np.inf), found)
