"""Linear relaxations of nonlinear ops on an interval, emitted as ONNX nodes.

For y = f(x) with x in [l, u] elementwise, a relaxation is a pair of lines sound on the whole interval:
    lower_slope·x + lower_intercept <= f(x) <= upper_slope·x + upper_intercept.
Backward bound propagation uses the lower line where a coefficient is positive and the upper line where it
is negative. An intercept of None means zero. MaxPool, which mixes elements, is relaxed per window
(`window_max`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from graphcert.builder import Builder
from graphcert.interpret import attr
from graphcert.interval import Interval

# Widths below this count as a point interval (avoids 0/0; any line through the point is then exact).
TINY = 1e-12
# Bisection steps for the tangent point of S-shaped functions; every step keeps a valid (sound) end.
TANGENT_STEPS = 12


@dataclass
class Lines:
    lower_slope: ir.Value
    lower_intercept: ir.Value | None
    upper_slope: ir.Value
    upper_intercept: ir.Value | None
    # ReLU-like ops only: the lower slope may be any value a + (1 - a)·alpha with alpha in [floor, ceiling]
    # (floor = 1 where the unit is always active, ceiling = 0 where it is never active); alpha-CROWN picks it,
    # starting from adaptive_alpha (also the start of `tangent_lines` below).
    negative_slope: float | None = None
    alpha_floor: ir.Value | None = None
    alpha_ceiling: ir.Value | None = None
    adaptive_alpha: ir.Value | None = None
    # 1 where f may be -inf (+inf) on the interval (log at 0, a pole, exp overflowing): the constant line at
    # -FLOAT_MAX (FLOAT_MAX) stands in for it, and a bound that leans on it must become infinite.
    lower_unbounded: ir.Value | None = None
    upper_unbounded: ir.Value | None = None
    # S-shaped ops only: alpha (any value, clamped to [0, 1]) -> (lower slope, lower intercept, upper slope,
    # upper intercept), the lines with tangent points chosen by alpha; every alpha gives sound lines, and
    # `adaptive_alpha` gives the lines above.
    tangent_lines: Callable[[ir.Value], tuple[ir.Value, ir.Value, ir.Value, ir.Value]] | None = None

    def lower_slope_for(self, b: Builder, alpha: ir.Value) -> ir.Value:
        """The lower slope with alpha (any value) projected onto its valid range."""
        clamped = b.op("Min", b.op("Max", alpha, self.alpha_floor), self.alpha_ceiling)
        if self.negative_slope == 0.0:
            return clamped
        a = self.negative_slope
        return b.op("Add", b.op("Mul", clamped, b.const(1.0 - a)), b.const(a))


def _as_float(b: Builder, condition: ir.Value) -> ir.Value:
    return b.op("Cast", condition, to=ir.DataType.FLOAT)


def relu_like(b: Builder, box: Interval, negative_slope: float = 0.0) -> Lines:
    """f(x) = x for x >= 0, a·x below (a <= 1: convex). Upper: the chord; lower: a line through 0 with
    slope between a and 1, adaptively 1 where u > -l (the smaller area) and a elsewhere."""
    a = negative_slope
    l, u = box.lower, box.upper
    zero = b.const(0.0)
    l_neg, u_pos = b.op("Min", l, zero), b.op("Max", u, zero)
    width = b.op("Max", b.op("Sub", u_pos, l_neg), b.const(TINY))
    rise = u_pos if a == 0.0 else b.op("Sub", u_pos, b.op("Mul", l_neg, b.const(a)))
    upper_slope = b.op("Div", rise, width)
    # The chord passes through (l, a·l): intercept = l·(a - slope), zero when l >= 0 (slope 1 there).
    upper_intercept = b.op("Mul", l_neg, b.op("Sub", b.const(a), upper_slope) if a else b.op("Neg", upper_slope))
    floor = _as_float(b, b.op("Not", b.op("Less", l, zero)))
    ceiling = _as_float(b, b.op("Greater", u, zero))
    adaptive = _as_float(b, b.op("Greater", b.op("Add", u, l), zero))
    lower_slope = adaptive if a == 0.0 else b.op("Add", b.op("Mul", adaptive, b.const(1.0 - a)), b.const(a))
    return Lines(lower_slope, None, upper_slope, upper_intercept, a, floor, ceiling, adaptive)


def _upper_line_s_shaped(b: Builder, f, df, l: ir.Value, u: ir.Value):
    """An upper line of f on [l, u] for f convex on x <= 0 and concave on x >= 0 (sigmoid, tanh), and the upper
    line for a tangent-point parameter: ((slope, intercept), line_at(alpha) -> (slope, intercept)).

    The chord is above f exactly when f'(u) >= its slope (always when u <= 0). Otherwise a tangent is used:
    at the midpoint when l >= 0 (f concave on [l, u]), else at the smallest d in [0, u] whose tangent passes
    above (l, f(l)); every tangent at d >= that point is above f on [l, inf), so bisection keeps the upper end.
    Where a tangent is used, every tangent point in [start, u] is sound (start: l when l >= 0, else that
    bisection end), and alpha in [0, 1] (clamped) picks start + alpha·(u - start) (alpha-CROWN).
    """
    half = b.const(0.5)
    fl, fu = f(l), f(u)
    chord = b.op("Div", b.op("Sub", fu, fl), b.op("Max", b.op("Sub", u, l), b.const(TINY)))
    chord_intercept = b.op("Sub", fl, b.op("Mul", chord, l))
    zero = b.const(0.0)
    low, high = b.op("Max", l, zero), u
    for _ in range(TANGENT_STEPS):
        mid = b.op("Mul", b.op("Add", low, high), half)
        at_l = b.op("Add", f(mid), b.op("Mul", df(mid), b.op("Sub", l, mid)))
        valid = b.op("Not", b.op("Less", at_l, fl))
        high = b.op("Where", valid, mid, high)
        low = b.op("Where", valid, low, mid)
    crossing = b.op("Less", l, zero)
    use_chord = b.op("Not", b.op("Less", df(u), chord))

    def line(point: ir.Value) -> tuple[ir.Value, ir.Value]:
        tangent = df(point)
        return (b.op("Where", use_chord, chord, tangent),
                b.op("Where", use_chord, chord_intercept, b.op("Sub", f(point), b.op("Mul", tangent, point))))

    start = b.op("Where", crossing, high, l)
    room = b.op("Max", b.op("Sub", u, start), zero)   # never a point below start (rounding at u <= 0)

    def line_at(alpha: ir.Value) -> tuple[ir.Value, ir.Value]:
        share = b.op("Min", b.op("Max", alpha, zero), b.const(1.0))
        return line(b.op("Add", start, b.op("Mul", share, room)))

    return line(b.op("Where", crossing, high, b.op("Mul", b.op("Add", l, u), half))), line_at


def s_shaped(b: Builder, box: Interval, f, df) -> Lines:
    """Sigmoid-like f (inflection at 0). The lower line of f on [l, u] mirrors the upper line of
    g(y) = -f(-y) on [-u, -l]: g(y) <= s·y + c there means f(x) >= s·x - c.

    Both lines take a tangent-point parameter (`Lines.tangent_lines`); a coefficient uses only one of them at a
    time, so one parameter per unit and objective row serves both. Its starting value gives the lines above."""
    l, u = box.lower, box.upper
    (upper_slope, upper_intercept), upper_at = _upper_line_s_shaped(b, f, df, l, u)
    g = lambda v: b.op("Neg", f(b.op("Neg", v)))  # noqa: E731
    dg = lambda v: df(b.op("Neg", v))  # noqa: E731
    (slope, intercept), lower_at = _upper_line_s_shaped(b, g, dg, b.op("Neg", u), b.op("Neg", l))

    def tangent_lines(alpha: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
        lower_slope, negated = lower_at(alpha)
        return (lower_slope, b.op("Neg", negated), *upper_at(alpha))

    zero = b.const(0.0)
    # The midpoint tangent (0.5) where f is convex or concave on the whole interval, else the bisection end (0).
    one_sided = b.op("Or", b.op("Not", b.op("Less", l, zero)), b.op("Not", b.op("Greater", u, zero)))
    start = b.op("Mul", _as_float(b, one_sided), b.const(0.5))
    return Lines(slope, b.op("Neg", intercept), upper_slope, upper_intercept, adaptive_alpha=start,
                 tangent_lines=tangent_lines)


def sigmoid(b: Builder, box: Interval) -> Lines:
    f = lambda v: b.op("Sigmoid", v)  # noqa: E731

    def df(v):
        s = f(v)
        return b.op("Mul", s, b.op("Sub", b.const(1.0), s))
    return s_shaped(b, box, f, df)


def tanh(b: Builder, box: Interval) -> Lines:
    f = lambda v: b.op("Tanh", v)  # noqa: E731

    def df(v):
        t = f(v)
        return b.op("Sub", b.const(1.0), b.op("Mul", t, t))
    return s_shaped(b, box, f, df)


def _chord_and_midpoint_tangent(b: Builder, box: Interval, f, df):
    """(slope, intercept) of the chord of f over [l, u] and of its tangent at the midpoint."""
    l, u = box.lower, box.upper
    fl = f(l)
    chord = b.op("Div", b.op("Sub", f(u), fl), b.op("Max", b.op("Sub", u, l), b.const(TINY)))
    middle = b.op("Mul", b.op("Add", l, u), b.const(0.5))
    tangent = df(middle)
    return ((chord, b.op("Sub", fl, b.op("Mul", chord, l))),
            (tangent, b.op("Sub", f(middle), b.op("Mul", tangent, middle))))


def convex(b: Builder, box: Interval, f, df) -> Lines:
    """Convex f: the chord is above it on [l, u] and every tangent below it; take the tangent at the midpoint."""
    chord, tangent = _chord_and_midpoint_tangent(b, box, f, df)
    return Lines(*tangent, *chord)


def softplus(b: Builder, box: Interval) -> Lines:
    return convex(b, box, lambda v: b.op("Softplus", v), lambda v: b.op("Sigmoid", v))


def elu(b: Builder, box: Interval, alpha: float) -> Lines:
    """x above 0, alpha·(e^x - 1) below: convex for 0 <= alpha <= 1."""
    def df(v):
        below = b.op("Mul", b.op("Exp", b.op("Min", v, b.const(0.0))), b.const(alpha))
        return b.op("Where", b.op("Greater", v, b.const(0.0)), b.const(1.0), below)
    return convex(b, box, lambda v: b.op("Elu", v, alpha=alpha), df)


def clip(b: Builder, box: Interval, low: ir.Value | None, high: ir.Value | None) -> Lines:
    """Clip(x) = lo + Relu(x - lo) - Relu(x - hi), or x - Relu(x - hi) without a lower bound; each Relu is
    relaxed on its shifted interval and the lines are summed (subtracting a Relu swaps its lines). ONNX's Clip is
    min(max(x, lo), hi): with lo > hi it is hi everywhere, which is the clip to [min(lo, hi), hi]."""
    if low is not None and high is not None:
        low = b.op("Min", low, high)
    sides = {"lower": [b.const(0.0 if low is not None else 1.0), low],
             "upper": [b.const(0.0 if low is not None else 1.0), low]}  # [slope, intercept or None]
    terms = ([("Add", low)] if low is not None else []) + ([("Sub", high)] if high is not None else [])
    for combine, kink in terms:
        shifted = Interval.from_bounds(b, b.op("Sub", box.lower, kink), b.op("Sub", box.upper, kink))
        relu = relu_like(b, shifted)
        # In x: Relu(x - c) >= s_l·x - s_l·c and Relu(x - c) <= s_u·x - s_u·c + t_u.
        below = (relu.lower_slope, b.op("Neg", b.op("Mul", relu.lower_slope, kink)))
        above = (relu.upper_slope, b.op("Sub", relu.upper_intercept, b.op("Mul", relu.upper_slope, kink)))
        pieces = {"lower": below, "upper": above} if combine == "Add" else {"lower": above, "upper": below}
        for side, (slope, intercept) in pieces.items():
            total = sides[side]
            total[0] = b.op(combine, total[0], slope)
            total[1] = b.op(combine, total[1] if total[1] is not None else b.const(0.0), intercept)
    return Lines(sides["lower"][0], sides["lower"][1], sides["upper"][0], sides["upper"][1])


# The float32 range: constant lines at +-FLOAT_MAX bound every finite value, and times 0 they give 0, not NaN.
FLOAT_MAX = float(np.finfo(np.float32).max)
# Relative widening of the interval of functions steep near 0 (as IBP does for Log, Sqrt and 1/x): their
# secants are sound only inside the interval, and rounding in earlier bounds can leave the value just outside.
WIDENING = 2.0 ** -20
# Relative slack for the float error of evaluating a line: intercepts move out by it (see `_rounding_slack`).
SLACK = 2.0 ** -21


def _widened(b: Builder, box: Interval, non_negative: bool = False) -> Interval:
    slack = b.op("Mul", b.op("Add", b.op("Abs", box.lower), b.op("Abs", box.upper)), b.const(WIDENING))
    lower = b.op("Sub", box.lower, slack)
    return Interval.from_bounds(b, b.op("Relu", lower) if non_negative else lower, b.op("Add", box.upper, slack))


def _finite(b: Builder, *values: ir.Value) -> ir.Value:
    ok = None
    for v in values:
        here = b.op("Not", b.op("Or", b.op("IsNaN", v), b.op("IsInf", v)))
        ok = here if ok is None else b.op("And", ok, here)
    return ok


def clamped(b: Builder, value: ir.Value, if_nan: float) -> ir.Value:
    """value inside [-FLOAT_MAX, FLOAT_MAX], NaN replaced by if_nan."""
    inside = b.op("Max", b.op("Min", value, b.const(FLOAT_MAX)), b.const(-FLOAT_MAX))
    return b.op("Where", b.op("IsNaN", value), b.const(if_nan), inside)


def _rounding_slack(b: Builder, intercept: ir.Value, *terms: tuple[ir.Value, Interval]) -> ir.Value:
    """A bound on the float error of slope·x + intercept over the box: a few ulps of the largest term.
    Steep lines far from 0 (the chord of exp on [-12, 17]) cancel a large intercept against a large slope·x."""
    total = b.op("Abs", intercept)
    for slope, box in terms:
        reach = b.op("Max", b.op("Abs", box.lower), b.op("Abs", box.upper))
        total = b.op("Add", total, b.op("Mul", b.op("Abs", slope), reach))
    return b.op("Mul", total, b.const(SLACK))


def guarded(b: Builder, lines: Lines, box: Interval, low: ir.Value, high: ir.Value) -> Lines:
    """Each line moved out by its rounding slack where it is finite, else the constant line at the clamped end
    of f's range [low, high] on the interval (infinite interval ends, overflow, a pole inside): no NaN reaches
    the backward pass."""
    lower_ok = _finite(b, lines.lower_slope, lines.lower_intercept)
    upper_ok = _finite(b, lines.upper_slope, lines.upper_intercept)
    lower = b.op("Sub", lines.lower_intercept, _rounding_slack(b, lines.lower_intercept, (lines.lower_slope, box)))
    upper = b.op("Add", lines.upper_intercept, _rounding_slack(b, lines.upper_intercept, (lines.upper_slope, box)))
    zero = b.const(0.0)
    return Lines(b.op("Where", lower_ok, lines.lower_slope, zero),
                 b.op("Where", lower_ok, lower, clamped(b, low, -FLOAT_MAX)),
                 b.op("Where", upper_ok, lines.upper_slope, zero),
                 b.op("Where", upper_ok, upper, clamped(b, high, FLOAT_MAX)),
                 lower_unbounded=unbounded(b, lower_ok, low, -np.inf),
                 upper_unbounded=unbounded(b, upper_ok, high, np.inf))


def unbounded(b: Builder, line_ok: ir.Value, end: ir.Value, infinity: float) -> ir.Value:
    """1.0 where the constant fallback line replaces an infinite end of f's range, else 0.0."""
    return _as_float(b, b.op("And", b.op("Not", line_ok), b.op("Equal", end, b.const(infinity))))


def concave(b: Builder, box: Interval, f, df) -> Lines:
    """Concave f: the chord is below it on [l, u] and every tangent above it; take the tangent at the midpoint."""
    chord, tangent = _chord_and_midpoint_tangent(b, box, f, df)
    return Lines(*chord, *tangent)


def exp(b: Builder, box: Interval) -> Lines:
    f = lambda v: b.op("Exp", v)  # noqa: E731
    return guarded(b, convex(b, box, f, f), box, f(box.lower), f(box.upper))


def log(b: Builder, box: Interval) -> Lines:
    """Concave on x > 0; an interval reaching 0 has no finite chord (its lower line is then -FLOAT_MAX)."""
    box = _widened(b, box, non_negative=True)
    f = lambda v: b.op("Log", v)  # noqa: E731
    return guarded(b, concave(b, box, f, lambda v: b.op("Reciprocal", v)), box, f(box.lower), f(box.upper))


def sqrt(b: Builder, box: Interval) -> Lines:
    """Concave on x >= 0. The chord slope is written 1/(sqrt(l) + sqrt(u)), exact also for narrow intervals."""
    box = _widened(b, box, non_negative=True)
    l, u = box.lower, box.upper
    root_l, root_u = b.op("Sqrt", l), b.op("Sqrt", u)
    chord = b.op("Reciprocal", b.op("Add", root_l, root_u))
    root_m = b.op("Sqrt", b.op("Mul", b.op("Add", l, u), b.const(0.5)))
    tangent = b.op("Reciprocal", b.op("Add", root_m, root_m))
    lines = Lines(chord, b.op("Sub", root_l, b.op("Mul", chord, l)), tangent, b.op("Mul", root_m, b.const(0.5)))
    return guarded(b, lines, box, root_l, root_u)


def reciprocal(b: Builder, box: Interval) -> Lines:
    """1/x is convex for x > 0 (chord above, tangent below) and concave for x < 0 (the other way round). The
    chord through (l, 1/l), (u, 1/u) is -x/(l·u) + 1/l + 1/u, the tangent at m is -x/m^2 + 2/m. An interval
    holding 0 gets the constant lines +-FLOAT_MAX."""
    box = _widened(b, box)
    l, u = box.lower, box.upper
    zero = b.const(0.0)
    chord = b.op("Neg", b.op("Reciprocal", b.op("Mul", l, u)))
    chord_intercept = b.op("Add", b.op("Reciprocal", l), b.op("Reciprocal", u))
    middle = b.op("Mul", b.op("Add", l, u), b.const(0.5))
    tangent = b.op("Neg", b.op("Reciprocal", b.op("Mul", middle, middle)))
    tangent_intercept = b.op("Div", b.const(2.0), middle)
    positive = b.op("Greater", l, zero)
    lines = Lines(b.op("Where", positive, tangent, chord), b.op("Where", positive, tangent_intercept, chord_intercept),
                  b.op("Where", positive, chord, tangent), b.op("Where", positive, chord_intercept, tangent_intercept))
    pole = b.op("Not", b.op("Or", positive, b.op("Less", u, zero)))
    nowhere = b.const(np.nan)   # replaced by the clamped range below
    lines = Lines(*(b.op("Where", pole, nowhere, v) for v in (lines.lower_slope, lines.lower_intercept,
                                                              lines.upper_slope, lines.upper_intercept)))
    inf = b.const(np.inf)
    low = b.op("Where", pole, b.op("Neg", inf), b.op("Reciprocal", u))
    high = b.op("Where", pole, inf, b.op("Reciprocal", l))
    return guarded(b, lines, box, low, high)


def square(b: Builder, box: Interval) -> Lines:
    """x^2 is convex: chord (l + u)·x - l·u above, tangent 2m·x - m^2 at the midpoint below."""
    l, u = box.lower, box.upper
    middle = b.op("Mul", b.op("Add", l, u), b.const(0.5))
    lines = Lines(b.op("Add", middle, middle), b.op("Neg", b.op("Mul", middle, middle)),
                  b.op("Add", l, u), b.op("Neg", b.op("Mul", l, u)))
    nearest = b.op("Add", b.op("Relu", l), b.op("Relu", b.op("Neg", u)))
    farthest = b.op("Max", b.op("Abs", l), b.op("Abs", u))
    return guarded(b, lines, box, b.op("Mul", nearest, nearest), b.op("Mul", farthest, farthest))


def relax(b: Builder, node: ir.Node, box: Interval) -> Lines:
    """The relaxation lines of an elementwise node for its input interval."""
    op = node.op_type
    if op == "Relu":
        return relu_like(b, box)
    if op == "LeakyRelu":
        return relu_like(b, box, float(attr(node, "alpha", 0.01)))
    if op == "Sigmoid":
        return sigmoid(b, box)
    if op == "Tanh":
        return tanh(b, box)
    if op == "Softplus":
        return softplus(b, box)
    if op == "Elu":
        return elu(b, box, float(attr(node, "alpha", 1.0)))
    if op in UNARY:
        return UNARY[op](b, box)
    if op == "Mul":   # a tensor times itself (crown_support relaxes other products with planes)
        return square(b, box)
    if op == "Clip":
        # Normalised models are at opset >= 11, where the bounds are optional inputs.
        low, high = (node.inputs[i] if len(node.inputs) > i else None for i in (1, 2))
        return clip(b, box, low, high)
    raise KeyError(op)


# Pow is the square (see `accepts`); Mul of a tensor by itself is relaxed as "Pow" too (crown_support).
UNARY = {"Exp": exp, "Log": log, "Sqrt": sqrt, "Reciprocal": reciprocal, "Pow": square}
ELEMENTWISE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Softplus", "Elu"} | set(UNARY)


def accepts(node: ir.Node) -> bool:
    if node.op_type == "Pow":
        exponent = node.inputs[1]
        return exponent is not None and exponent.const_value is not None \
            and exponent.const_value.numpy().size == 1 and float(exponent.const_value.numpy().reshape(-1)[0]) == 2.0
    if node.op_type == "LeakyRelu":
        return float(attr(node, "alpha", 0.01)) <= 1.0
    if node.op_type == "Elu":
        return 0.0 <= float(attr(node, "alpha", 1.0)) <= 1.0
    return node.op_type in ELEMENTWISE


@dataclass
class WindowMax:
    """MaxPool relaxed per window: y >= x_j* for j* the input with the largest lower bound, and y <= x_j* too
    where that input dominates (l_j* >= u_i for every other i), else y <= max_i u_i. Windows are handled as
    patches: a convolution with one-hot kernels extracts them, its transposed convolution is the adjoint."""

    patches: ir.Value          # one-hot kernel bank [K, 1, *kernel]
    geometry: object           # adjoints.Geometry of the pooling window
    select: ir.Value           # one-hot choice of j* per window [batch, C, K, *out]
    upper_slope: ir.Value      # 1 where dominated, else 0 [batch, C, *out]
    upper_intercept: ir.Value  # max_i u_i where not dominated, else 0


def window_max(b: Builder, node: ir.Node, box: Interval, shape_in: list[int], shape_out: list[int],
               geometry) -> WindowMax:
    kernel = geometry.kernel
    size = int(np.prod(kernel))
    bank = np.zeros([size, 1, *kernel], dtype=np.float32)
    for i, position in enumerate(np.ndindex(*kernel)):
        bank[(i, 0, *position)] = 1.0
    bank = b.const(bank)
    channels, spatial_in, spatial_out = shape_in[0], shape_in[1:], shape_out[1:]

    def windows(v):
        flat = b.op("Reshape", v, b.ints([-1, 1, *spatial_in]))
        return b.op("Reshape", b.op("Conv", flat, bank, **geometry.attributes()),
                    b.ints([-1, channels, size, *spatial_out]))

    # Padding is never the maximum: mask padded positions with the lowest float.
    inside = b.op("Greater", windows(b.const(np.ones([1, channels, *spatial_in], dtype=np.float32))),
                  b.const(0.5))
    lowest = b.const(np.finfo(np.float32).min)
    lows = b.op("Where", inside, windows(box.lower), lowest)
    highs = b.op("Where", inside, windows(box.upper), lowest)
    chosen = b.op("ArgMax", lows, axis=2, keepdims=1)
    index = b.const(np.arange(size, dtype=np.int64).reshape([1, 1, size] + [1] * len(spatial_out)), dtype=np.int64)
    select = b.op("Equal", index, chosen)
    chosen_low = b.reduce("ReduceMax", lows, [2], keepdims=0)
    others_high = b.reduce("ReduceMax", b.op("Where", select, lowest, highs), [2], keepdims=0)
    dominated = _as_float(b, b.op("Not", b.op("Less", chosen_low, others_high)))
    top = b.reduce("ReduceMax", highs, [2], keepdims=0)
    intercept = b.op("Mul", top, b.op("Sub", b.const(1.0), dominated))
    return WindowMax(bank, geometry, _as_float(b, select), dominated, intercept)


@dataclass
class Planes:
    """z = x·y relaxed on a box [lx, ux] x [ly, uy] (McCormick):
        lower_x·x + lower_y·y + lower_intercept <= z <= upper_x·x + upper_y·y + upper_intercept."""

    lower_x: ir.Value
    lower_y: ir.Value
    lower_intercept: ir.Value
    upper_x: ir.Value
    upper_y: ir.Value
    upper_intercept: ir.Value
    lower_unbounded: ir.Value | None = None   # as in `Lines`
    upper_unbounded: ir.Value | None = None


def mccormick(b: Builder, x: Interval, y: Interval) -> Planes:
    """Each side has two planes, each exact on two edges of the box and off by (ux - lx)·(uy - ly) at the
    opposite corner:
        x·y >= ly·x + lx·y - lx·ly  (off at (ux, uy)),   x·y >= uy·x + ux·y - ux·uy  (off at (lx, ly)),
        x·y <= uy·x + lx·y - lx·uy  (off at (ux, ly)),   x·y <= ly·x + ux·y - ux·ly  (off at (lx, uy)).
    Both are equally good at the box center; per element, take the one whose worst value on the box (the
    smaller of the exact corner products and its value at the off corner) is better."""
    lx, ux, ly, uy = x.lower, x.upper, y.lower, y.upper
    ll, lu, ul, uu = (b.op("Mul", p, q) for p, q in ((lx, ly), (lx, uy), (ux, ly), (ux, uy)))
    area = b.op("Mul", b.op("Sub", ux, lx), b.op("Sub", uy, ly))
    first_low = b.op("Min", ll, lu, ul, b.op("Sub", uu, area))
    second_low = b.op("Min", uu, lu, ul, b.op("Sub", ll, area))
    first_high = b.op("Max", ll, lu, uu, b.op("Add", ul, area))
    second_high = b.op("Max", ll, ul, uu, b.op("Add", lu, area))
    below = b.op("Not", b.op("Less", first_low, second_low))
    above = b.op("Not", b.op("Greater", first_high, second_high))
    lower_x, lower_y = b.op("Where", below, ly, uy), b.op("Where", below, lx, ux)
    upper_x, upper_y = b.op("Where", above, uy, ly), b.op("Where", above, lx, ux)
    lower_intercept = b.op("Neg", b.op("Where", below, ll, uu))
    upper_intercept = b.op("Neg", b.op("Where", above, lu, ul))
    planes = Planes(lower_x, lower_y,
                    b.op("Sub", lower_intercept, _rounding_slack(b, lower_intercept, (lower_x, x), (lower_y, y))),
                    upper_x, upper_y,
                    b.op("Add", upper_intercept, _rounding_slack(b, upper_intercept, (upper_x, x), (upper_y, y))))
    # Infinite box ends: constant planes at the product's clamped range instead of NaN.
    zero = b.const(0.0)
    lower_ok = _finite(b, planes.lower_x, planes.lower_y, planes.lower_intercept)
    upper_ok = _finite(b, planes.upper_x, planes.upper_y, planes.upper_intercept)
    corners = [b.op("Where", b.op("IsNaN", p), zero, p) for p in (ll, lu, ul, uu)]   # 0·inf is 0 here
    lowest, highest = b.op("Min", *corners), b.op("Max", *corners)
    low, high = clamped(b, lowest, -FLOAT_MAX), clamped(b, highest, FLOAT_MAX)
    return Planes(b.op("Where", lower_ok, planes.lower_x, zero), b.op("Where", lower_ok, planes.lower_y, zero),
                  b.op("Where", lower_ok, planes.lower_intercept, low),
                  b.op("Where", upper_ok, planes.upper_x, zero), b.op("Where", upper_ok, planes.upper_y, zero),
                  b.op("Where", upper_ok, planes.upper_intercept, high),
                  unbounded(b, lower_ok, lowest, -np.inf), unbounded(b, upper_ok, highest, np.inf))
