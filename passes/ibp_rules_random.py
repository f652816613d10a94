"""IBP rules of random ops: a draw is bounded by the set every draw lies in, whatever the generator or its seed.

The bound graph cannot reproduce the model's draw (another run draws again), so a random op's output is a
perturbed tensor with its own box rather than a value copied from the model (`graphcert.interpret` marks random
ops perturbed even when they read nothing perturbed): RandomUniform(Like) lies in [low, high], Bernoulli in
{0, 1}, Multinomial's indices in [0, classes - 1], and RandomNormal(Like) is unbounded.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.passes.ibp_core import rule


def _numpy_type(node: ir.Node) -> np.dtype:
    dtype = node.outputs[0].dtype
    if dtype is None or dtype.numpy() is None or dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return np.dtype(np.float32)  # bounds of half-precision models are computed in float32
    return np.dtype(dtype.numpy())


def _filled(cx, node, like, low, high) -> Interval:
    """Constant bounds [low, high] of the node's output shape: that of `like` (a tensor of that shape) or, for
    an op without inputs, its `shape` attribute."""
    b = cx.b
    kind = _numpy_type(node)
    lower, upper = b.const(low, dtype=kind), b.const(high, dtype=kind)
    shape = b.op("Shape", like) if like is not None else b.ints(list(attr(node, "shape")))
    return Interval.from_bounds(b, b.op("Expand", lower, shape), b.op("Expand", upper, shape))


def _outward(low: float, high: float) -> tuple[float, float]:
    """[low, high] widened by a few float32 ulps: low + (high - low)·u rounds and may land an ulp outside."""
    low32, high32 = np.float32(low), np.float32(high)
    for _ in range(4):
        low32, high32 = np.nextafter(low32, np.float32(-np.inf)), np.nextafter(high32, np.float32(np.inf))
    return float(low32), float(high32)


def _like(cx, x):
    return None if x is None else iv.as_interval(cx.b, x).lower


@rule("RandomUniform", "RandomUniformLike")
def _uniform(cx, node, x=None):
    low, high = attr(node, "low", 0.0), attr(node, "high", 1.0)
    return [_filled(cx, node, _like(cx, x), *_outward(min(low, high), max(low, high)))]


@rule("RandomNormal", "RandomNormalLike")
def _normal(cx, node, x=None):
    """A normal draw has no bound: the whole line (a generator's largest draw is its own implementation's)."""
    return [_filled(cx, node, _like(cx, x), -np.inf, np.inf)]


@rule("Bernoulli")
def _bernoulli(cx, node, p):
    """Each element is 0 or 1, whatever the probability (a probability of exactly 0 or 1 is the generator's
    comparison, not a bound this rule relies on)."""
    return [_filled(cx, node, _like(cx, p), 0, 1)]


def _classes_known(node: ir.Node) -> bool:
    """A static number of classes (the input's second axis)."""
    shape = node.inputs[0].shape
    return shape is not None and len(shape) == 2 and isinstance(shape[1], int)


@rule("Multinomial", accepts=_classes_known)
def _multinomial(cx, node, logits):
    """A drawn class index lies in [0, classes - 1]; the output is [batch, sample_size]."""
    b = cx.b
    kind = _numpy_type(node)
    rows = b.op("Slice", b.op("Shape", iv.as_interval(b, logits).lower), b.ints([0]), b.ints([1]))
    shape = b.op("Concat", rows, b.ints([attr(node, "sample_size", 1)]), axis=0)
    classes = node.inputs[0].shape[1]
    return [Interval.from_bounds(b, b.op("Expand", b.const(0, dtype=kind), shape),
                                 b.op("Expand", b.const(classes - 1, dtype=kind), shape))]
