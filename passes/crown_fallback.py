"""CROWN through ops it has no linear rule for: the node's output, bounded by IBP, becomes a fresh bounded leaf.

A node without an adjoint or a relaxation (or outside their preconditions) but with an IBP rule is bounded by
IBP on its input intervals (which the CROWN pass tightens with backward passes first, as for a relaxed op).
Its output is then treated like a perturbed input whose box is that interval: coefficients reaching it are
concretised there (lower bound A+·l + A-·u, written A·c - |A|·r as for an input box) and go no further. That
is a relaxation by constant lines at the IBP bounds, sound whatever the op computes, and it covers every output
of a multi-output node.

In a batched graph the coefficients of a tensor carry one sample per index of its leading axis, so a leaf
whose output a CROWN rule reads must keep the batch axis first (`batch_first`). What a leaf's outputs depend
on does not matter (an op mixing samples, an integer index): its bounds hold elementwise, and nothing
propagates through it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphcert.builder import Builder
from graphcert.interval import Interval
from graphcert.model import static_shape

# Bounds beyond this magnitude count as infinite: their leaf line would overflow once the rounding slack is
# added; a coefficient meeting one makes the bound infinite (sound, as for a relaxation's infinite range end).
LIMIT = 2.0 ** 125
# Relative slack for rounding the bounds into centre and radius and for the product A·c (a few float32 ulps).
SLACK = 2.0 ** -20
# Absolute slack for halving subnormal bounds (the smallest normal float32).
TINY = float(np.finfo(np.float32).tiny)

VERDICT = "via IBP fallback"


@dataclass
class Leaf:
    """An output's IBP interval as a box for concretisation: centre, radius with rounding slack, and 0/1 flags
    (float) where the lower or upper end is infinite, NaN or beyond LIMIT."""
    center: ir.Value | None   # None: 0 (a symmetric leaf)
    radius: ir.Value
    lower_unbounded: ir.Value
    upper_unbounded: ir.Value


def leaf(b: Builder, box: Interval) -> Leaf:
    lower, upper = (as_float32(b, v) for v in (box.lower, box.upper))
    limit = b.const(LIMIT)
    # NaN compares false, so it is flagged too.
    lower_off = b.op("Not", b.op("GreaterOrEqual", lower, b.op("Neg", limit)))
    upper_off = b.op("Not", b.op("LessOrEqual", upper, limit))
    zero = b.const(0.0)
    low, high = b.op("Where", lower_off, zero, lower), b.op("Where", upper_off, zero, upper)
    # An infinite end is replaced by the other (finite) end: the coefficient that would meet it is flagged.
    low, high = b.op("Where", lower_off, high, low), b.op("Where", upper_off, low, high)
    half = b.const(0.5)
    low_half, high_half = b.op("Mul", low, half), b.op("Mul", high, half)
    center = b.op("Add", low_half, high_half)
    spread = b.op("Add", b.op("Abs", low), b.op("Abs", high))
    slack = b.op("Add", b.op("Mul", spread, b.const(SLACK)), b.const(TINY))
    radius = b.op("Add", b.op("Sub", high_half, low_half), slack)
    as_flag = lambda v: b.op("Cast", v, to=ir.DataType.FLOAT)  # noqa: E731
    return Leaf(center, radius, as_flag(lower_off), as_flag(upper_off))


def symmetric_leaf(b: Builder, box: Interval, batched: bool) -> Leaf:
    """A leaf known to be [-e, e] (a rounding leaf, `graphcert.rounding_leaves`): no centre to contract, the
    radius stored negated (-e, so that the large coefficient tensor is not negated), and one flag per sample
    (as `lower_unbounded`: [batch], or a scalar unbatched) where any e is infinite, NaN or beyond LIMIT.

    A rounding leaf sits after every op that rounds, so its flag contraction would cost a pass over each
    coefficient tensor (about a third of a CROWN graph's time on ACAS Xu). The per-sample flag makes the whole
    bound -inf instead, also where the coefficient of the unbounded e is 0: sound, and only looser where the
    bound graph's intervals overflow, where no bound is of use."""
    error = as_float32(b, box.upper)
    finite = b.op("LessOrEqual", error, b.const(LIMIT))   # NaN compares false
    radius = b.op("Neg", b.op("Where", finite, error, b.const(0.0)))
    off = b.op("Cast", b.op("Not", finite), to=ir.DataType.FLOAT)
    per_sample = b.op("Reshape", off, b.ints([0, -1] if batched else [-1]))
    flag = b.reduce("ReduceMax", per_sample, [1] if batched else [0], keepdims=0)
    return Leaf(None, radius, flag, None)


def as_float32(b: Builder, value: ir.Value) -> ir.Value:
    """Bounds of a boolean, integer or other float tensor as float32 (a lossy cast is covered by SLACK)."""
    if value.dtype == ir.DataType.FLOAT:
        return value
    return b.op("Cast", value, to=ir.DataType.FLOAT)


def leaf_backward(cx, found: Leaf, coef: ir.Value) -> list:
    """(value, coefficient) pairs whose contractions sum to the lower bound of coef·output over the leaf."""
    b = cx.b
    if found.center is None:   # [-e, e]: |A|·(-e), and -inf for a sample with an unbounded e (`symmetric_leaf`)
        return [(found.radius, b.op("Abs", coef)), (found.lower_unbounded, None)]
    return [(found.center, coef), (found.radius, b.op("Neg", b.op("Abs", coef))),
            *cx.infinite_ends(found.lower_unbounded, found.upper_unbounded, coef)]


def batch_first(model: ir.Model, sources: list[ir.Value]):
    """value -> whether its leading axis is the batch: shape inference gave it a perturbed input's batch
    dimension, or `graphcert.batch_axis` traces the batch there (it follows ops that rename the dimension).

    The trace also restarts after a Concat along another axis with a batch-first input, whatever its other
    inputs are (ONNX makes them agree off the concatenated axis): the tracer stops there when another input
    is computed at run time (a class token expanded to the batch by a Shape), but the output's leading axis
    is that input's batch all the same."""
    from graphcert.batch_axis import Tracer
    from graphcert.interface import clone
    dims = {static_shape(v)[0] for v in sources} - {None}
    names = {s.name for s in sources}
    opset = model.opset_imports.get("", 17)

    def by_shape(value: ir.Value) -> bool:
        shape = static_shape(value)
        return bool(shape) and shape[0] in dims

    restarts: set[str] = set()
    while True:
        copy = clone(model)   # the tracer may rewrite what it follows; its verdict is all that is kept
        values = {v.name: v for node in copy.graph for v in node.outputs if v is not None}
        starts = {v: 0 for v in copy.graph.inputs if v.name in names}
        starts.update({values[name]: 0 for name in restarts if name in values})
        traced = {v.name for v, axis in Tracer(copy, starts, opset).run().items() if axis == 0}
        more = {node.outputs[0].name for node in model.graph if _concat_keeps_batch(node, traced, by_shape)}
        if more <= restarts | traced:
            break
        restarts |= more

    def first(value: ir.Value) -> bool:
        return by_shape(value) or value.name in traced or value.name in restarts
    return first


def _concat_keeps_batch(node: ir.Node, traced: set[str], by_shape) -> bool:
    """A Concat off axis 0 with an input whose leading axis is the batch."""
    if node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or node.outputs[0].shape is None:
        return False
    axis = node.attributes.get("axis")
    rank = len(node.outputs[0].shape)
    if axis is None or rank == 0 or axis.value % rank == 0:
        return False
    return any(v is not None and (v.name in traced or by_shape(v)) for v in node.inputs)


def boundable(value: ir.Value, batched: bool) -> bool:
    """Whether a backward pass can bound a tensor (`crown.Context.bound`): float32 with a static sample shape,
    or a [batch, n] tensor with a run-time n."""
    if value.dtype != ir.DataType.FLOAT or value.shape is None:
        return False
    dims = static_shape(value)
    if batched and not dims:
        return False
    sample = dims[1:] if batched else dims
    return all(isinstance(d, int) for d in sample) or batched and len(dims) == 2
