"""CROWN through products of two bounded tensors and the ops made of them (Softmax, LayerNormalization,
division by a bounded tensor).

Those ops are rewritten, inside the CROWN pass only, into primitives with rules: linear ops, unary
relaxations (Exp, Sqrt, Reciprocal, the square) and products x·y relaxed with McCormick planes. The
primitives are stand-in nodes outside the graph: the bound graph never computes them, the pass walks them
like graph nodes (IBP forward, coefficients backward), and the original node passes its output's
coefficients on to the decomposition's result.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.builder import Builder
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.model import static_shape
from graphcert.passes.crown_support import DECOMPOSED, RELAXED
from graphcert.passes.relaxations import FLOAT_MAX, Planes, clamped

# Softmax over at most this many elements is rewritten pairwise (n^2 exponentials, tighter), larger ones
# with a shift (n exponentials and a product).
PAIRWISE_LIMIT = 32


class Primitive:
    """One step of a decomposition: an ONNX op with its inputs and attributes, kept out of the graph."""

    def __init__(self, name: str, op_type: str, inputs: list, shape: list, attributes: list[ir.Attr]):
        self.name = name
        self.domain = ""
        self.op_type = op_type
        self.inputs = list(inputs)
        self.attributes = {a.name: a for a in attributes}
        self.outputs = [ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))]


def decomposes(node: ir.Node, perturbed: set) -> bool:
    """Softmax and LayerNormalization always; Div when its denominator is bounded (x / y = x · (1/y)); MaxPool
    over disjoint pairs of the last axis (GroupSort2 exports as it)."""
    if node.op_type == "MaxPool":
        return _pair_max(node)
    return node.op_type in DECOMPOSED and (node.op_type != "Div" or node.inputs[1] in perturbed)


def _pair_max(node: ir.Node) -> bool:
    """A 1-D MaxPool over disjoint windows of 2 (`lipschitz.disjoint_windows`), on a static even length."""
    from graphcert.passes.lipschitz import disjoint_windows
    shape = static_shape(node.inputs[0])
    return (len(shape) == 3 and isinstance(shape[-1], int) and shape[-1] % 2 == 0 and len(node.outputs) == 1
            and tuple(attr(node, "kernel_shape", ())) == (2,) and tuple(attr(node, "strides", (1,))) == (2,)
            and disjoint_windows(node))


def relaxed_inputs(node, perturbed: set) -> list[ir.Value]:
    """The inputs whose intervals a node's relaxation needs: one for elementwise ops and the square x·x,
    two for a product of two bounded tensors, none for linear ops."""
    if node.op_type in RELAXED:
        return [node.inputs[0]]
    if node.op_type == "Mul" and all(v in perturbed for v in node.inputs):
        x, y = node.inputs
        return [x] if x is y else [x, y]
    return []


class _Steps:
    """Emits the primitives of one decomposition, with their output shapes."""

    def __init__(self, b: Builder, node: ir.Node):
        self.b = b
        self.prefix = f"{b.prefix}_{node.name or node.op_type}"
        self.made: list[Primitive] = []

    def __call__(self, op_type: str, *inputs, shape=None, attributes=()) -> ir.Value:
        if shape is None:
            shape = _broadcast(*(static_shape(v) for v in inputs))
        step = Primitive(f"{self.prefix}/{len(self.made)}_{op_type}", op_type, inputs, shape, list(attributes))
        self.made.append(step)
        return step.outputs[0]

    def sum(self, x: ir.Value, axes: list[int]) -> ir.Value:
        """ReduceSum keeping the reduced axes (axes an input: normalised graphs are at opset >= 13)."""
        shape = [1 if i in axes else d for i, d in enumerate(static_shape(x))]
        return self("ReduceSum", x, self.b.ints(axes), shape=shape, attributes=[ir.AttrInt64("keepdims", 1)])

    def mean(self, x: ir.Value, axes: list[int]) -> ir.Value:
        count = int(np.prod([static_shape(x)[a] for a in axes]))
        return self("Mul", self.sum(x, axes), self.b.const(np.float32(1.0 / count)))


def _broadcast(*shapes: list) -> list:
    rank = max(len(s) for s in shapes)
    padded = [[1] * (rank - len(s)) + list(s) for s in shapes]
    return [next((d for d in dims if d != 1), 1) for dims in zip(*padded)]


def decompose(b: Builder, node: ir.Node, env: dict) -> tuple[list[Primitive], ir.Value]:
    """The primitives computing the node's output (in order) and the value that holds it."""
    steps = _Steps(b, node)
    if node.op_type == "Softmax":
        result = _softmax(steps, node, env[node.inputs[0]])
    elif node.op_type == "LayerNormalization":
        result = _layer_norm(steps, node)
    elif node.op_type == "MaxPool":
        result = _pair_max_steps(steps, node.inputs[0])
    else:
        result = steps("Mul", node.inputs[0], steps("Reciprocal", node.inputs[1]))
    return steps.made, result


def _softmax(steps: _Steps, node: ir.Node, box: Interval) -> ir.Value:
    x = node.inputs[0]
    axis = attr(node, "axis", -1) % len(x.shape)
    if static_shape(x)[axis] <= PAIRWISE_LIMIT:
        return _pairwise_softmax(steps, x, axis)
    return _shifted_softmax(steps, x, axis, box)


def _pairwise_softmax(steps: _Steps, x: ir.Value, axis: int) -> ir.Value:
    """softmax(x)_i = 1 / (1 + sum_{j != i} exp(x_j - x_i)): unary relaxations only, no product of correlated
    factors; the sum is at least 1, so the reciprocal never meets a pole."""
    b = steps.b
    dims = static_shape(x)
    n = dims[axis]
    as_row = steps("Unsqueeze", x, b.ints([axis + 1]), shape=dims[:axis + 1] + [1] + dims[axis + 1:])
    as_column = steps("Unsqueeze", x, b.ints([axis]), shape=dims[:axis] + [1] + dims[axis:])
    others = (1.0 - np.eye(n, dtype=np.float32)).reshape([n, n] + [1] * (len(dims) - axis - 1))
    ratios = steps("Mul", steps("Exp", steps("Sub", as_column, as_row)), b.const(others))
    total = steps("Squeeze", steps.sum(ratios, [axis + 1]), b.ints([axis + 1]), shape=dims)
    return steps("Reciprocal", steps("Add", total, b.const(np.float32(1.0))))


def _shifted_softmax(steps: _Steps, x: ir.Value, axis: int, box: Interval) -> ir.Value:
    """softmax(x) = e · (1 / sum(e)) with e = exp(x - c), c the largest upper bound of x along the axis: any c
    gives the same value, and this one keeps e <= 1 (no overflow); n exponentials instead of n^2."""
    b = steps.b
    shift = b.reduce("ReduceMax", clamped(b, box.upper, FLOAT_MAX), [axis], keepdims=1)
    e = steps("Exp", steps("Sub", x, shift, shape=static_shape(x)))
    return steps("Mul", e, steps("Reciprocal", steps.sum(e, [axis])))


def _pair_max_steps(steps: _Steps, x: ir.Value) -> ir.Value:
    """max(a, b) = b + relu(a - b) for the pairs (a, b) = (x[2i], x[2i+1]): the Relu then sees bounds of a - b
    itself, which linear bounds keep tight when a and b move together (intervals of a and b alone cannot)."""
    dims = static_shape(x)
    n = dims[-1]
    evens, odds = np.zeros((n, n // 2), np.float32), np.zeros((n, n // 2), np.float32)
    evens[0::2, :] = np.eye(n // 2, dtype=np.float32)
    odds[1::2, :] = np.eye(n // 2, dtype=np.float32)
    pooled = dims[:-1] + [n // 2]
    second = steps("MatMul", x, steps.b.const(odds), shape=pooled)
    gap = steps("MatMul", x, steps.b.const(evens - odds), shape=pooled)
    return steps("Add", second, steps("Relu", gap))


def _layer_norm(steps: _Steps, node: ir.Node) -> ir.Value:
    """(x - mean) · (1 / sqrt(mean((x - mean)^2) + eps)) · scale + bias over the trailing axes from `axis`."""
    b = steps.b
    x, scale = node.inputs[:2]
    rank = len(x.shape)
    axes = list(range(attr(node, "axis", -1) % rank, rank))
    centered = steps("Sub", x, steps.mean(x, axes))
    variance = steps.mean(steps("Mul", centered, centered), axes)
    spread = steps("Sqrt", steps("Add", variance, b.const(np.float32(attr(node, "epsilon", 1e-5)))))
    out = steps("Mul", steps("Mul", centered, steps("Reciprocal", spread)), scale)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return steps("Add", out, bias) if bias is not None else out


def product_backward(cx, node, planes: Planes, coef: ir.Value):
    """Positive coefficients take the lower plane, negative ones the upper plane, as for lines; the slopes
    go to both factors, each summed back to its own shape where it was broadcast."""
    b = cx.b
    x, y = node.inputs
    out = node.outputs[0]
    negative = b.op("Less", coef, b.const(0.0))
    along_x = b.op("Mul", coef, b.op("Where", negative, planes.upper_x, planes.lower_x))
    along_y = b.op("Mul", coef, b.op("Where", negative, planes.upper_y, planes.lower_y))
    return [(x, cx.fit(along_x, x, out)), (y, cx.fit(along_y, y, out)),
            (planes.lower_intercept, b.op("Relu", coef)), (planes.upper_intercept, b.op("Min", coef, b.const(0.0))),
            *cx.infinite_ends(planes.lower_unbounded, planes.upper_unbounded, coef)]
