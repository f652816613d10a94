"""IBP rules of quantization: QuantizeLinear and DequantizeLinear (QDQ graphs, DynamicQuantizeLinear's body).

QuantizeLinear is saturate(round(x / scale) + zero_point): for a positive scale every step is non-decreasing in
x, so the quantized ends bound the quantized values; a bounded scale or zero point enters through interval
division and addition. DequantizeLinear is (q - zero_point) · scale. This bounds the quantized graph itself
(the model as deployed), not the float model it came from. Bounds are float32 values (exact for every
integer and 8-bit float type), cast to the output type where onnxruntime computes in it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.passes.ibp_core import constant_array, rule, sane, widened
from graphcert.passes.ibp_rules_elementwise import NARROW_FLOATS, refuse

INTEGER_RANGES = {ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255), ir.DataType.INT16: (-32768, 32767),
                  ir.DataType.UINT16: (0, 65535), ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15),
                  ir.DataType.INT2: (-2, 1), ir.DataType.UINT2: (0, 3), ir.DataType.INT32: (-2 ** 31, 2 ** 31 - 1)}
# Types whose bounds stay in that type (onnxruntime's arithmetic kernels take them); others stay float32.
KEPT_TYPES = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32)


def _as_float(b, x) -> Interval:
    x = iv.as_interval(b, x)
    return Interval.from_bounds(b, *(b.op("Cast", v, to=ir.DataType.FLOAT) for v in (x.lower, x.upper)))


def _along(cx, node, value, rank: int | None):
    """A scale or zero point broadcast against the data: as given (per tensor), along `axis` (per axis), or
    repeated `block_size` times along `axis` (blocked)."""
    b = cx.b
    block = attr(node, "block_size", 0) or 0
    shape = node.inputs[1].shape
    if shape is None or len(shape) == 0 or (len(shape) == 1 and shape[0] == 1 and not block):
        return value
    if rank is None:
        refuse(node, "per-axis or blocked parameters on data of unknown rank")
    axis = attr(node, "axis", 1) % rank
    if block:
        length = node.inputs[0].shape[axis]
        if not isinstance(length, int):
            refuse(node, "blocked parameters along an axis of unknown length")
        index = b.ints(np.arange(length) // block)
        gather = lambda v: b.op("Gather", v, index, axis=axis)  # noqa: E731
    else:
        target = b.ints([-1] + [1] * (rank - 1 - axis))
        gather = lambda v: b.op("Reshape", v, target)  # noqa: E731
    if isinstance(value, Interval):
        return Interval.from_bounds(b, gather(value.lower), gather(value.upper))
    return gather(value)


def _positive_constant(value) -> bool:
    array = constant_array(value)
    return array is not None and bool(np.all(array > 0))


def _output_type(node) -> ir.DataType:
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].dtype is not None:
        return node.inputs[2].dtype
    given = attr(node, "output_dtype", 0)
    return ir.DataType(given) if given else ir.DataType.UINT8


@rule("QuantizeLinear")
def _quantize(cx, node, x, scale, zero_point=None):
    b = cx.b
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    target = _output_type(node)
    if target not in INTEGER_RANGES and target not in NARROW_FLOATS:
        refuse(node, f"quantization to {target.name}")
    x = sane(cx, _as_float(b, x), ir.DataType.FLOAT)
    scale_b = _along(cx, node, scale if isinstance(scale, Interval) else b.op("Cast", scale, to=ir.DataType.FLOAT),
                     rank)
    if isinstance(scale_b, Interval) or not _positive_constant(scale):
        # x / scale for a bounded (or not surely positive) scale: interval division (unbounded through zero).
        quotient = iv.mul(b, x, iv.reciprocal(b, widened(cx, _as_float(b, scale_b), ir.DataType.FLOAT)))
        quotient = sane(cx, quotient, ir.DataType.FLOAT)
    else:  # the runtime's own division at each end (non-decreasing for a positive scale)
        quotient = Interval.from_bounds(b, b.op("Div", x.lower, scale_b), b.op("Div", x.upper, scale_b))
    # A few ulps wider: a runtime may multiply by 1/scale instead, which can round a tie the other way.
    quotient = widened(cx, quotient, ir.DataType.FLOAT)
    shift = None
    if zero_point is not None:
        shift = _along(cx, node, _as_float(b, zero_point), rank)
    if target in NARROW_FLOATS:  # no rounding to integers: a cast to the 8-bit float
        value = quotient if shift is None else iv.add(b, quotient, shift)
        saturate = attr(node, "saturate", 1)
        low, high = (b.op("Cast", b.op("Cast", v, to=target, saturate=saturate), to=ir.DataType.FLOAT)
                     for v in (value.lower, value.upper))
        inf = b.const(np.inf)
        return [Interval.from_bounds(b, b.op("Where", b.op("IsNaN", low), b.op("Neg", inf), low),
                                     b.op("Where", b.op("IsNaN", high), inf, high))]
    rounded = Interval.from_bounds(b, b.op("Round", quotient.lower), b.op("Round", quotient.upper))
    value = rounded if shift is None else iv.add(b, rounded, shift)
    smallest, largest = INTEGER_RANGES[target]
    low, high = (b.op("Clip", v, b.const(float(smallest)), b.const(float(largest))) for v in (value.lower, value.upper))
    if target in KEPT_TYPES:
        low, high = (b.op("Cast", v, to=target) for v in (low, high))
    return [Interval.from_bounds(b, low, high)]


@rule("DequantizeLinear")
def _dequantize(cx, node, q, scale, zero_point=None):
    """(q - zero_point) · scale, each end as the runtime computes it when the scale is a positive constant."""
    b = cx.b
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    q = _as_float(b, q)
    if zero_point is not None:
        q = iv.sub(b, q, _along(cx, node, _as_float(b, zero_point), rank))
    out_type = node.outputs[0].dtype or ir.DataType.FLOAT
    if not isinstance(scale, Interval) and _positive_constant(scale):
        s = _along(cx, node, b.op("Cast", scale, to=ir.DataType.FLOAT), rank)
        result = Interval.from_bounds(b, b.op("Mul", q.lower, s), b.op("Mul", q.upper, s))
    else:
        result = widened(cx, iv.mul(b, q, _along(cx, node, _as_float(b, scale), rank)), ir.DataType.FLOAT)
    if out_type != ir.DataType.FLOAT:
        result = Interval.from_bounds(b, *(b.op("Cast", v, to=out_type) for v in (result.lower, result.upper)))
    return [result]
