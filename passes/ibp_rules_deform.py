"""IBP rule of DeformConv (2-D): a convolution whose kernel taps read the input at offset, bilinearly sampled
positions, optionally scaled by a modulation mask.

Each tap's sample is a bilinear interpolation (non-negative weights summing to one, zero outside the input), so
it lies between the least lower and the greatest upper bound of the input elements its offset box can reach,
and zero where it can reach outside, as GridSample on a bounded grid (passes/ibp_rules_sampling.py). The
samples, times the mask, then go through the (grouped) convolution: centre and radius through a constant
kernel, an interval product with a perturbed one, plus the rounding of the runtime's sums.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.passes.ibp_core import rule, widened

# Samples compare every tap and output position with every input position: beyond this many elements per
# bound, refuse rather than build it.
SAMPLE_WINDOW_LIMIT = 1 << 25


def _static(value: ir.Value, start: int) -> list[int] | None:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in list(shape)[start:]):
        return None
    return [int(d) for d in list(shape)[start:]]


def _deform_supported(node: ir.Node) -> bool:
    """2-D, static sizes of the input (but the batch), the kernel and the offsets, small enough sample windows."""
    x, w, offset = _static(node.inputs[0], 1), _static(node.inputs[1], 0), _static(node.inputs[2], 1)
    if x is None or w is None or offset is None or len(x) != 3 or len(w) != 4 or len(offset) != 3:
        return False
    channels, height, width = x
    groups = attr(node, "offset_group", 1)
    k = w[2] * w[3]
    return channels * k * offset[1] * offset[2] * height * width <= SAMPLE_WINDOW_LIMIT and channels % groups == 0


def _positions(node: ir.Node, size: int, out: int, kernel: int, axis: int) -> np.ndarray:
    """[kernel, out] coordinate of each tap (along `axis`, 0 = height) before its offset."""
    stride = (attr(node, "strides", None) or [1, 1])[axis]
    dilation = (attr(node, "dilations", None) or [1, 1])[axis]
    begin = (attr(node, "pads", None) or [0, 0, 0, 0])[axis]
    return (np.arange(out)[None, :] * stride - begin + np.arange(kernel)[:, None] * dilation).astype(np.float32)


def _index_range(b, low: ir.Value, high: ir.Value, size: int):
    """First and last element index (floats) a bilinear sample at positions in [low, high] reads along an axis
    of `size`, a few ulps wider for the runtime's arithmetic, and whether it can read outside (zero)."""
    slack = lambda p: b.op("Add", b.op("Mul", b.op("Abs", p), b.const(2.0 ** -16)), b.const(1e-4))  # noqa: E731
    first = b.op("Floor", b.op("Sub", low, slack(low)))
    last = b.op("Add", b.op("Floor", b.op("Add", high, slack(high))), b.const(1.0))
    outside = b.op("Or", b.op("Less", first, b.const(0.0)), b.op("Greater", last, b.const(float(size - 1))))
    return first, last, outside


@rule("DeformConv", accepts=_deform_supported)
def _deform_conv(cx, node, x, w, offset, bias=None, mask=None):
    b = cx.b
    channels, height, width = _static(node.inputs[0], 1)
    out_channels, group_channels, kh, kw = _static(node.inputs[1], 0)
    out_h, out_w = _static(node.inputs[2], 2)
    groups, offset_groups = attr(node, "group", 1), attr(node, "offset_group", 1)
    k = kh * kw
    per_offset_group = channels // offset_groups
    # Offsets [N, G·K·2, oH, oW] as [N, G, K, 2, oH, oW] (dy, dx per tap): positions per axis [N, G, K, oH, oW].
    offsets = iv.as_interval(b, offset)
    offsets = Interval.from_bounds(b, *(b.op("Reshape", v, b.ints([0, offset_groups, k, 2, out_h, out_w]))
                                        for v in (offsets.lower, offsets.upper)))
    tap_h = np.repeat(_positions(node, height, out_h, kh, 0), kw, axis=0)[:, :, None]      # [K, oH, 1]
    tap_w = np.tile(_positions(node, width, out_w, kw, 1), (kh, 1))[:, None, :]            # [K, 1, oW]
    ranges = []
    for axis, (taps, size) in enumerate(((tap_h, height), (tap_w, width))):
        pick = b.ints([axis])
        low, high = (b.op("Add", b.op("Squeeze", b.op("Gather", v, pick, axis=3), b.ints([3])), b.const(taps))
                     for v in (offsets.lower, offsets.upper))
        ranges.append(_index_range(b, low, high, size))
    (first_h, last_h, out_h_), (first_w, last_w, out_w_) = ranges

    def window(first, last, size):  # [N, G, 1, K, oH, oW, size]: which elements the tap can read
        index = b.const(np.arange(size, dtype=np.float32))
        first, last = (b.op("Unsqueeze", v, b.ints([2, 6])) for v in (first, last))
        return b.op("And", b.op("GreaterOrEqual", index, first), b.op("LessOrEqual", index, last))

    rows, cols = window(first_h, last_h, height), window(first_w, last_w, width)
    x = iv.as_interval(b, x)
    grouped = b.ints([0, offset_groups, per_offset_group, 1, 1, 1, height, width])
    inf = b.const(np.inf)
    samples = []
    for value, reduce, fill in ((x.lower, "ReduceMin", inf), (x.upper, "ReduceMax", b.op("Neg", inf))):
        value = b.op("Reshape", value, grouped)
        along_w = b.reduce(reduce, b.op("Where", b.op("Unsqueeze", cols, b.ints([6])), value, fill), [7], keepdims=0)
        samples.append(b.reduce(reduce, b.op("Where", rows, along_w, fill), [6], keepdims=0))  # [N, G, cg, K, oH, oW]
    outside = b.op("Unsqueeze", b.op("Or", out_h_, out_w_), b.ints([2]))
    zero = b.const(0.0)
    low = b.op("Where", outside, b.op("Min", samples[0], zero), samples[0])
    high = b.op("Where", outside, b.op("Max", samples[1], zero), samples[1])
    # The runtime's four-term interpolation may pass its largest term by an ulp or two.
    sampled = widened(cx, Interval.from_bounds(b, low, high), ir.DataType.FLOAT)
    if mask is not None:
        m = iv.as_interval(b, mask)
        shape = b.ints([0, offset_groups, 1, k, out_h, out_w])
        sampled = iv.mul(b, sampled, Interval.from_bounds(b, b.op("Reshape", m.lower, shape),
                                                          b.op("Reshape", m.upper, shape)))
    # Grouped convolution of the samples: [N, groups, Cg·K, oH·oW] against [groups, oC/groups, Cg·K].
    terms = group_channels * k
    columns = b.ints([0, groups, terms, out_h * out_w])
    sampled = Interval.from_bounds(b, b.op("Reshape", sampled.lower, columns), b.op("Reshape", sampled.upper, columns))
    kernel_shape = b.ints([groups, out_channels // groups, terms])
    weights = cx.constant(w) if not isinstance(w, Interval) else None
    if weights is not None:
        kernel = b.const(weights.reshape(groups, out_channels // groups, terms))
        magnitude_w = b.const(np.abs(weights).reshape(groups, out_channels // groups, terms))
        result = Interval.from_center(b, b.op("MatMul", kernel, sampled.center),
                                      b.op("MatMul", magnitude_w, sampled.radius))
    else:
        wi = iv.as_interval(b, w)
        wi = Interval.from_bounds(b, *(b.op("Unsqueeze", b.op("Reshape", v, kernel_shape), b.ints([0, 4]))
                                       for v in (wi.lower, wi.upper)))            # [1, groups, oCg, terms, 1]
        products = iv.mul(b, wi, Interval.from_bounds(b, *(b.op("Unsqueeze", v, b.ints([2]))
                                                           for v in (sampled.lower, sampled.upper))))
        result = Interval.from_bounds(b, b.reduce("ReduceSum", products.lower, [3], keepdims=0),
                                      b.reduce("ReduceSum", products.upper, [3], keepdims=0))
        magnitude_w = b.op("Reshape", iv.absolute(b, iv.as_interval(b, w)).upper, kernel_shape)
    # Rounding of the runtime's and this sum of `terms` products: 2 ulps per term of sum |w|·|sample|.
    magnitude = b.op("MatMul", magnitude_w, iv.absolute(b, sampled).upper)
    slack = b.op("Mul", magnitude, b.const(2.0 * (terms + 1) * 2.0 ** -24))
    output = b.ints([0, out_channels, out_h, out_w])
    result = Interval.from_bounds(b, b.op("Reshape", b.op("Sub", result.lower, slack), output),
                                  b.op("Reshape", b.op("Add", result.upper, slack), output))
    if bias is not None:
        bias = iv.as_interval(b, bias)
        per_channel = b.ints([-1, 1, 1])
        result = iv.add(b, result, Interval.from_bounds(b, b.op("Reshape", bias.lower, per_channel),
                                                        b.op("Reshape", bias.upper, per_channel)))
    return [result]
