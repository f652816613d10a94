"""The interval domain used while rewriting: abstract values and interval arithmetic emitted as ONNX nodes.

An `Interval` is a tensor known only to lie in [lower, upper]. It keeps whichever of the two forms
(lower/upper or center/radius) the last rule produced and emits the other on first use, so chains of
linear layers stay in center-radius form and chains of monotone ops in lower-upper form.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .builder import Builder


@dataclass(eq=False)
class Exact:
    """A tensor computed at run time but not perturbed (shapes, runtime spec matrices)."""

    value: ir.Value


class Interval:
    """`shared`: the radius may have size 1 on the batch axis where the center has the batch (an L-inf ball whose
    epsilon is the same for every sample), so linear layers send one radius row through |W| instead of a batch;
    broadcasting makes lower and upper full-size. Rules that index the batch axis get a materialised copy."""

    def __init__(self, b: Builder, *, lower=None, upper=None, center=None, radius=None, shared: bool = False):
        assert (lower is not None and upper is not None) or (center is not None and radius is not None)
        self.b = b
        self._lower, self._upper, self._center, self._radius = lower, upper, center, radius
        self.shared = shared and radius is not None

    def materialised(self) -> "Interval":
        """The same interval with a radius of the center's full shape."""
        if not self.shared:
            return self
        radius = self.b.op("Expand", self._radius, self.b.op("Shape", self._center))
        return Interval.from_center(self.b, self._center, radius)

    @classmethod
    def from_center(cls, b: Builder, center: ir.Value, radius: ir.Value) -> "Interval":
        return cls(b, center=center, radius=radius)

    @classmethod
    def from_bounds(cls, b: Builder, lower: ir.Value, upper: ir.Value) -> "Interval":
        return cls(b, lower=lower, upper=upper)

    @property
    def has_center_form(self) -> bool:
        return self._center is not None

    def scaled_center_radius(self) -> tuple[ir.Value, ir.Value, float]:
        """(k·center, k·radius, 1/k) in the cheapest way: the existing form, or l+u and u-l (k = 2).

        Linear rules fold the returned factor into their weights, which saves two multiplications per layer.
        """
        if self._center is not None:
            return self._center, self._radius, 1.0
        return self.b.op("Add", self._lower, self._upper), self.b.op("Sub", self._upper, self._lower), 0.5

    @property
    def lower(self) -> ir.Value:
        if self._lower is None:
            self._lower = self.b.op("Sub", self._center, self._radius)
        return self._lower

    @property
    def upper(self) -> ir.Value:
        if self._upper is None:
            self._upper = self.b.op("Add", self._center, self._radius)
        return self._upper

    @property
    def center(self) -> ir.Value:
        if self._center is None:
            half = self.b.const(0.5)
            self._center = self.b.op("Mul", self.b.op("Add", self._lower, self._upper), half)
        return self._center

    @property
    def radius(self) -> ir.Value:
        if self._radius is None:
            half = self.b.const(0.5)
            self._radius = self.b.op("Mul", self.b.op("Sub", self._upper, self._lower), half)
        return self._radius


def point(b: Builder, value: ir.Value) -> Interval:
    return Interval.from_bounds(b, value, value)


def as_interval(b: Builder, x) -> Interval:
    """Constants and exact tensors (graph values that do not depend on the input set) are degenerate intervals."""
    if isinstance(x, Interval):
        return x
    if isinstance(x, Exact):
        return point(b, x.value)
    if isinstance(x, ir.Value):
        return point(b, x)
    return point(b, b.const(x))


def add(b: Builder, x: Interval, y: Interval) -> Interval:
    if x.has_center_form or y.has_center_form:
        return Interval.from_center(b, b.op("Add", x.center, y.center), b.op("Add", x.radius, y.radius))
    return Interval.from_bounds(b, b.op("Add", x.lower, y.lower), b.op("Add", x.upper, y.upper))


def neg(b: Builder, x: Interval) -> Interval:
    if x.has_center_form:
        return Interval.from_center(b, b.op("Neg", x.center), x.radius)
    return Interval.from_bounds(b, b.op("Neg", x.upper), b.op("Neg", x.lower))


def sub(b: Builder, x: Interval, y: Interval) -> Interval:
    return add(b, x, neg(b, y))


def mul(b: Builder, x: Interval, y: Interval) -> Interval:
    """Product of two intervals: the hull of the four corner products, where 0 * inf counts as 0 (an exact
    zero times an unbounded factor is zero; IEEE's NaN would poison both bounds). A NaN bound of a factor (inf -
    inf upstream) says nothing about it: the product is then unbounded, not 0."""
    zero = b.const(0.0)
    ends = (x.lower, x.upper, y.lower, y.upper)
    products = [b.op("Mul", p, q) for p in ends[:2] for q in ends[2:]]
    products = [b.op("Where", b.op("IsNaN", p), zero, p) for p in products]
    lower, upper = b.op("Min", *products), b.op("Max", *products)
    nan = [b.op("IsNaN", end) for end in ends]
    unknown = b.op("Or", b.op("Or", nan[0], nan[1]), b.op("Or", nan[2], nan[3]))
    inf = b.op("CastLike", b.const(np.inf), lower)
    return Interval.from_bounds(b, b.op("Where", unknown, b.op("Neg", inf), lower), b.op("Where", unknown, inf, upper))


def square(b: Builder, x: Interval) -> Interval:
    """x*x for the same x: never negative, smallest at the point of [l, u] nearest zero."""
    nearest = b.op("Add", b.op("Relu", x.lower), b.op("Relu", b.op("Neg", x.upper)))
    farthest = b.op("Max", b.op("Abs", x.lower), b.op("Abs", x.upper))
    return Interval.from_bounds(b, b.op("Mul", nearest, nearest), b.op("Mul", farthest, farthest))


def absolute(b: Builder, x: Interval) -> Interval:
    nearest = b.op("Add", b.op("Relu", x.lower), b.op("Relu", b.op("Neg", x.upper)))
    farthest = b.op("Max", b.op("Abs", x.lower), b.op("Abs", x.upper))
    return Interval.from_bounds(b, nearest, farthest)


def reciprocal(b: Builder, x: Interval) -> Interval:
    """1/x: [1/u, 1/l] where the interval excludes zero, (-inf, inf) where it does not."""
    lo, hi = x.lower, x.upper
    sign_definite = b.op("Or", b.op("Greater", lo, b.const(0.0)), b.op("Less", hi, b.const(0.0)))
    inf = b.const(np.inf)
    lower = b.op("Where", sign_definite, b.op("Reciprocal", hi), b.op("Neg", inf))
    upper = b.op("Where", sign_definite, b.op("Reciprocal", lo), inf)
    return Interval.from_bounds(b, lower, upper)


def monotone(b: Builder, x: Interval, apply) -> Interval:
    """An elementwise non-decreasing function maps lower to lower and upper to upper."""
    return Interval.from_bounds(b, apply(x.lower), apply(x.upper))
