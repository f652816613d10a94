"""IBP rules of onnxruntime's quantized ops of the com.microsoft domain, which its static quantizer writes in
QOperator format beside QLinearConv/QLinearMatMul: QGemm (every Gemm/Linear layer), QLinearAdd (residual
sums), QLinearMul, QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat, QLinearSigmoid and
QLinearLeakyRelu.

Each is dequantize -> float op -> requantize with the runtime's rounding (half to even) and saturation, as
onnxruntime's kernels compute it (integer accumulators exact; the float steps in float32, which moves a value
by a few ulps of the terms it is made of: the ends are widened by 2^-20 of those terms before rounding).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.passes.ibp_core import constant_array, rule
from graphcert.passes.ibp_rules_elementwise import refuse
from graphcert.passes.ibp_rules_qlinear import (DOUBLE, FLOAT, INTEGER_RANGES, _as_float32, _each_end, _eight_bit,
                                                _matmul_accumulator, _out_type)

MS = "com.microsoft"
RELATIVE = 2.0 ** -20


def _double(b, x) -> Interval:
    """Float64 bounds of an integer or float tensor (a point stays a point)."""
    x = _as_float32(b, x)
    return _each_end(b, x, lambda v: b.op("Cast", v, to=DOUBLE))


def _scalar(cx, node, value, what: str):
    if isinstance(value, Interval):
        refuse(node, f"a {what} that depends on the perturbed input")
    return cx.b.op("Cast", value, to=DOUBLE)


def _times(b, x: Interval, factor) -> Interval:
    """x · factor for a point factor of either sign, in float64."""
    first, second = b.op("Mul", x.lower, factor), b.op("Mul", x.upper, factor)
    return Interval.from_bounds(b, b.op("Min", first, second), b.op("Max", first, second))


def _magnitude(b, x: Interval):
    return b.op("Max", b.op("Abs", x.lower), b.op("Abs", x.upper))


def _dequantized(cx, node, q, scale, zero_point) -> Interval:
    """(q - zero_point) · scale in float64 (exact for 8-bit q and a float32 scale)."""
    b = cx.b
    value = _double(b, q)
    if zero_point is not None:
        zp = _double(b, zero_point)
        value = Interval.from_bounds(b, b.op("Sub", value.lower, zp.upper), b.op("Sub", value.upper, zp.lower))
    return _times(b, value, _scalar(cx, node, scale, "scale"))


def _quantized(cx, node, real: Interval, slack, y_scale, y_zp, out_type=None) -> Interval:
    """saturate(round(real / y_scale ± slack / y_scale) + y_zp) in the output's 8-bit type."""
    b = cx.b
    out_type = out_type or _out_type(node)
    inverse = b.op("Reciprocal", _scalar(cx, node, y_scale, "scale"))
    scaled = _times(b, real, inverse)
    spread = b.op("Mul", slack, b.op("Abs", inverse))
    low, high = (b.op("Round", v) for v in (b.op("Sub", scaled.lower, spread), b.op("Add", scaled.upper, spread)))
    if y_zp is not None:
        zp = _double(b, y_zp)
        low, high = b.op("Add", low, zp.lower), b.op("Add", high, zp.upper)
    smallest, largest = INTEGER_RANGES[out_type]
    limits = b.const(float(smallest), dtype=np.float64), b.const(float(largest), dtype=np.float64)
    return Interval.from_bounds(b, *(b.op("Cast", b.op("Clip", v, *limits), to=out_type) for v in (low, high)))


def _slack(b, *terms: Interval):
    """2^-20 of the largest magnitudes of the terms a float32 result was summed from."""
    total = _magnitude(b, terms[0])
    for term in terms[1:]:
        total = b.op("Add", total, _magnitude(b, term))
    return b.op("Mul", total, b.const(RELATIVE, dtype=np.float64))


# ---- QGemm -------------------------------------------------------------------------------------------------

def _transposed(cx, value):
    b = cx.b
    array = constant_array(value)
    if array is not None and not cx.trainable:
        return b.const(np.ascontiguousarray(array.T), dtype=array.dtype)
    if isinstance(value, Interval):
        return _each_end(b, value, lambda v: b.op("Transpose", v, perm=[1, 0]))
    return b.op("Transpose", value, perm=[1, 0])


@rule("QGemm", domain=MS)
def _qgemm(cx, node, a, a_scale, a_zp, b_value, b_scale, b_zp, bias=None, y_scale=None, y_zp=None):
    """alpha · (A - a_zp)(B - b_zp) + C (int32) accumulated exactly, then requantized (y_scale given) or scaled
    to float32 (y_scale absent)."""
    b = cx.b
    _eight_bit(node, 0, 3)
    b_shape = node.inputs[3].shape
    if attr(node, "transA", 0):
        a = _transposed(cx, a)
    if attr(node, "transB", 0):
        b_value = _transposed(cx, b_value)
        b_shape = list(reversed(list(b_shape))) if b_shape is not None else None
    lower, upper = _matmul_accumulator(cx, node, a, a_zp, b_value, b_zp, b_shape)
    if bias is not None:
        c = _double(b, bias)
        lower, upper = b.op("Add", lower, c.lower), b.op("Add", upper, c.upper)
    acc = Interval.from_bounds(b, lower, upper)
    scale = b.op("Mul", b.op("Mul", _scalar(cx, node, a_scale, "scale"), _scalar(cx, node, b_scale, "scale")),
                 b.const(float(attr(node, "alpha", 1.0)), dtype=np.float64))
    real = _times(b, acc, scale)
    slack = _slack(b, real)
    if y_scale is None:   # float output
        return [Interval.from_bounds(b, *(b.op("Cast", v, to=FLOAT) for v in
                                          (b.op("Sub", real.lower, slack), b.op("Add", real.upper, slack))))]
    return [_quantized(cx, node, real, slack, y_scale, y_zp)]


# ---- element-wise sums and products, pools, concatenation, activations -----------------------------------

@rule("QLinearAdd", domain=MS)
def _qlinear_add(cx, node, a, a_scale, a_zp, b_value, b_scale, b_zp, y_scale, y_zp=None):
    _eight_bit(node, 0, 3)
    first, second = _dequantized(cx, node, a, a_scale, a_zp), _dequantized(cx, node, b_value, b_scale, b_zp)
    b = cx.b
    total = Interval.from_bounds(b, b.op("Add", first.lower, second.lower), b.op("Add", first.upper, second.upper))
    return [_quantized(cx, node, total, _slack(b, first, second), y_scale, y_zp)]


@rule("QLinearMul", domain=MS)
def _qlinear_mul(cx, node, a, a_scale, a_zp, b_value, b_scale, b_zp, y_scale, y_zp=None):
    _eight_bit(node, 0, 3)
    b = cx.b
    first, second = _dequantized(cx, node, a, a_scale, a_zp), _dequantized(cx, node, b_value, b_scale, b_zp)
    corners = [b.op("Mul", p, q) for p in (first.lower, first.upper) for q in (second.lower, second.upper)]
    product = Interval.from_bounds(b, b.op("Min", *corners), b.op("Max", *corners))
    return [_quantized(cx, node, product, _slack(b, product), y_scale, y_zp)]


@rule("QLinearGlobalAveragePool", domain=MS)
def _qlinear_global_average_pool(cx, node, x, x_scale, x_zp, y_scale, y_zp=None):
    """The mean over the spatial axes (any rank, known when it runs: shape inference does not know the op's
    inputs in a QOperator graph), summed exactly in float64."""
    _eight_bit(node, 0)
    b = cx.b
    value = _dequantized(cx, node, x, x_scale, x_zp)
    channels_last = attr(node, "channels_last", 0)
    if channels_last and node.inputs[0].shape is None:
        refuse(node, "channels-last data of unknown rank")
    if channels_last:
        rank = len(node.inputs[0].shape)
        axes = list(range(1, rank - 1))
        mean = Interval.from_bounds(b, *(b.reduce("ReduceMean", v, axes) for v in (value.lower, value.upper)))
    else:  # [N, C, spatial...] -> [N, C, n] -> mean -> [N, C, 1, ...]
        shape = b.op("Shape", value.lower)
        ones = b.op("ConstantOfShape", b.op("Sub", b.op("Shape", shape), b.ints([2])),
                    value=ir.tensor(np.ones(1, dtype=np.int64)))
        target = b.op("Concat", b.op("Shape", value.lower, end=2), ones, axis=0)
        flat = b.ints([0, 0, -1])
        mean = Interval.from_bounds(b, *(b.op("Reshape", b.reduce("ReduceMean", b.op("Reshape", v, flat), [2]), target)
                                         for v in (value.lower, value.upper)))
    return [_quantized(cx, node, mean, _slack(b, mean), y_scale, y_zp)]


def _average_pool_accepted(node) -> bool:
    """Channels first and no ceil mode (onnxruntime's QLinearAveragePool averages a ceil-mode window that runs
    past the input unlike its AveragePool: 9 of 12 outputs of a 5x5 -> 3x3 pool differed)."""
    return not attr(node, "channels_last", 0) and not attr(node, "ceil_mode", 0)


@rule("QLinearAveragePool", domain=MS, accepts=_average_pool_accepted)
def _qlinear_average_pool(cx, node, x, x_scale, x_zp, y_scale, y_zp=None):
    """AveragePool (positive weights: non-decreasing) of x - x_zp at both ends, in float32: window sums of whole
    numbers are exact there, the division rounds once. The runtime averages the dequantized floats, whose
    rounding is within (window + 2) ulps of the terms' average magnitude: that much is added."""
    b = cx.b
    _eight_bit(node, 0)
    shifted = _as_float32(b, x)
    if x_zp is not None:
        zp = _as_float32(b, x_zp)
        shifted = Interval.from_bounds(b, b.op("Sub", shifted.lower, zp.upper), b.op("Sub", shifted.upper, zp.lower))
    kept = [a for name, a in node.attributes.items() if name != "channels_last"]

    def pool(v):
        new = ir.Node("", "AveragePool", [v], attributes=kept, graph=b.graph, name=b.fresh("averagepool"))
        new.outputs[0].name = b.fresh("averagepool")
        return b.op("Cast", new.outputs[0], to=DOUBLE)
    scale = _scalar(cx, node, x_scale, "scale")
    mean = _times(b, Interval.from_bounds(b, pool(shifted.lower), pool(shifted.upper)), scale)
    window = int(np.prod(attr(node, "kernel_shape")))
    terms = b.op("Mul", pool(b.op("Max", b.op("Abs", shifted.lower), b.op("Abs", shifted.upper))), b.op("Abs", scale))
    slack = b.op("Add", _slack(b, mean), b.op("Mul", terms, b.const((window + 2) * 2.0 ** -24, dtype=np.float64)))
    return [_quantized(cx, node, mean, slack, y_scale, y_zp)]


@rule("QLinearConcat", domain=MS)
def _qlinear_concat(cx, node, y_scale, y_zp, *triples):
    """Every input requantized to the output's scale and zero point, then concatenated."""
    b = cx.b
    out_type = _out_type(node)
    if len(triples) % 3:
        refuse(node, "inputs that are not (tensor, scale, zero point) triples")
    parts = []
    for k in range(0, len(triples), 3):
        value = _dequantized(cx, node, *triples[k:k + 3])
        parts.append(_quantized(cx, node, value, _slack(b, value), y_scale, y_zp, out_type))
    axis = attr(node, "axis")
    return [Interval.from_bounds(b, b.op("Concat", *[p.lower for p in parts], axis=axis),
                                 b.op("Concat", *[p.upper for p in parts], axis=axis))]


def _monotone_activation(node) -> bool:
    """A non-negative alpha (LeakyRelu is non-decreasing then)."""
    return node.op_type != "QLinearLeakyRelu" or attr(node, "alpha", 0.01) >= 0


@rule("QLinearSigmoid", "QLinearLeakyRelu", domain=MS, accepts=_monotone_activation)
def _qlinear_activation(cx, node, x, x_scale, x_zp, y_scale, y_zp=None):
    """Non-decreasing: the float op at both dequantized ends (float32, as onnxruntime builds its lookup table)."""
    b = cx.b
    _eight_bit(node, 0)
    value = _dequantized(cx, node, x, x_scale, x_zp)
    apply = (lambda v: b.op("Sigmoid", v)) if node.op_type == "QLinearSigmoid" else \
        (lambda v: b.op("LeakyRelu", v, alpha=float(attr(node, "alpha", 0.01))))
    ends = [b.op("Cast", apply(b.op("Cast", v, to=FLOAT)), to=DOUBLE) for v in (value.lower, value.upper)]
    out = Interval.from_bounds(b, *ends)
    return [_quantized(cx, node, out, _slack(b, out, value), y_scale, y_zp)]

