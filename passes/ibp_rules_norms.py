"""IBP rule of BatchNormalization in training mode: normalised by the batch's own statistics.

Y = (X - mean) / sqrt(var + eps) · scale + B with mean and var (the population variance) over every axis but
the channel, so each output depends on the whole batch. It is layer normalisation over those axes followed by
a per-channel affine map, bounded factor by factor like graphcert's LayerNormalization; the running statistics
are momentum · input + (1 - momentum) · batch statistic, with the batch mean's and variance's intervals.
onnxruntime takes the variance as E[x^2] - E[x]^2 in float32, whose rounding (about n ulps of E[x^2]) is large
next to a small variance: the variance is widened by that much, and Y by its effect (see the InstanceNorm rule).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert.interpret import attr
from graphcert.interval import Interval


def batch_statistics_supported(node: ir.Node) -> bool:
    """Static sizes along every axis but the channel (training mode: the batch's own statistics)."""
    shape = node.inputs[0].shape
    return shape is not None and len(shape) >= 2 and all(isinstance(shape[a], int) for a in range(len(shape))
                                                           if a != 1)


def _scaled(b, x: Interval, factor: float) -> Interval:
    k = b.const(factor)
    return Interval.from_bounds(b, b.op("Mul", x.lower, k), b.op("Mul", x.upper, k))


def _squeezed(b, x: Interval, axes) -> Interval:
    """[1, C, 1, ...] statistics as the [C] vectors the running statistics are."""
    return Interval.from_bounds(b, b.op("Squeeze", x.lower, b.ints(axes)), b.op("Squeeze", x.upper, b.ints(axes)))


def batch_statistics_norm(cx, node, x, scale, bias, mean, var) -> list:
    """Y, running_mean and running_var of a BatchNormalization in training mode (as many as the node has)."""
    from graphcert.passes.ibp import _affine
    b = cx.b
    shape = node.inputs[0].shape
    rank = len(shape)
    axes = [0] + list(range(2, rank))
    n = int(np.prod([shape[a] for a in axes]))
    eps, momentum = attr(node, "epsilon", 1e-5), attr(node, "momentum", 0.9)
    x = iv.as_interval(b, x)
    # d_i = x_i - mean(x) is linear in x: coefficient (1 - 1/n) on x_i and -1/n on the others.
    centered = Interval.from_center(
        b, b.op("Sub", x.center, b.reduce("ReduceMean", x.center, axes)),
        b.op("Add", b.op("Mul", x.radius, b.const(max(1.0 - 2.0 / n, 0.0))),
             b.op("Mul", b.reduce("ReduceSum", x.radius, axes), b.const(1.0 / n))))
    squares = iv.square(b, centered)
    unit = b.const(4.0 * n * 2.0 ** -24)
    magnitude = iv.absolute(b, x).upper
    second_moment = b.reduce("ReduceMean", b.op("Mul", magnitude, magnitude), axes)
    var_slack = b.op("Mul", unit, second_moment)
    batch_var = Interval.from_bounds(
        b, b.op("Relu", b.op("Sub", b.reduce("ReduceMean", squares.lower, axes), var_slack)),
        b.op("Add", b.reduce("ReduceMean", squares.upper, axes), var_slack))
    inverse = iv.reciprocal(b, iv.monotone(b, batch_var, lambda v: b.op("Sqrt", b.op("Add", v, b.const(eps)))))
    normed = iv.mul(b, centered, inverse)
    # The runtime's mean rounds by about n ulps of mean|x|, which moves every d_i by that much.
    mean_slack = b.op("Mul", unit, b.reduce("ReduceMean", magnitude, axes))
    normed_slack = b.op("Mul", mean_slack, inverse.upper)
    normed = Interval.from_bounds(b, b.op("Sub", normed.lower, normed_slack), b.op("Add", normed.upper, normed_slack))
    per_channel = b.ints([-1] + [1] * (rank - 2))
    scale, bias = ((Interval.from_bounds(b, b.op("Reshape", v.lower, per_channel), b.op("Reshape", v.upper, per_channel))
                    if isinstance(v, Interval) else b.op("Reshape", v, per_channel)) for v in (scale, bias))
    outputs = [_affine(cx, normed, scale, bias)]
    if len(node.outputs) > 1:
        batch_mean = Interval.from_center(b, b.reduce("ReduceMean", x.center, axes),
                                          b.op("Add", b.reduce("ReduceMean", x.radius, axes), mean_slack))
        for given, batch in ((mean, batch_mean), (var, batch_var)):
            running = iv.add(b, _scaled(b, iv.as_interval(b, given), momentum),
                             _scaled(b, _squeezed(b, batch, axes), 1.0 - momentum))
            # Two products and a sum in float32: a few ulps of the larger magnitude.
            wide = b.op("Mul", iv.absolute(b, running).upper, b.const(2.0 ** -21))
            outputs.append(Interval.from_bounds(b, b.op("Sub", running.lower, wide), b.op("Add", running.upper, wide)))
    return outputs[:len(node.outputs)]
