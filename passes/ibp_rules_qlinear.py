"""IBP rules of the integer ops of quantized models: QLinearConv, QLinearMatMul (what onnxruntime's static
quantizer writes in QOperator format), ConvInteger, MatMulInteger and DynamicQuantizeLinear (its dynamic one).

The runtime accumulates sum (x - x_zp)(w - w_zp) (+ an int32 bias) exactly in int32, then the QLinear ops
requantize: y = saturate(round_half_even(acc · x_scale · w_scale / y_scale) + y_zp), non-decreasing in acc
(for a positive multiplier; either sign is bounded here). So the rules bound the integer accumulator exactly,
map its ends through the requantization widened by a few ulps (the runtime forms the multiplier and the
product in float32, which can round a tie the other way), and saturate. The accumulator is computed in float32
by Conv/MatMul on whole numbers: exact while every partial sum stays below 2^24 (checked on the weights when
they are constants, else bounded at run time from |x|·|w|, with the summation error added where it may not be).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert.interval import Interval
from graphcert.passes.ibp_core import constant_array, rule, widened
from graphcert.passes.ibp_rules_elementwise import refuse
from graphcert.passes.ibp_rules_quant import INTEGER_RANGES, _as_float

EIGHT_BIT = (ir.DataType.INT8, ir.DataType.UINT8)
# Largest |q - zero_point| of 8-bit values (both in the type's range).
EIGHT_BIT_SPAN = 255.0
# float32 sums of whole numbers are exact while every partial sum stays below 2^24; with margin for the
# rounding of the run-time magnitude bound itself.
EXACT_LIMIT = 2.0 ** 22
FLOAT = ir.DataType.FLOAT
DOUBLE = ir.DataType.DOUBLE


# ---- the integer accumulator -----------------------------------------------------------------------------

def _eight_bit(node, *indices) -> None:
    for i in indices:
        value = node.inputs[i] if i < len(node.inputs) else None
        if value is not None and value.dtype is not None and value.dtype not in EIGHT_BIT:
            refuse(node, f"{value.dtype.name} operands (8-bit integers only)")


def _shifted(cx, x, zero_point, along=None) -> Interval:
    """x - zero_point as float32 bounds (whole numbers below 2^9: exact), the zero point shaped by `along`."""
    b = cx.b
    x = _as_float32(b, x)
    if zero_point is None:
        return x
    zp = _as_float32(b, zero_point)
    if along is not None:
        zp = _each_end(b, zp, along)
    if _is_point(x) and _is_point(zp):
        return iv.point(b, b.op("Sub", x.lower, zp.lower))
    return iv.sub(b, x, zp)


def _as_float32(b, x) -> Interval:
    """Float32 bounds of an integer tensor; an unperturbed one stays a point (lower is upper)."""
    if isinstance(x, Interval):
        return _as_float(b, x)
    return iv.point(b, b.op("Cast", iv.as_interval(b, x).lower, to=FLOAT))


def _each_end(b, x: Interval, apply) -> Interval:
    if _is_point(x):
        return iv.point(b, apply(x.lower))
    return Interval.from_bounds(b, apply(x.lower), apply(x.upper))


def _is_point(v: Interval) -> bool:
    return v.lower is v.upper


def _accumulator(cx, node, x: Interval, w: Interval, product, terms: int | None, static_sum=None):
    """Bounds (lower, upper) in float64 of product(x, w) summed over `terms` products of whole numbers, for x and
    w intervals of whole numbers (a point is an interval with lower is upper).

    Twice the centres and radii keep every operand a whole number: with X = l + u, R = u - l (and W, S for w),
    4·acc lies in op(X, W) ± (op(|X|, S) + op(R, |W|) + op(R, S)) (Rump's midpoint-radius product)."""
    b = cx.b
    x_point, w_point = _is_point(x), _is_point(w)
    if x_point and w_point:
        centre, radius, factor = product(x.lower, w.lower), None, 1.0
        magnitude = lambda: product(b.op("Abs", x.lower), b.op("Abs", w.lower))  # noqa: E731
    elif w_point:
        xc, xr = b.op("Add", x.lower, x.upper), b.op("Sub", x.upper, x.lower)
        w_abs = b.op("Abs", w.lower) if static_sum is None else static_sum[1]
        centre, radius, factor = product(xc, w.lower), product(xr, w_abs), 2.0
        magnitude = lambda: product(b.op("Add", b.op("Abs", xc), xr), w_abs)  # noqa: E731
    else:
        xc, xr = (b.op("Add", x.lower, x.upper), b.op("Sub", x.upper, x.lower)) if not x_point else \
            (b.op("Add", x.lower, x.lower), None)
        wc, wr = b.op("Add", w.lower, w.upper), b.op("Sub", w.upper, w.lower)
        xa, wa = b.op("Abs", xc), b.op("Abs", wc)
        centre, factor = product(xc, wc), 4.0
        radius = product(xa, wr)
        if xr is not None:
            radius = b.op("Add", radius, b.op("Add", product(xr, wa), product(xr, wr)))
        magnitude = lambda: product(xa if xr is None else b.op("Add", xa, xr), b.op("Add", wa, wr))  # noqa: E731
    centre = b.op("Cast", centre, to=DOUBLE)
    radius = b.op("Cast", radius, to=DOUBLE) if radius is not None else None
    lower = centre if radius is None else b.op("Sub", centre, radius)
    upper = centre if radius is None else b.op("Add", centre, radius)
    exact = static_sum is not None and static_sum[0] * factor <= EXACT_LIMIT
    if not exact:
        if terms is None:
            refuse(node, "a reduction of unknown length (the float32 summation error cannot be bounded)")
        # Any summation order errs by at most terms·2^-24 of the sum of |products| (Higham's gamma_n); the
        # magnitude bounds the |products| of all the sums together, and the additions of the radius's sums add
        # at most 3 ulps of it: half of (terms + 4)·2^-23 of it is twice that. None where every partial sum is a
        # whole number below 2^24.
        total = b.op("Cast", magnitude(), to=DOUBLE)
        slack = b.op("Where", b.op("LessOrEqual", total, b.const(EXACT_LIMIT / factor, dtype=np.float64)),
                     b.const(0.0, dtype=np.float64),
                     b.op("Mul", total, b.const((terms + 4) * 2.0 ** -23, dtype=np.float64)))
        lower, upper = b.op("Sub", lower, slack), b.op("Add", upper, slack)
    if factor != 1.0:
        k = b.const(1.0 / factor, dtype=np.float64)
        lower, upper = b.op("Mul", lower, k), b.op("Mul", upper, k)
    if not exact:  # the accumulator is a whole number
        lower, upper = b.op("Ceil", lower), b.op("Floor", upper)
    return lower, upper


def _weights(cx, node, w, zero_point, along):
    """(w, w_zp) as arrays for constant weights and zero point, else (w - w_zp as an interval, None)."""
    w_const, zp_const = constant_array(w), constant_array(zero_point) if zero_point is not None else 0
    _guard_saturation(node, w, w_const)
    if w_const is not None and zp_const is not None and not cx.trainable:
        return w_const, zp_const
    return _shifted(cx, w, zero_point, along), None


# int8 weights up to this magnitude keep every pair of uint8 x int8 products within int16 (255 x 128 <= 32767).
SEVEN_BIT = 64
X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def _exact_int8_products() -> bool:
    """Whether onnxruntime's uint8 x int8 kernels accumulate exactly on this CPU. On x86 without VNNI they sum
    pairs of products into int16 with saturation (VPMADDUBSW; int8 activations are shifted to uint8 first),
    which can differ from the exact accumulator the rules bound; VNNI and AMX accumulate in int32, as do
    other architectures' kernels."""
    import platform
    if platform.machine().lower() not in X86:
        return True
    try:
        with open("/proc/cpuinfo") as info:
            flags = set(info.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _guard_saturation(node, w, w_const) -> None:
    """Refuse int8 weights beyond 7 bits (or not known when converting) where the runtime may saturate."""
    dtype = w.dtype if isinstance(w, ir.Value) else None
    if dtype == ir.DataType.UINT8:
        return   # uint8 x uint8 kernels widen to 16 bits before multiplying: exact
    if w_const is not None and float(np.max(np.abs(w_const.astype(np.int32)), initial=0)) <= SEVEN_BIT:
        return
    if not _exact_int8_products():
        refuse(node, "int8 weights beyond 7 bits on an x86 CPU without VNNI, where onnxruntime may saturate "
                     "pairs of products in int16 (quantize with reduce_range=True, or certify on a VNNI CPU)")


def _outputs_per_term(shifted: np.ndarray, reduced_axes) -> float:
    return float(np.max(np.sum(np.abs(shifted), axis=reduced_axes))) if shifted.size else 0.0


# ---- requantization ----------------------------------------------------------------------------------------

def _requantized(cx, node, lower, upper, multiplier, y_zero_point, out_type) -> Interval:
    """saturate(round(acc · multiplier) + y_zp) at both ends of the accumulator (float64), widened by 2^-20 of
    the ends before rounding for the runtime's float32 multiplier and product."""
    b = cx.b
    first, second = b.op("Mul", lower, multiplier), b.op("Mul", upper, multiplier)
    ends = Interval.from_bounds(b, b.op("Min", first, second), b.op("Max", first, second))
    ends = widened(cx, ends, DOUBLE)
    low, high = b.op("Round", ends.lower), b.op("Round", ends.upper)
    if y_zero_point is not None:
        zp = b.op("Cast", y_zero_point, to=DOUBLE)
        low, high = b.op("Add", low, zp), b.op("Add", high, zp)
    smallest, largest = INTEGER_RANGES[out_type]
    limits = b.const(float(smallest), dtype=np.float64), b.const(float(largest), dtype=np.float64)
    low, high = (b.op("Cast", b.op("Clip", v, *limits), to=out_type) for v in (low, high))
    return Interval.from_bounds(b, low, high)


def _multiplier(cx, node, x_scale, w_scale, y_scale, along) -> ir.Value:
    b = cx.b
    if any(isinstance(s, Interval) for s in (x_scale, w_scale, y_scale)):
        refuse(node, "scales that depend on the perturbed input")
    scales = [b.op("Cast", s, to=DOUBLE) for s in (x_scale, w_scale, y_scale)]
    return along(b.op("Div", b.op("Mul", scales[0], scales[1]), scales[2]))


def _to_int32(cx, lower, upper) -> Interval:
    """An int32 accumulator's bounds (the runtime wraps beyond int32; bounds there are the type's ends)."""
    b = cx.b
    limits = b.const(-2.0 ** 31, dtype=np.float64), b.const(2.0 ** 31 - 1, dtype=np.float64)
    return Interval.from_bounds(b, *(b.op("Cast", b.op("Clip", v, *limits), to=ir.DataType.INT32)
                                     for v in (lower, upper)))


# ---- convolutions ------------------------------------------------------------------------------------------

def _conv_product(cx, node):
    """A float Conv with the node's geometry (QLinearConv and ConvInteger take Conv's attributes)."""
    b = cx.b

    def product(p, q):
        new = ir.Node("", "Conv", [p, q], attributes=list(node.attributes.values()), graph=b.graph,
                      name=b.fresh("conv"))
        new.outputs[0].name = b.fresh("conv")
        return new.outputs[0]
    return product


def _conv_accumulator(cx, node, x, x_zp, w, w_zp, bias=None):
    """The bounds of conv(x - x_zp, w - w_zp) (+ bias), float64, exact whole numbers unless marked."""
    b = cx.b
    w_shape = node.inputs[1 if node.op_type == "ConvInteger" else 3].shape
    if w_shape is None or len(w_shape) < 3:
        refuse(node, "a weight of unknown rank")
    rank = len(w_shape)
    per_out = lambda v: b.op("Reshape", v, b.ints([-1] + [1] * (rank - 1)))  # noqa: E731
    x_shifted = _shifted(cx, x, x_zp)
    w_const, zp_const = _weights(cx, node, w, w_zp, per_out)
    static_sum = None
    if isinstance(w_const, np.ndarray):
        zp = np.asarray(zp_const, dtype=np.float64)
        zp = zp.reshape([-1] + [1] * (rank - 1)) if zp.size > 1 else zp.reshape(())
        shifted = w_const.astype(np.float64) - zp
        static_sum = (EIGHT_BIT_SPAN * _outputs_per_term(shifted, tuple(range(1, rank))),
                      b.const(np.abs(shifted).astype(np.float32)))
        w_shifted = iv.point(b, b.const(shifted.astype(np.float32)))
    else:
        w_shifted = w_const
    terms = int(np.prod(w_shape[1:])) if all(isinstance(d, int) for d in w_shape[1:]) else None
    lower, upper = _accumulator(cx, node, x_shifted, w_shifted, _conv_product(cx, node), terms, static_sum)
    if bias is not None:
        if isinstance(bias, Interval):
            refuse(node, "a bias that depends on the perturbed input")
        along = b.op("Reshape", b.op("Cast", bias, to=DOUBLE), b.ints([-1] + [1] * (rank - 2)))
        lower, upper = b.op("Add", lower, along), b.op("Add", upper, along)
    return lower, upper, rank


@rule("QLinearConv")
def _qlinear_conv(cx, node, x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp=None, bias=None):
    _eight_bit(node, 0, 3, 7)
    lower, upper, rank = _conv_accumulator(cx, node, x, x_zp, w, w_zp, bias)
    per_channel = lambda v: cx.b.op("Reshape", v, cx.b.ints([-1] + [1] * (rank - 2)))  # noqa: E731
    multiplier = _multiplier(cx, node, x_scale, w_scale, y_scale, per_channel)
    return [_requantized(cx, node, lower, upper, multiplier, y_zp, _out_type(node))]


@rule("ConvInteger")
def _conv_integer(cx, node, x, w, x_zp=None, w_zp=None):
    _eight_bit(node, 0, 1)
    lower, upper, _ = _conv_accumulator(cx, node, x, x_zp, w, w_zp)
    return [_to_int32(cx, lower, upper)]


# ---- matrix products ---------------------------------------------------------------------------------------

def _matmul_accumulator(cx, node, a, a_zp, b_value, b_zp, b_shape=None):
    """The bounds of (a - a_zp) @ (b - b_zp), float64, exact whole numbers unless marked; b_shape is b's shape
    when b_value is not the node's second operand as given (QGemm's transposed B)."""
    b = cx.b
    a_zp_shape = node.inputs[2].shape if len(node.inputs) > 2 and node.inputs[2] is not None else None
    rows = None
    if a_zp_shape is not None and len(a_zp_shape) == 1 and a_zp_shape[0] != 1:
        rows = lambda v: b.op("Reshape", v, b.ints([-1, 1]))  # noqa: E731 (a 1-D per-row zero point of 2-D A)
    a_shifted = _shifted(cx, a, a_zp, rows)
    w_const, zp_const = _weights(cx, node, b_value, b_zp, None)
    static_sum = None
    if isinstance(w_const, np.ndarray):
        shifted = w_const.astype(np.float64) - np.asarray(zp_const, dtype=np.float64)
        axis = -2 if shifted.ndim >= 2 else 0
        static_sum = (EIGHT_BIT_SPAN * _outputs_per_term(shifted, axis), b.const(np.abs(shifted).astype(np.float32)))
        w_shifted = iv.point(b, b.const(shifted.astype(np.float32)))
    else:
        w_shifted = w_const
    if b_shape is None:
        b_shape = node.inputs[1 if node.op_type == "MatMulInteger" else 3].shape
    inner = b_shape[-2] if b_shape is not None and len(b_shape) >= 2 else (b_shape[0] if b_shape else None)
    terms = inner if isinstance(inner, int) else None
    product = lambda p, q: b.op("MatMul", p, q)  # noqa: E731
    return _accumulator(cx, node, a_shifted, w_shifted, product, terms, static_sum)


@rule("QLinearMatMul")
def _qlinear_matmul(cx, node, a, a_scale, a_zp, b_value, b_scale, b_zp, y_scale, y_zp=None):
    _eight_bit(node, 0, 3, 7)
    for index in (1, 2, 6, 7):
        shape = node.inputs[index].shape if index < len(node.inputs) and node.inputs[index] is not None else None
        if shape is not None and int(np.prod([d if isinstance(d, int) else 2 for d in shape])) != 1:
            refuse(node, "per-row scales or zero points of A or Y (per tensor only)")
    lower, upper = _matmul_accumulator(cx, node, a, a_zp, b_value, b_zp)
    multiplier = _multiplier(cx, node, a_scale, b_scale, y_scale, lambda v: v)
    return [_requantized(cx, node, lower, upper, multiplier, y_zp, _out_type(node))]


@rule("MatMulInteger")
def _matmul_integer(cx, node, a, b_value, a_zp=None, b_zp=None):
    _eight_bit(node, 0, 1)
    lower, upper = _matmul_accumulator(cx, node, a, a_zp, b_value, b_zp)
    return [_to_int32(cx, lower, upper)]


# The y_zero_point input of each requantizing op (its type is the output's), for graphs where shape inference
# does not know the op (onnxruntime's com.microsoft ones) or what feeds it.
OUTPUT_ZERO_POINT = {"QLinearConv": 7, "QLinearMatMul": 7, "QGemm": 8, "QLinearAdd": 7, "QLinearMul": 7,
                     "QLinearGlobalAveragePool": 4, "QLinearAveragePool": 4, "QLinearConcat": 1, "QLinearSigmoid": 4,
                     "QLinearLeakyRelu": 4}


def _out_type(node) -> ir.DataType:
    out = node.outputs[0].dtype
    index = OUTPUT_ZERO_POINT.get(node.op_type)
    for given in ([node.inputs[index]] if index is not None and index < len(node.inputs) else []) + [node.inputs[0]]:
        if out is None and given is not None:
            out = given.dtype
    if out not in EIGHT_BIT:
        refuse(node, f"an output of type {out.name if out is not None else 'unknown'} (8-bit integers only)")
    return out


# ---- DynamicQuantizeLinear ---------------------------------------------------------------------------------

@rule("DynamicQuantizeLinear")
def _dynamic_quantize(cx, node, x):
    """y_scale = (max(0, max x) - min(0, min x)) / 255, y_zp = saturate(round(-min(0, min x) / y_scale)),
    y = saturate(round(x / y_scale) + y_zp), all over the whole tensor (the batch too: the model mixes the
    samples it is given). Each piece in interval arithmetic, widened for float32 rounding."""
    b = cx.b
    x = widened(cx, _as_float(b, x), FLOAT)
    zero = b.const(0.0)
    whole = lambda op, v: b.reduce(op, b.op("Reshape", v, b.ints([-1])), [0], keepdims=0)  # noqa: E731
    low = Interval.from_bounds(b, b.op("Min", whole("ReduceMin", x.lower), zero),
                               b.op("Min", whole("ReduceMin", x.upper), zero))
    high = Interval.from_bounds(b, b.op("Max", whole("ReduceMax", x.lower), zero),
                                b.op("Max", whole("ReduceMax", x.upper), zero))
    smallest = b.op("Div", b.op("Sub", high.lower, low.upper), b.const(255.0))
    largest = b.op("Div", b.op("Sub", high.upper, low.lower), b.const(255.0))
    # An all-zero tensor (possible where the smallest range is 0) gets a scale of 1 from the runtime.
    largest = b.op("Where", b.op("LessOrEqual", smallest, zero), b.op("Max", largest, b.const(1.0)), largest)
    scale = widened(cx, Interval.from_bounds(b, smallest, largest), FLOAT)
    inverse = iv.reciprocal(b, scale)
    zp = _saturated(b, widened(cx, iv.mul(b, iv.neg(b, low), inverse), FLOAT))
    quotient = widened(cx, iv.mul(b, x, inverse), FLOAT)
    rounded = Interval.from_bounds(b, b.op("Round", quotient.lower), b.op("Round", quotient.upper))
    y = _saturated(b, iv.add(b, rounded, zp))
    uint8 = ir.DataType.UINT8
    return [_each_end(b, y, lambda v: b.op("Cast", v, to=uint8)), scale,
            _each_end(b, zp, lambda v: b.op("Cast", v, to=uint8))]


def _saturated(b, value: Interval) -> Interval:
    """round and saturate to uint8's range, as float32 whole numbers."""
    low, high = (b.op("Clip", b.op("Round", v), b.const(0.0), b.const(255.0)) for v in (value.lower, value.upper))
    return Interval.from_bounds(b, low, high)
