"""GloRo training graphs: Lipschitz-margin bounds whose Lipschitz constants are computed in the graph, so that
training can lower them (Leino, Wang and Fredrikson, ICML 2021).

For a network f(x) = W_L·h(x) + b_L and margin rows r (certify's e_label - e_j), the margin r·f moves by at
most K(h)·||r·W_L||_2 per unit of L2 distance, with K(h) the product of the layers' operator norms (ReLU-like
activations and moving ops are 1-Lipschitz). This pass emits

    margins_lower = objective·y - eps·K(h)·||objective·W_L||_2

with every operator norm estimated by Chebyshev-accelerated power iteration from a fixed start, differentiable
in the weights: on the weight matrix for dense layers, and for convolutions on the convolution itself at its
real input size (Conv, then its adjoint ConvTranspose), since the norm of the reshaped kernel is not the norm of
the convolution. Power iteration approaches the largest singular value from below, so
these graphs are for training only (`api` refuses them otherwise): certify a trained model with the
`lipschitz` pass, whose constants are sound upper bounds.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.builder import Builder
from graphcert.errors import InputError
from graphcert.interface import clone, perturbed_inputs
from graphcert.interpret import RuleTable, attr, perturbed_nodes
from graphcert.model import static_shape
from graphcert.ops import WindowGeometry
from graphcert.passes.spec import LipschitzTrainingPass, lipschitz_margin_outputs

# 2 power steps, then 5 Chebyshev blocks of degree 6 (32 applications of AᵀA in all).
WARMUP, BLOCKS, DEGREE = 2, 5, 6
# op type -> rule, each with its precondition (graphcert.interpret.RuleTable; the context is the perturbed tensors)
RULES = RuleTable("gloro")
rule, precondition = RULES.rule, RULES.precondition


class _Walk:
    """What the rules share: the builder, each tensor's Lipschitz constant (a scalar graph value), and for
    tensors that are an affine map of another, that tensor and the map's matrix [out, in]."""

    def __init__(self, b: Builder):
        self.b = b
        self.constants: dict[ir.Value, ir.Value] = {}
        self.affine: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}

    def times(self, k: ir.Value, factor: ir.Value) -> ir.Value:
        return self.b.op("Mul", k, factor)


def _norm(b: Builder, v: ir.Value, rank: int = 2) -> ir.Value:
    # keepdims=1, then a scalar: onnxruntime-training's gradient of a full ReduceSum with keepdims=0 is wrong.
    squares = b.reduce("ReduceSum", b.op("Mul", v, v), range(rank), keepdims=1)
    return b.op("Sqrt", b.op("Reshape", squares, b.ints([])))


def operator_norm(b: Builder, forward, adjoint, start: np.ndarray) -> ir.Value:
    """A scalar estimate, from below, of the norm of the linear map `forward` (with `adjoint` its transpose),
    from the fixed `start`: WARMUP power steps on AᵀA, then Chebyshev-filtered steps.

    Singular values often cluster near the top (a convolution's neighbouring frequencies respond alike; trained
    dense layers too), where plain power iteration stalls. Each block applies T_m(2·AᵀA/ρ - 1), ρ the current
    Rayleigh quotient: among degree-m polynomials bounded by 1 on [0, ρ] it grows fastest above ρ."""
    rank = start.ndim
    tiny = b.const(1e-12)

    def unit(v):
        return b.op("Div", v, b.op("Add", _norm(b, v, rank), tiny))

    v = b.const((start / np.linalg.norm(start)).astype(np.float32))
    for _ in range(WARMUP):
        v = unit(adjoint(forward(v)))
    for _ in range(BLOCKS):
        image = forward(v)
        rayleigh = b.op("Add", b.reduce("ReduceSum", b.op("Mul", image, image), range(rank), keepdims=0), tiny)
        previous, current = v, b.op("Sub", b.op("Mul", adjoint(image), b.op("Div", b.const(2.0), rayleigh)), v)
        stretch = b.op("Div", b.const(4.0), rayleigh)
        for _ in range(DEGREE - 1):
            # T_{j+1} = 2y·T_j - T_{j-1} with y = 2·AᵀA/ρ - 1; the recurrence is linear, so dividing both
            # terms by one size keeps the direction and keeps float32 in range.
            following = b.op("Sub", b.op("Sub", b.op("Mul", adjoint(forward(current)), stretch),
                                         b.op("Add", current, current)), previous)
            size = b.op("Add", _norm(b, following, rank), tiny)
            previous, current = b.op("Div", current, size), b.op("Div", following, size)
        v = unit(current)
    return _norm(b, forward(v), rank)


def _start(shape) -> np.ndarray:
    """Pseudo-random, so no singular direction of the operator is missing from it."""
    return np.random.default_rng(0).standard_normal(shape)


def largest_singular_value(b: Builder, matrix: ir.Value, columns: int) -> ir.Value:
    """Estimate, from below, of the norm of matrix [out, in]."""
    transposed = b.op("Transpose", matrix, perm=[1, 0])
    return operator_norm(b, lambda v: b.op("MatMul", matrix, v), lambda u: b.op("MatMul", transposed, u),
                         _start((columns, 1)))


def conv_operator_norm(b: Builder, weight: ir.Value, geometry: WindowGeometry, group: int) -> ir.Value:
    """Estimate, from below, of the operator norm of x -> Conv(x, weight) on inputs [1, C, *geometry.spatial]:
    the adjoint is the ConvTranspose with the same window and an output_padding restoring what the stride
    skipped."""
    channels = static_shape(weight)[1] * group
    window = dict(**geometry.attributes(), group=group)
    restored = geometry.output_padding(geometry.out)
    return operator_norm(b, lambda v: b.op("Conv", v, weight, **window),
                         lambda u: b.op("ConvTranspose", u, weight, output_padding=restored, **window),
                         _start((1, channels, *geometry.spatial)))


@rule("Conv")
def _conv(walk: _Walk, node: ir.Node):
    weight = node.inputs[1]
    geometry = WindowGeometry.of(node, static_shape(node.inputs[0])[2:], static_shape(weight)[2:])
    return walk.times(walk.constants[node.inputs[0]],
                      conv_operator_norm(walk.b, weight, geometry, int(attr(node, "group", 1))))


@rule("Gemm")
def _gemm(walk: _Walk, node: ir.Node):
    b, weight = walk.b, node.inputs[1]
    matrix = weight if attr(node, "transB", 0) else b.op("Transpose", weight, perm=[1, 0])
    alpha = float(attr(node, "alpha", 1.0))
    if alpha != 1.0:
        matrix = b.op("Mul", matrix, b.const(np.float32(alpha)))
    columns = static_shape(weight)[0 if not attr(node, "transB", 0) else 1]
    walk.affine[node.outputs[0]] = (node.inputs[0], matrix)
    return walk.times(walk.constants[node.inputs[0]], largest_singular_value(b, matrix, columns))


@rule("MatMul")
def _matmul(walk: _Walk, node: ir.Node):
    b, weight = walk.b, node.inputs[1]
    matrix = b.op("Transpose", weight, perm=[1, 0])
    walk.affine[node.outputs[0]] = (node.inputs[0], matrix)
    return walk.times(walk.constants[node.inputs[0]], largest_singular_value(b, matrix, static_shape(weight)[0]))


@rule("Add", "Sub")
def _shift(walk: _Walk, node: ir.Node):
    x = next(v for v in node.inputs if v in walk.constants)
    if x in walk.affine:  # a bias: still affine in the same tensor
        walk.affine[node.outputs[0]] = walk.affine[x]
    return walk.constants[x]


@rule("Mul", "Div")
def _scale(walk: _Walk, node: ir.Node):
    x, c = node.inputs
    values = np.abs(c.const_value.numpy().astype(np.float64))
    factor = values.max() if node.op_type == "Mul" else 1.0 / values.min()
    return walk.times(walk.constants[x], walk.b.const(np.float32(factor * (1 + 1e-6))))


@rule("Relu", "LeakyRelu", "Identity", "Dropout", "Flatten", "Reshape")
def _one_lipschitz(walk: _Walk, node: ir.Node):
    return walk.constants[node.inputs[0]]


@precondition("Gemm")
def _gemm_fixed(node: ir.Node, tainted: set) -> bool:
    """A constant 2-D weight and transA = 0."""
    weight = node.inputs[1]
    return weight not in tainted and not attr(node, "transA", 0) and len(static_shape(weight)) == 2


@precondition("Conv")
def _conv_fixed(node: ir.Node, tainted: set) -> bool:
    """A fixed kernel and bias on a perturbed input of known size."""
    x, weight = node.inputs[:2]
    shapes = (static_shape(x)[1:], static_shape(weight))
    return x in tainted and weight not in tainted and not any(v in tainted for v in node.inputs[2:]) \
        and all(isinstance(d, int) for dims in shapes for d in dims) and len(shapes[1]) >= 3


@precondition("MatMul")
def _matmul_fixed(node: ir.Node, tainted: set) -> bool:
    """A perturbed left operand times a constant matrix."""
    return node.inputs[0] in tainted and node.inputs[1] not in tainted and len(static_shape(node.inputs[1])) == 2


@precondition("Add", "Sub")
def _bias(node: ir.Node, tainted: set) -> bool:
    """One perturbed operand (a bias, not a residual), the first for Sub."""
    return sum(v in tainted for v in node.inputs) == 1 and (node.op_type == "Add" or node.inputs[0] in tainted)


@precondition("Mul", "Div")
def _scaling(node: ir.Node, tainted: set) -> bool:
    """A perturbed tensor times (or divided by a nonzero) constant."""
    c = node.inputs[1]
    return node.inputs[0] in tainted and c.const_value is not None and \
        (node.op_type == "Mul" or np.all(c.const_value.numpy() != 0))


@precondition("LeakyRelu")
def _slope_at_most_one(node: ir.Node, tainted: set) -> bool:
    """|alpha| <= 1."""
    return abs(float(attr(node, "alpha", 0.01))) <= 1.0


@precondition("Reshape")
def _keeps_batch(node: ir.Node, tainted: set) -> bool:
    """A constant shape keeping the batch axis ([0, ...] or [-1, ...])."""
    shape = node.inputs[1].const_value
    return shape is not None and int(shape.numpy().reshape(-1)[0]) in (0, -1)


class GloroPass(LipschitzTrainingPass):
    """Normalised dense or convolutional network in, a training graph with `margins` and `margins_lower`
    (objective·y at an L2 radius `epsilon`) out; see the module docstring for why it is for training only."""

    rules = RULES

    def support_context(self, model: ir.Model) -> tuple[list[ir.Node], set]:
        x = perturbed_inputs(model)[0]
        nodes = perturbed_nodes(model.graph, {x})
        return nodes, {x} | {out for node in nodes for out in node.outputs}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = clone(model)
        graph = result.graph
        x = perturbed_inputs(result)[0]
        nodes, _ = self.support_context(result)   # checked by `requires`
        b = Builder(graph, prefix="gloro")
        walk = _Walk(b)
        walk.constants[x] = b.const(np.float32(1.0))
        for node in nodes:
            walk.constants[node.outputs[0]] = RULES[node.op_type](walk, node)
        y = graph.outputs[0]
        if y not in walk.affine:
            raise InputError("gloro needs a network whose output is a linear layer (Gemm or MatMul + bias)")
        hidden, last = walk.affine[y]
        lipschitz_margin_outputs(result, b, x, last, walk.constants[hidden], self.keep_original)
        result.metadata_props["graphcert.method"] = "gloro"
        return ir.passes.PassResult(result, modified=True)


def supports(node: ir.Node) -> bool:
    """Node-level support, for `inspect` (takes every non-constant input as perturbed)."""
    return RULES.verdict(node, {v for v in node.inputs if v is not None and v.const_value is None}) is None
