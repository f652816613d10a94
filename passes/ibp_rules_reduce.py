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


# Products of more factors than this are refused (the rule multiplies them one interval at a time).
PRODUCT_LIMIT = 64


@rule("ReduceProd")
def _reduce_prod(cx, node, x, axes_input=None):
    """The product along the axes, one interval factor at a time (each the hull of its four corner products),
    widened by 4 ulps per factor for the runtime's own order of multiplication."""
    b = cx.b
    if isinstance(axes_input, Interval):
        refuse(node, "its axes depend on the perturbed input")
    shape = node.inputs[0].shape
    if shape is None:
        refuse(node, "an input of unknown rank")
    rank = len(shape)
    axes = attr(node, "axes")
    if axes_input is not None:
        if axes_input.const_value is None:
            refuse(node, "axes not known when converting")
        axes = axes_input.const_value.numpy().reshape(-1).tolist()
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            return [x]
        axes = list(range(rank))
    axes = sorted({int(a) % rank for a in axes})
    if not all(isinstance(shape[a], int) for a in axes):
        refuse(node, "reduced axes of unknown length")
    count = int(np.prod([shape[a] for a in axes]))
    if count > PRODUCT_LIMIT:
        refuse(node, f"a product of {count} factors (at most {PRODUCT_LIMIT})")
    kept = [a for a in range(rank) if a not in axes]
    x = iv.as_interval(b, x)
    # [kept..., reduced...] flattened to [kept..., count]; then factor by factor.
    flat = lambda v: b.op("Reshape", b.op("Transpose", v, perm=kept + axes), b.ints([0] * len(kept) + [-1]))  # noqa: E731
    lower, upper = flat(x.lower), flat(x.upper)
    pick = lambda v, k: b.op("Gather", v, b.ints(k), axis=len(kept))  # noqa: E731
    total = Interval.from_bounds(b, pick(lower, 0), pick(upper, 0))
    for k in range(1, count):
        total = iv.mul(b, total, Interval.from_bounds(b, pick(lower, k), pick(upper, k)))
    slack = b.op("Mul", b.op("Add", b.op("Abs", total.lower), b.op("Abs", total.upper)),
                 b.const(4.0 * count * 2.0 ** -24))
    lower, upper = b.op("Sub", total.lower, slack), b.op("Add", total.upper, slack)
    if attr(node, "keepdims", 1):
        lower, upper = (b.op("Unsqueeze", v, b.ints(axes)) for v in (lower, upper))
    return [Interval.from_bounds(b, lower, upper)]


def _lrn_band(node, channels: int) -> np.ndarray:
    """[C, C]: 1 where channel j lies in channel i's window [i - floor((size-1)/2), i + ceil((size-1)/2)]."""
    size = int(attr(node, "size"))
    i, j = np.arange(channels)[:, None], np.arange(channels)[None, :]
    return ((j >= i - (size - 1) // 2) & (j <= i + -(-(size - 1) // 2))).astype(np.float32)


def _lrn_supported(node) -> bool:
    """Static channels (rank 3 or more), alpha >= 0, beta >= 0 and bias > 0."""
    shape = node.inputs[0].shape
    alpha, beta, bias = (float(attr(node, k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    return shape is not None and len(shape) >= 3 and isinstance(shape[1], int) and alpha >= 0 and beta >= 0 and \
        bias > 0


@rule("LRN", accepts=_lrn_supported)
def _lrn(cx, node, x):
    """x / (bias + alpha/size · the window sum of squares over channels)^beta: the window sum is non-decreasing
    in every square, the power decreasing in it (beta >= 0, bias > 0); x times that factor in interval
    arithmetic, widened (4·size + 16) ulps for the runtime's rounding.

    onnxruntime's kernel slides the window over the channels as a running float32 sum (each channel's base is
    the previous one's plus the square entering, minus the one leaving), so its rounding accumulates over
    every channel before: with 1e6-sized squares beside small ones the base of a small channel is off by
    ~0.1, can reach 0 or below, and the output inf or NaN (measured). The base is widened by that sum's
    error bound, (4·(C + size) + 8)·u·(bias + alpha/size · the sum of all channels' squares); where the
    widened base can reach 0 the output is unbounded."""
    b = cx.b
    shape = node.inputs[0].shape
    alpha, beta, bias = (float(attr(node, k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    size = int(attr(node, "size"))
    channels = int(shape[1])
    x = iv.as_interval(b, x)
    squares = iv.square(b, x)
    perm = list(range(len(shape)))
    perm[1], perm[-1] = perm[-1], perm[1]
    band = b.const(_lrn_band(node, shape[1]).T)
    window = lambda v: b.op("Transpose", b.op("MatMul", b.op("Transpose", v, perm=perm), band), perm=perm)  # noqa: E731
    scale, offset = b.const(alpha / size), b.const(bias)
    base_low, base_high = (b.op("Add", offset, b.op("Mul", scale, window(v))) for v in (squares.lower, squares.upper))
    running = b.op("Add", offset, b.op("Mul", scale, b.reduce("ReduceSum", squares.upper, [1], keepdims=1)))
    drift = b.op("Mul", running, b.const((4.0 * (channels + size) + 8) * 2.0 ** -24))
    base_low, base_high = b.op("Sub", base_low, drift), b.op("Add", base_high, drift)
    power = b.const(-beta)
    positive = b.op("Greater", base_low, b.const(0.0))
    safe_low = b.op("Where", positive, base_low, b.const(1.0))
    factor = Interval.from_bounds(b, b.op("Pow", base_high, power), b.op("Pow", safe_low, power))
    y = iv.mul(b, x, factor)
    slack = b.op("Mul", b.op("Add", b.op("Abs", y.lower), b.op("Abs", y.upper)), b.const((4.0 * size + 16) * 2.0 ** -24))
    lower, upper = b.op("Sub", y.lower, slack), b.op("Add", y.upper, slack)
    infinite = b.const(np.float32(np.inf))
    return [Interval.from_bounds(b, b.op("Where", positive, lower, b.op("Neg", infinite)),
                                 b.op("Where", positive, upper, infinite))]
