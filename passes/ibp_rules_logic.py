"""IBP rules of discontinuous ops: comparisons, boolean logic, selection by a bounded condition, arg-max.

A boolean tensor is bounded like any other: lower True means certainly true, upper False certainly false, so an
undecided element is the interval {0, 1}. Integer results (ArgMax's index) are bounded by the smallest and the
largest value they can take.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.passes.ibp_core import constant_array, rule


def _bounds(b, x, dtype=None):
    """Lower and upper of x; NaN bounds of a float tensor (inf - inf upstream) read as unbounded."""
    x = iv.as_interval(b, x)
    if dtype is None or not dtype.is_floating_point():
        return x.lower, x.upper
    inf = b.op("CastLike", b.const(np.inf), x.lower)
    return (b.op("Where", b.op("IsNaN", x.lower), b.op("Neg", inf), x.lower),
            b.op("Where", b.op("IsNaN", x.upper), inf, x.upper))


def _dtypes(node):
    return [v.dtype if v is not None else None for v in node.inputs]


def _orderable(b, x, dtype):
    """Booleans compare as integers (LessOrEqual has no boolean kernel)."""
    if dtype == ir.DataType.BOOL:
        return b.op("Cast", x, to=ir.DataType.INT32)
    return x


@rule("Less", "LessOrEqual", "Greater", "GreaterOrEqual")
def _order(cx, node, x, y):
    """x < y for sure where x's upper < y's lower; possibly where x's lower < y's upper."""
    b = cx.b
    (xl, xu), (yl, yu) = (_bounds(b, v, t) for v, t in zip((x, y), _dtypes(node)))
    if node.op_type.startswith("Greater"):
        (xl, xu), (yl, yu) = (yl, yu), (xl, xu)
    op = "Less" if node.op_type in ("Less", "Greater") else "LessOrEqual"
    return [Interval.from_bounds(b, b.op(op, xu, yl), b.op(op, xl, yu))]


@rule("Equal")
def _equal(cx, node, x, y):
    """Certainly equal where both are exact and equal; possibly where the two ranges overlap."""
    b = cx.b
    dtype = node.inputs[0].dtype
    (xl, xu), (yl, yu) = (tuple(_orderable(b, v, dtype) for v in _bounds(b, z, t))
                          for z, t in zip((x, y), _dtypes(node)))
    exact = b.op("And", b.op("Equal", xl, xu), b.op("Equal", yl, yu))
    certain = b.op("And", exact, b.op("Equal", xl, yl))
    possible = b.op("And", b.op("LessOrEqual", xl, yu), b.op("LessOrEqual", yl, xu))
    return [Interval.from_bounds(b, certain, possible)]


@rule("Not")
def _not(cx, node, x):
    lo, hi = _bounds(cx.b, x)
    return [Interval.from_bounds(cx.b, cx.b.op("Not", hi), cx.b.op("Not", lo))]


@rule("And", "Or")
def _and_or(cx, node, x, y):
    """Non-decreasing in both arguments."""
    (xl, xu), (yl, yu) = _bounds(cx.b, x), _bounds(cx.b, y)
    return [Interval.from_bounds(cx.b, cx.b.op(node.op_type, xl, yl), cx.b.op(node.op_type, xu, yu))]


@rule("Xor")
def _xor(cx, node, x, y):
    b = cx.b
    (xl, xu), (yl, yu) = _bounds(b, x), _bounds(b, y)
    exact = b.op("And", b.op("Equal", xl, xu), b.op("Equal", yl, yu))
    value = b.op("Xor", xl, yl)
    return [Interval.from_bounds(b, b.op("And", exact, value), b.op("Or", b.op("Not", exact), value))]


@rule("IsNaN")
def _is_nan(cx, node, x):
    """Interval bounds say nothing about NaN (an undefined op upstream can make one): both answers are possible."""
    b = cx.b
    nan = b.op("IsNaN", _bounds(b, x)[0])
    return [Interval.from_bounds(b, b.op("And", nan, b.op("Not", nan)), b.op("Or", nan, b.op("Not", nan)))]


@rule("IsInf")
def _is_inf(cx, node, x):
    """Possibly infinite where a bound is (within rounding of) infinite; never certain (an infinite bound may
    stand for a finite value that rounded differently)."""
    b = cx.b
    lo, hi = _bounds(b, x, node.inputs[0].dtype)
    dtype = (node.inputs[0].dtype or ir.DataType.FLOAT).numpy()
    near = b.const(np.finfo(dtype).max * (1 - 2.0 ** -10), dtype=dtype)
    possible = []
    if attr(node, "detect_positive", 1):
        possible.append(b.op("GreaterOrEqual", hi, near))
    if attr(node, "detect_negative", 1):
        possible.append(b.op("LessOrEqual", lo, b.op("Neg", near)))
    never = b.op("Less", lo, b.op("Neg", b.op("CastLike", b.const(np.inf), lo)))
    high = never if not possible else possible[0] if len(possible) == 1 else b.op("Or", *possible)
    return [Interval.from_bounds(b, never, high)]


@rule("Where")
def _where(cx, node, cond, x, y):
    b = cx.b
    px, py = iv.as_interval(b, x), iv.as_interval(b, y)
    if not isinstance(cond, Interval):
        return [Interval.from_bounds(b, b.op("Where", cond, px.lower, py.lower), b.op("Where", cond, px.upper, py.upper))]
    # Certainly x where the condition is certainly true, certainly y where certainly false, else the hull.
    low, high = cond.lower, cond.upper
    hull_low, hull_high = b.op("Min", px.lower, py.lower), b.op("Max", px.upper, py.upper)
    lower = b.op("Where", low, px.lower, b.op("Where", high, hull_low, py.lower))
    upper = b.op("Where", low, px.upper, b.op("Where", high, hull_high, py.upper))
    return [Interval.from_bounds(b, lower, upper)]


def _candidates(b, node, x: Interval, largest: bool):
    """Elements that can be the maximum (minimum) along the axis: upper >= the largest lower (mirrored)."""
    axis = attr(node, "axis", 0)
    if largest:
        return b.op("GreaterOrEqual", x.upper, b.reduce("ReduceMax", x.lower, [axis])), axis
    return b.op("LessOrEqual", x.lower, b.reduce("ReduceMin", x.upper, [axis])), axis


@rule("ArgMax", "ArgMin")
def _arg_extreme(cx, node, x):
    """The index lies between the first and the last element that can win."""
    b = cx.b
    x = Interval.from_bounds(b, *_bounds(b, x, node.inputs[0].dtype))
    mask, axis = _candidates(b, node, x, node.op_type == "ArgMax")
    keepdims = attr(node, "keepdims", 1)
    numeric = b.op("Cast", mask, to=ir.DataType.FLOAT)
    first = b.op("ArgMax", numeric, axis=axis, keepdims=keepdims, select_last_index=0)
    last = b.op("ArgMax", numeric, axis=axis, keepdims=keepdims, select_last_index=1)
    return [Interval.from_bounds(b, first, last)]


@rule("Hardmax")
def _hardmax(cx, node, x):
    """1 where an element is the only one that can win, 0 where it cannot win, {0, 1} elsewhere."""
    b = cx.b
    x = Interval.from_bounds(b, *_bounds(b, x, node.inputs[0].dtype))
    axis = attr(node, "axis", -1)
    possible = b.op("GreaterOrEqual", x.upper, b.reduce("ReduceMax", x.lower, [axis]))
    count = b.reduce("ReduceSum", b.op("Cast", possible, to=ir.DataType.FLOAT), [axis])
    alone = b.op("And", possible, b.op("Equal", count, b.const(1.0)))
    dtype = node.outputs[0].dtype or ir.DataType.FLOAT
    return [Interval.from_bounds(b, b.op("Cast", alone, to=dtype), b.op("Cast", possible, to=dtype))]


def _depth_exact(node) -> bool:
    """A depth that does not depend on the perturbed input and an indices tensor of known rank."""
    return node.inputs[1] is not None and node.inputs[0].shape is not None


@rule("OneHot", accepts=_depth_exact)
def _one_hot(cx, node, indices, depth, values):
    """Position k is `on` where the index is certainly k, `off` where it cannot be k, either in between."""
    b = cx.b
    if isinstance(depth, Interval):
        from graphcert.passes.ibp_rules_elementwise import refuse
        refuse(node, "its depth depends on the perturbed input (the output shape would vary)")
    lo, hi = (b.op("Cast", v, to=ir.DataType.DOUBLE) for v in _bounds(b, indices, node.inputs[0].dtype))
    if node.inputs[0].dtype is not None and node.inputs[0].dtype.is_floating_point():
        # Float indices are cast to int64 (truncated toward zero), which is non-decreasing.
        lo, hi = (b.op("Mul", b.op("Sign", v), b.op("Floor", b.op("Abs", v))) for v in (lo, hi))
    rank = len(node.inputs[0].shape)
    axis = attr(node, "axis", -1) % (rank + 1)
    lo, hi = (b.op("Unsqueeze", v, b.ints([axis])) for v in (lo, hi))
    given = constant_array(depth)
    if given is not None:
        n = int(np.asarray(given).reshape(-1)[0])
        k = b.const(np.arange(n, dtype=np.float64).reshape([n] + [1] * (rank - axis)), dtype=np.float64)
        n_value = b.const(float(n), dtype=np.float64)
    else:  # a depth fed at run time: the positions 0 .. depth - 1 built there (ONNX truncates a float depth)
        n_value = b.op("Floor", b.op("Cast", b.op("Reshape", depth, b.ints([])), to=ir.DataType.DOUBLE))
        positions = b.op("Range", b.const(0.0, dtype=np.float64), n_value, b.const(1.0, dtype=np.float64))
        k = b.op("Reshape", positions, b.ints([-1] + [1] * (rank - axis)))
    # Negative indices count from the end: index i stands for i + depth where i < 0.
    def may_be(position):
        return b.op("And", b.op("LessOrEqual", lo, position), b.op("LessOrEqual", position, hi))
    shifted = b.op("Sub", k, n_value)
    possible = b.op("Or", may_be(k), may_be(shifted))
    exact = b.op("Equal", lo, hi)
    certain = b.op("And", exact, b.op("Or", b.op("Equal", lo, k), b.op("Equal", lo, shifted)))
    off_on = iv.as_interval(b, values)
    zero, one = b.ints([0]), b.ints([1])
    off_l, on_l = (b.op("Gather", off_on.lower, i, axis=0) for i in (zero, one))
    off_u, on_u = (b.op("Gather", off_on.upper, i, axis=0) for i in (zero, one))
    off_l, on_l, off_u, on_u = (b.op("Squeeze", v, b.ints([0])) for v in (off_l, on_l, off_u, on_u))
    lower = b.op("Where", certain, on_l, b.op("Where", possible, b.op("Min", on_l, off_l), off_l))
    upper = b.op("Where", certain, on_u, b.op("Where", possible, b.op("Max", on_u, off_u), off_u))
    return [Interval.from_bounds(b, lower, upper)]

