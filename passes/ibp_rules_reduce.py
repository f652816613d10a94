"""IBP rules of reductions, pools and normalisations beyond the ones in `ibp.py` (resampling: ibp_rules_sampling).

Lp pools and norms are non-decreasing in each |x_i|, so they map the nearest-to-zero and farthest points of
each interval; positive-linear ops (CumSum, Mean, Einsum of one operand) send center and
radius through themselves; normalisations are bounded factor by factor.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.passes.ibp_core import rule, widened
from graphcert.passes.ibp_rules_elementwise import refuse
from graphcert.passes.ibp_rules_linear import _bilinear


@rule("LpPool", "GlobalLpPool")
def _lp_pool(cx, node, x):
    magnitude = iv.absolute(cx.b, iv.as_interval(cx.b, x))
    return [iv.monotone(cx.b, magnitude, lambda v: cx.b.copy(node, [v]))]


@rule("CumSum")
def _cumsum(cx, node, x, axis):
    if isinstance(axis, Interval):
        refuse(node, "its axis depends on the perturbed input")
    x = iv.as_interval(cx.b, x)
    return [Interval.from_center(cx.b, cx.b.copy(node, [x.center, axis]), cx.b.copy(node, [x.radius, axis]))]


@rule("Mean")
def _mean(cx, node, *xs):
    b = cx.b
    total = iv.as_interval(b, xs[0])
    for x in xs[1:]:
        total = iv.add(b, total, iv.as_interval(b, x))
    k = 1.0 / len(xs)
    return [Interval.from_center(b, b.op("Mul", total.center, b.op("CastLike", b.const(k), total.center)),
                                 b.op("Mul", total.radius, b.op("CastLike", b.const(k), total.radius)))]


@rule("Einsum")
def _einsum(cx, node, *xs):
    b = cx.b
    if len(xs) == 1:  # sums, transposes and diagonals: positive-linear
        x = iv.as_interval(b, xs[0])
        return [Interval.from_center(b, b.copy(node, [x.center]), b.copy(node, [x.radius]))]
    if len(xs) != 2:
        refuse(node, "more than two operands")
    a, w = xs
    if isinstance(a, Interval) and isinstance(w, Interval):
        return [_bilinear(b, lambda p, q: b.copy(node, [p, q]), a, w)]
    if isinstance(a, Interval):
        return [Interval.from_center(b, b.copy(node, [a.center, w]), b.copy(node, [a.radius, cx.abs(w)]))]
    return [Interval.from_center(b, b.copy(node, [a, w.center]), b.copy(node, [cx.abs(a), w.radius]))]


@rule("LpNormalization")
def _lp_normalization(cx, node, x):
    """x / ||x||_p along the axis: a factor of |x_i| at most 1, bounded as x times the reciprocal norm."""
    b = cx.b
    x = iv.as_interval(b, x)
    axis, p = attr(node, "axis", -1), attr(node, "p", 2)
    magnitude = iv.absolute(b, x)
    norm_op = "ReduceL2" if p == 2 else "ReduceL1"
    norm = Interval.from_bounds(b, b.reduce(norm_op, magnitude.lower, [axis]), b.reduce(norm_op, magnitude.upper, [axis]))
    quotient = iv.mul(b, x, iv.reciprocal(b, widened(cx, norm, node.inputs[0].dtype)))
    one = b.const(1.0)
    # The runtime divides by a zero norm to NaN (undefined); elsewhere |x_i| / ||x|| <= 1.
    return [Interval.from_bounds(b, b.op("Max", quotient.lower, b.op("Neg", one)), b.op("Min", quotient.upper, one))]
