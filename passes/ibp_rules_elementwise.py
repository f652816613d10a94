"""IBP rules of elementwise ops beyond the ones in `ibp.py`: families registered at once (`def_monotone`),
periodic functions with exact extrema, even functions, Pow with any constant exponent, Mod, casts that wrap.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert.errors import UnsupportedOpError
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.passes.ibp_core import constant_array, rule, sane, widened


def refuse(node: ir.Node, why: str):
    """A typed one-line refusal naming the op and why (for facts only known while rewriting)."""
    raise UnsupportedOpError("ibp", {f"{node.op_type} ({why})": [node.name or "(unnamed)"]})


def def_monotone(*op_types: str, decreasing: bool = False, widen: bool = False,
                 domain: tuple[float, float] | None = None) -> None:
    """Register elementwise ops that are monotone on their domain: bounds map to bounds (swapped when
    decreasing). `widen`: rounding or unbounded slope near the domain's ends, so inputs are widened by a few
    ulps first (see `widened`); `domain`: inputs are clipped to it (values outside are undefined)."""
    def bound(cx, node, x):
        b = cx.b
        x = iv.as_interval(b, x)
        if widen:
            x = widened(cx, x, node.inputs[0].dtype)
        lower, upper = x.lower, x.upper
        if domain is not None:
            dtype = (node.inputs[0].dtype or ir.DataType.FLOAT).numpy()
            lo, hi = b.const(domain[0], dtype=dtype), b.const(domain[1], dtype=dtype)
            lower, upper = b.op("Min", b.op("Max", lower, lo), hi), b.op("Min", b.op("Max", upper, lo), hi)
        low, high = b.copy(node, [lower]), b.copy(node, [upper])
        return [Interval.from_bounds(b, high, low) if decreasing else Interval.from_bounds(b, low, high)]
    rule(*op_types)(bound)


def_monotone("Round", widen=True)
def_monotone("Asin", "Atanh", widen=True, domain=(-1.0, 1.0))
def_monotone("Acos", decreasing=True, widen=True, domain=(-1.0, 1.0))
def_monotone("Acosh", widen=True, domain=(1.0, np.inf))


@rule("Cosh")
def _even_increasing(cx, node, x):
    """An even function increasing in |x|: smallest at the point nearest zero, largest at the farthest."""
    magnitude = iv.absolute(cx.b, iv.as_interval(cx.b, x))
    return [iv.monotone(cx.b, magnitude, lambda v: cx.b.copy(node, [v]))]


# Swish has no rule: onnxruntime's kernel is far from x·sigmoid(a·x) in its negative tail (at a = 0.1, x = -163:
# -2.4e-5 where the function is -1.4e-5) and not monotone there, so bounds from the function's shape do not hold
# for it (a property test drew such a case); without a model of that kernel's error it is refused.


# ---- periodic functions: extrema inside the interval, computed in float64 --------------------------------

TWO_PI = 2.0 * np.pi
# Beyond this magnitude float32 inputs are spaced more than 2^-8 apart and the period arithmetic is not trusted.
PERIODIC_LIMIT = 2.0 ** 15
SLACK = 1e-6


def _sine_bounds(b, lo, hi, phase: float, dtype):
    """Bounds of sin(x + phase) over [lo, hi]: its values at the ends, 1 where a crest lies in between,
    -1 where a trough does; [-1, 1] when the interval is a period wide or very large."""
    lo64, hi64 = b.op("Cast", lo, to=ir.DataType.DOUBLE), b.op("Cast", hi, to=ir.DataType.DOUBLE)
    shift = b.const(phase, dtype=np.float64)
    a, z = b.op("Add", lo64, shift), b.op("Add", hi64, shift)
    period = b.const(TWO_PI, dtype=np.float64)

    def contains(point):  # a point point + 2πk inside [a - slack, z + slack]
        k = b.op("Ceil", b.op("Div", b.op("Sub", b.op("Sub", a, b.const(SLACK, dtype=np.float64)),
                                                 b.const(point, dtype=np.float64)), period))
        return b.op("LessOrEqual", b.op("Add", b.const(point, dtype=np.float64), b.op("Mul", k, period)),
                    b.op("Add", z, b.const(SLACK, dtype=np.float64)))

    ends_low, ends_high = b.op("Min", b.op("Sin", a), b.op("Sin", z)), b.op("Max", b.op("Sin", a), b.op("Sin", z))
    one, minus_one = b.const(1.0, dtype=np.float64), b.const(-1.0, dtype=np.float64)
    slack = b.const(SLACK, dtype=np.float64)
    wide = b.op("Or", b.op("GreaterOrEqual", b.op("Sub", z, a), period),
                b.op("Greater", b.op("Max", b.op("Abs", a), b.op("Abs", z)), b.const(PERIODIC_LIMIT, dtype=np.float64)))
    lower = b.op("Where", b.op("Or", wide, contains(-np.pi / 2)), minus_one, b.op("Sub", ends_low, slack))
    upper = b.op("Where", b.op("Or", wide, contains(np.pi / 2)), one, b.op("Add", ends_high, slack))
    lower, upper = b.op("Max", lower, minus_one), b.op("Min", upper, one)
    return b.op("Cast", lower, to=dtype), b.op("Cast", upper, to=dtype)


@rule("Sin", "Cos")
def _sine(cx, node, x):
    # Widened: at large |x| an ulp of the input moves the sine by an ulp times |x|'s spacing.
    x = widened(cx, sane(cx, iv.as_interval(cx.b, x), node.inputs[0].dtype), node.inputs[0].dtype)
    dtype = node.inputs[0].dtype or ir.DataType.FLOAT
    phase = 0.0 if node.op_type == "Sin" else np.pi / 2  # cos x = sin(x + π/2)
    return [Interval.from_bounds(cx.b, *_sine_bounds(cx.b, x.lower, x.upper, phase, dtype))]


@rule("Tan")
def _tan(cx, node, x):
    """Increasing between its poles at π/2 + kπ: unbounded where the interval holds a pole."""
    b = cx.b
    x = widened(cx, sane(cx, iv.as_interval(b, x), node.inputs[0].dtype), node.inputs[0].dtype)
    dtype = node.inputs[0].dtype or ir.DataType.FLOAT
    lo64, hi64 = (b.op("Cast", v, to=ir.DataType.DOUBLE) for v in (x.lower, x.upper))
    half_pi, pi = b.const(np.pi / 2, dtype=np.float64), b.const(np.pi, dtype=np.float64)
    slack = b.const(SLACK, dtype=np.float64)
    k = b.op("Ceil", b.op("Div", b.op("Sub", b.op("Sub", lo64, slack), half_pi), pi))
    pole = b.op("LessOrEqual", b.op("Add", half_pi, b.op("Mul", k, pi)), b.op("Add", hi64, slack))
    large = b.op("Greater", b.op("Max", b.op("Abs", lo64), b.op("Abs", hi64)), b.const(PERIODIC_LIMIT, dtype=np.float64))
    unbounded = b.op("Or", pole, large)
    inf = b.const(np.inf, dtype=np.float64)
    tan = lambda v: b.op("Div", b.op("Sin", v), b.op("Cos", v))  # noqa: E731 (onnxruntime has no double Tan)
    t_lo, t_hi = tan(lo64), tan(hi64)
    lower = b.op("Where", unbounded, b.op("Neg", inf), b.op("Sub", t_lo, b.op("Mul", b.op("Abs", t_lo), slack)))
    upper = b.op("Where", unbounded, inf, b.op("Add", t_hi, b.op("Mul", b.op("Abs", t_hi), slack)))
    lower = b.op("Sub", lower, slack)
    upper = b.op("Add", upper, slack)
    return [Interval.from_bounds(b, b.op("Cast", lower, to=dtype), b.op("Cast", upper, to=dtype))]


# ---- Pow with any exponent, Mod ---------------------------------------------------------------------------

@rule("Pow")
def _pow(cx, node, x, exponent):
    b = cx.b
    x = iv.as_interval(b, x)
    p = constant_array(exponent)
    if p is None or isinstance(exponent, Interval) or np.asarray(p).size != 1:
        return [_pow_bounded_exponent(cx, node, x, iv.as_interval(b, exponent))]
    p = float(np.asarray(p).reshape(-1)[0])
    if p == 2.0:
        return [iv.square(b, x)]
    if p == 1.0:
        return [x]
    if p == 0.0:
        return [iv.monotone(b, x, lambda v: b.copy(node, [v, exponent]))]
    apply = lambda v: b.copy(node, [v, exponent])  # noqa: E731
    if p.is_integer() and int(p) % 2 == 1 and p > 0:
        return [iv.monotone(b, x, apply)]
    if p.is_integer() and int(p) % 2 == 0:
        magnitude = iv.absolute(b, widened(cx, x, node.inputs[0].dtype) if p < 0 else x)
        low, high = apply(magnitude.lower), apply(magnitude.upper)
        return [Interval.from_bounds(b, high, low) if p < 0 else Interval.from_bounds(b, low, high)]
    if p.is_integer():  # odd and negative: decreasing on each side of the pole at 0
        return [Interval.from_bounds(b, *_odd_negative_power(b, widened(cx, x, node.inputs[0].dtype), apply))]
    # A fractional power is defined on x >= 0: increasing for p > 0, decreasing for p < 0.
    x = widened(cx, x, node.inputs[0].dtype, non_negative=True)
    low, high = apply(x.lower), apply(x.upper)
    return [Interval.from_bounds(b, low, high) if p > 0 else Interval.from_bounds(b, high, low)]


def _odd_negative_power(b, x: Interval, apply):
    zero = b.const(0.0, dtype=np.float32)
    definite = b.op("Or", b.op("Greater", x.lower, b.op("CastLike", zero, x.lower)),
                    b.op("Less", x.upper, b.op("CastLike", zero, x.upper)))
    inf = b.op("CastLike", b.const(np.inf), x.lower)
    return (b.op("Where", definite, apply(x.upper), b.op("Neg", inf)),
            b.op("Where", definite, apply(x.lower), inf))


def _pow_bounded_exponent(cx, node, x: Interval, p: Interval) -> Interval:
    """x^p = exp(p·log x) for x > 0; unbounded where the base may be non-positive."""
    b = cx.b
    x = widened(cx, x, node.inputs[0].dtype)
    log = iv.monotone(b, x, lambda v: b.op("Log", v))
    product = iv.mul(b, log, p)
    power = iv.monotone(b, product, lambda v: b.op("Exp", v))
    zero = b.op("CastLike", b.const(0.0), x.lower)
    positive = b.op("Greater", x.lower, zero)
    inf = b.op("CastLike", b.const(np.inf), x.lower)
    lower = b.op("Where", positive, b.op("Mul", power.lower, b.op("CastLike", b.const(1 - 1e-6), x.lower)),
                 b.op("Neg", inf))
    upper = b.op("Where", positive, b.op("Mul", power.upper, b.op("CastLike", b.const(1 + 1e-6), x.lower)), inf)
    return Interval.from_bounds(b, lower, upper)


@rule("Mod")
def _mod(cx, node, x, y):
    """x mod y is increasing in x within one period of the quotient; across periods it spans the remainders."""
    b = cx.b
    x, y = (sane(cx, iv.as_interval(b, v), node.inputs[k].dtype) for k, v in enumerate((x, y)))
    if node.inputs[0].dtype is not None and node.inputs[0].dtype.is_floating_point():
        x = widened(cx, x, node.inputs[0].dtype)  # the quotient is a step: an ulp of error must not cross it
    fmod = attr(node, "fmod", 0)
    as64 = lambda v: b.op("Cast", v, to=ir.DataType.DOUBLE)  # noqa: E731
    xl, xu, yl, yu = (as64(v) for v in (x.lower, x.upper, y.lower, y.upper))
    zero = b.const(0.0, dtype=np.float64)
    y_exact = b.op("Equal", yl, yu)
    quotient = (lambda v: b.op("Mul", b.op("Sign", v), b.op("Floor", b.op("Abs", v)))) if fmod else \
        (lambda v: b.op("Floor", v))
    same = b.op("And", y_exact, b.op("Equal", quotient(b.op("Div", xl, yl)), quotient(b.op("Div", xu, yl))))
    largest = b.op("Max", b.op("Abs", yl), b.op("Abs", yu))
    if fmod:  # the remainder has the sign of x and is smaller than |x| and |y|
        span_low = b.op("Where", b.op("GreaterOrEqual", xl, zero), zero, b.op("Max", xl, b.op("Neg", largest)))
        span_high = b.op("Where", b.op("LessOrEqual", xu, zero), zero, b.op("Min", xu, largest))
    else:  # the remainder has the sign of y
        span_low = b.op("Where", b.op("GreaterOrEqual", yl, zero), zero, b.op("Neg", largest))
        span_high = b.op("Where", b.op("LessOrEqual", yu, zero), zero, largest)
    dtype = node.outputs[0].dtype or ir.DataType.FLOAT
    low_exact = b.op("Cast", b.copy(node, [x.lower, y.lower]), to=ir.DataType.DOUBLE)
    high_exact = b.op("Cast", b.copy(node, [x.upper, y.lower]), to=ir.DataType.DOUBLE)
    lower = b.op("Where", same, b.op("Min", low_exact, high_exact), span_low)
    upper = b.op("Where", same, b.op("Max", low_exact, high_exact), span_high)
    return [Interval.from_bounds(b, b.op("Cast", lower, to=dtype), b.op("Cast", upper, to=dtype))]


# ---- casts ------------------------------------------------------------------------------------------------

# Casting to half precision rounds by up to this relative amount (and subnormals by their spacing); the
# runtime may also drop a cast pair in one graph and not in the other, so bounds cover both.
HALF_ULP = {ir.DataType.FLOAT16: (2.0 ** -10, 2.0 ** -24), ir.DataType.BFLOAT16: (2.0 ** -7, 2.0 ** -126)}


def _widened_by(b, x: Interval, ulp) -> Interval:
    relative, absolute = ulp
    slack = b.op("Add", b.op("Mul", b.op("Max", b.op("Abs", x.lower), b.op("Abs", x.upper)),
                             b.op("CastLike", b.const(relative), x.lower)), b.op("CastLike", b.const(absolute), x.lower))
    return Interval.from_bounds(b, b.op("Sub", x.lower, slack), b.op("Add", x.upper, slack))


UNSIGNED = {ir.DataType.UINT8: 255, ir.DataType.UINT16: 65535, ir.DataType.UINT32: 2 ** 32 - 1}


def _target_known(node) -> bool:
    """A known target type (Cast's `to`, CastLike's second input's type)."""
    if node.op_type == "Cast":
        return attr(node, "to") is not None
    return node.inputs[1] is not None and node.inputs[1].dtype is not None


@rule("Cast", "CastLike", accepts=_target_known)
def _cast(cx, node, x, *rest):
    """Order-keeping casts map bounds to bounds (widened: they round); casts to bool test x != 0; casts to
    unsigned types wrap outside their range, where any value of the type is possible."""
    b = cx.b
    x = sane(cx, iv.as_interval(b, x), node.inputs[0].dtype)
    target = ir.DataType(attr(node, "to")) if node.op_type == "Cast" else node.inputs[1].dtype
    source = node.inputs[0].dtype
    if target == ir.DataType.BOOL:
        zero = b.op("CastLike", b.const(0.0), x.lower)
        certain = b.op("Or", b.op("Greater", x.lower, zero), b.op("Less", x.upper, zero))
        possible = b.op("Not", b.op("And", b.op("Equal", x.lower, zero), b.op("Equal", x.upper, zero)))
        return [Interval.from_bounds(b, certain, possible)]
    if source is not None and source.is_floating_point():
        x = widened(cx, x, source)
    if target in NARROW_FLOATS or target in NO_KERNEL:
        return [_narrow_float(cx, node, x, target)]
    if source is not None and source.is_floating_point():
        if target in HALF_ULP:
            x = _widened_by(b, x, HALF_ULP[target])
    low, high = b.copy(node, [x.lower, *rest]), b.copy(node, [x.upper, *rest])
    if target in HALF_ULP:  # beyond the largest half value the cast overflows to infinity
        top = b.op("CastLike", b.const(float(np.finfo(np.float16).max)), x.lower)
        inf = b.op("CastLike", b.const(np.inf), high)
        high = b.op("Where", b.op("GreaterOrEqual", x.upper, top), inf, high)
        low = b.op("Where", b.op("LessOrEqual", x.lower, b.op("Neg", top)), b.op("Neg", inf), low)
    if target in UNSIGNED and (source is None or source not in UNSIGNED):
        zero = b.op("CastLike", b.const(0.0), x.lower)
        top = b.op("CastLike", b.const(float(UNSIGNED[target])), x.lower)
        fits = b.op("And", b.op("GreaterOrEqual", x.lower, zero), b.op("LessOrEqual", x.upper, top))
        low = b.op("Where", fits, low, b.op("CastLike", b.const(0.0), low))
        high = b.op("Where", fits, high, b.op("CastLike", b.const(float(UNSIGNED[target])), high))
    return [Interval.from_bounds(b, low, high)]




# ---- casts to 8-bit floats and bfloat16 -------------------------------------------------------------------

# onnxruntime has no kernels but Cast (and QDQ) for these: bounds stay float32 (every value of these types is a
# float32). Rounding to nearest and saturation are non-decreasing (checked against onnxruntime on a dense grid
# in tests/test_ibp_rules.py), so the rounded ends bound the rounded values.
NARROW_FLOATS = (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2,
                 ir.DataType.FLOAT8E5M2FNUZ, ir.DataType.FLOAT8E8M0, ir.DataType.BFLOAT16)
# Types onnxruntime cannot cast to at all (so neither the model nor its bound graph runs there).
NO_KERNEL = (ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT6E2M3, ir.DataType.FLOAT6E3M2)


def _narrow_float(cx, node, x: Interval, target: ir.DataType) -> Interval:
    """Bounds of a cast to an 8-bit float or bfloat16, as float32: each end cast there and back. bfloat16 ends
    are first widened by its ulp, since the runtime may drop a float-bfloat16-float pair in one graph and not
    the other. A NaN end (no-saturate overflow of a type without infinities) says nothing: the whole line."""
    b = cx.b
    if target in NO_KERNEL:
        refuse(node, f"onnxruntime has no kernel for casts to {target.name}")
    if target in HALF_ULP:
        x = _widened_by(b, x, HALF_ULP[target])
    kept = {k: v for k, v in ((k, attr(node, k)) for k in ("saturate", "round_mode")) if v is not None}
    low, high = (b.op("Cast", b.op("Cast", b.op("Cast", v, to=ir.DataType.FLOAT), to=target, **kept),
                      to=ir.DataType.FLOAT) for v in (x.lower, x.upper))
    inf = b.const(np.inf)
    return Interval.from_bounds(b, b.op("Where", b.op("IsNaN", low), b.op("Neg", inf), low),
                                b.op("Where", b.op("IsNaN", high), inf, high))


# ---- BitCast of a float to the signed integer of its width ------------------------------------------------

SIGNED_BITS = {(ir.DataType.FLOAT, ir.DataType.INT32), (ir.DataType.DOUBLE, ir.DataType.INT64),
               (ir.DataType.FLOAT16, ir.DataType.INT16), (ir.DataType.BFLOAT16, ir.DataType.INT16)}


@rule("BitCast")
def _bitcast(cx, node, x):
    """A float's bits read as the signed integer of its width increase with x from +0 up, and below are
    INT_MIN + bits(|x|), decreasing in x: on one side of zero the ends map to the ends (swapped below zero);
    across zero, from INT_MIN (the bits of -0.0) to the larger of the ends' bits."""
    b = cx.b
    source, target = node.inputs[0].dtype, ir.DataType(attr(node, "to"))
    if (source, target) not in SIGNED_BITS:
        refuse(node, "only a float's bits as the signed integer of its width are bounded")
    x = sane(cx, iv.as_interval(b, x), source)
    low_bits, high_bits = b.copy(node, [x.lower]), b.copy(node, [x.upper])
    zero = b.op("CastLike", b.const(0.0), x.lower)
    positive, negative = b.op("Greater", x.lower, zero), b.op("Less", x.upper, zero)
    smallest = b.const(np.iinfo(target.numpy()).min, dtype=target.numpy())
    lower = b.op("Where", positive, low_bits, b.op("Where", negative, high_bits, smallest))
    upper = b.op("Where", positive, high_bits, b.op("Where", negative, low_bits, b.op("Max", low_bits, high_bits)))
    return [Interval.from_bounds(b, lower, upper)]
