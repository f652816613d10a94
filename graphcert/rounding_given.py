"""Tighter magnitudes for the float32 rounding analysis from a verifier's own bounds on intermediate values.

graphcert.rounding bounds |value| by IBP over the input box, which is very loose on deep narrow nets (ACAS Xu:
|y| <= ~5000 by IBP where the outputs are O(1)); its error bound E grows with M. Branch and bound over ReLU
units holds, for every split domain, bounds [l, u] of each unit's input z that CROWN computed (and the splits
clamped): every input of the domain has its real-arithmetic z in [l, u], and the domains cover the box. So the
analysis over a domain may intersect IBP's interval of z with [l, u], and continue IBP from the intersection.

Why this stays sound. The analysis needs M(z) >= |z(x)| for the real value z(x) at every input x of the domain;
the rules already account for the computed value being off by E (they sum |W|·(M + E)). The given [l, u] are
themselves computed in float32 by a CROWN bound graph, whose own rounding is bounded, as graphcert.rounding's
docstring argues, by 2·E_plain(z) (centre and radius parts, E_plain the |W|-product error bound of z, itself
computed from magnitudes of earlier values that are valid by induction over the graph order). So in the plain
(`widen`) graph each given interval is widened by 2·E_plain(z) plus 2^-16 of its ends (CROWN's final sums
and the clamp's own rounding) before the intersection; that graph outputs the intervals it used, and the
tightened graph (N-tracked E, which is smaller than E_plain) takes those as they are (`widen` False), so both
analyses use the same valid intervals. Intersections that cross mean the domain holds no input: then any
slack is right.
"""
from __future__ import annotations

import onnx_ir as ir

from .interval import Interval

GIVEN_LOWER, GIVEN_UPPER = "_given_lower", "_given_upper"   # graph inputs: f"{z}{GIVEN_LOWER}" [batch, ...]
USED_LOWER, USED_UPPER = "_used_lower", "_used_upper"       # graph outputs: the intervals the analysis used
RELATIVE_WIDENING = 2.0 ** -16


class GivenBounds:
    """Graph inputs carrying bounds of the named values; `apply` intersects a value's interval with them once
    its error is known."""

    def __init__(self, walk, graph: ir.Graph, values: list[ir.Value], widen: bool):
        self.walk, self.widen = walk, widen
        self.inputs: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}
        self.used: list[tuple[ir.Value, ir.Value, ir.Value]] = []
        for value in values:
            pair = tuple(ir.Value(name=f"{value.name}{suffix}", type=value.type, shape=value.shape)
                         for suffix in (GIVEN_LOWER, GIVEN_UPPER))
            graph.inputs.extend(pair)
            self.inputs[value] = pair

    def apply(self, value: ir.Value) -> None:
        if value not in self.inputs:
            return
        walk, b = self.walk, self.walk.b
        lower, upper = self.inputs[value]
        if self.widen:
            error = b.op("Mul", walk.errors[value], walk.c(2.0))
            lower = b.op("Sub", lower, walk.up(b.op("Add", error, b.op("Mul", b.op("Abs", lower),
                                                                          walk.c(RELATIVE_WIDENING)))))
            upper = b.op("Add", upper, walk.up(b.op("Add", error, b.op("Mul", b.op("Abs", upper),
                                                                          walk.c(RELATIVE_WIDENING)))))
        interval = walk.intervals[value]
        interval = interval.materialised() if getattr(interval, "shared", False) else interval
        lower, upper = b.op("Max", interval.lower, lower), b.op("Min", interval.upper, upper)
        walk.intervals[value] = Interval.from_bounds(b, lower, upper)
        walk.forget_magnitude(value)
        self.used.append((value, lower, upper))

    def outputs(self, graph: ir.Graph) -> None:
        for value, lower, upper in self.used:
            for bound, suffix in ((lower, USED_LOWER), (upper, USED_UPPER)):
                named = self.walk.b.op("Identity", bound)
                named.name = f"{value.name}{suffix}"
                named.shape, named.type = value.shape, value.type
                graph.outputs.append(named)
