"""GloRo training graphs: Lipschitz-margin bounds whose Lipschitz constants are computed in the graph, so that
training can lower them (Leino, Wang and Fredrikson, ICML 2021).

For a dense network f(x) = W_L·h(x) + b_L and margin rows r (certify's e_label - e_j), the margin r·f moves
by at most K(h)·||r·W_L||_2 per unit of L2 distance, with K(h) the product of the layers' largest singular
values (ReLU-like activations and moving ops are 1-Lipschitz). This pass emits

    margins_lower = objective·y - eps·K(h)·||objective·W_L||_2

with every singular value estimated by power iteration on the weight itself (a fixed start, POWER_STEPS
steps), differentiable in the weights. Power iteration approaches the largest singular value from below, so
these graphs are for training only (`api` refuses them otherwise): certify a trained model with the
`lipschitz` pass, whose constants are sound upper bounds.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.builder import Builder
from graphcert.errors import InputError
from graphcert.interface import FLOAT, OBJECTIVE, InputSet, clone, epsilon_name, perturbed_inputs
from graphcert.interpret import attr, check_supported, perturbed_nodes, registrar
from graphcert.model import static_shape
from graphcert.passes.spec import MARGINS

POWER_STEPS = 20
RULES: dict = {}
rule = registrar(RULES)


class _Walk:
    """What the rules share: the builder, each tensor's Lipschitz constant (a scalar graph value), and for
    tensors that are an affine map of another, that tensor and the map's matrix [out, in]."""

    def __init__(self, b: Builder):
        self.b = b
        self.constants: dict[ir.Value, ir.Value] = {}
        self.affine: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}

    def times(self, k: ir.Value, factor: ir.Value) -> ir.Value:
        return self.b.op("Mul", k, factor)


def _norm(b: Builder, v: ir.Value) -> ir.Value:
    return b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", v, v), [0, 1], keepdims=0))


def largest_singular_value(b: Builder, matrix: ir.Value, columns: int) -> ir.Value:
    """Power iteration on matrix [out, in] from a fixed start: a scalar estimate, from below, of its norm."""
    start = np.cos(np.arange(columns, dtype=np.float64) * 0.7 + 0.3)
    v = b.const((start / np.linalg.norm(start)).reshape(-1, 1).astype(np.float32))
    transposed = b.op("Transpose", matrix, perm=[1, 0])
    tiny = b.const(1e-12)
    for _ in range(POWER_STEPS):
        u = b.op("MatMul", matrix, v)
        u = b.op("Div", u, b.op("Add", _norm(b, u), tiny))
        v = b.op("MatMul", transposed, u)
        v = b.op("Div", v, b.op("Add", _norm(b, v), tiny))
    return _norm(b, b.op("MatMul", matrix, v))


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


def _accepts(tainted: set):
    def accepts(node: ir.Node) -> bool:
        op = node.op_type
        if op == "Gemm":
            weight = node.inputs[1]
            return weight not in tainted and not attr(node, "transA", 0) and len(static_shape(weight)) == 2
        if op == "MatMul":
            return node.inputs[0] in tainted and node.inputs[1] not in tainted and \
                len(static_shape(node.inputs[1])) == 2
        if op in ("Add", "Sub"):
            return sum(v in tainted for v in node.inputs) == 1 and (op == "Add" or node.inputs[0] in tainted)
        if op in ("Mul", "Div"):
            c = node.inputs[1]
            return node.inputs[0] in tainted and c.const_value is not None and \
                (op == "Mul" or np.all(c.const_value.numpy() != 0))
        if op == "LeakyRelu":
            return abs(float(attr(node, "alpha", 0.01))) <= 1.0
        if op == "Reshape":  # keeps the batch axis: [0, -1]-like shapes only
            shape = node.inputs[1].const_value
            return shape is not None and int(shape.numpy().reshape(-1)[0]) in (0, -1)
        return True
    return accepts


class GloroPass(ir.passes.FunctionalPass):
    """Normalised dense network in, a training graph with `margins` and `margins_lower` (objective·y at an L2
    radius `epsilon`) out; see the module docstring for why it is for training only."""

    def __init__(self, input_set: InputSet | None = None, keep_original: bool = True):
        super().__init__()
        self.input_set = input_set or InputSet()
        self.keep_original = keep_original

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = clone(model)
        graph = result.graph
        x = perturbed_inputs(result)[0]
        nodes = perturbed_nodes(graph, {x})
        tainted = {x} | {out for node in nodes for out in node.outputs}
        check_supported(nodes, RULES, "gloro", _accepts(tainted))
        b = Builder(graph, prefix="gloro")
        walk = _Walk(b)
        walk.constants[x] = b.const(np.float32(1.0))
        for node in nodes:
            walk.constants[node.outputs[0]] = RULES[node.op_type](walk, node)
        y = graph.outputs[0]
        if y not in walk.affine:
            raise InputError("gloro needs a network whose output is a linear layer (Gemm or MatMul + bias)")
        hidden, last = walk.affine[y]
        rank = len(x.shape)
        eps = ir.Value(name=epsilon_name(result, x), type=FLOAT,
                       shape=ir.Shape([f"{x.name}_eps_d{i}" for i in range(rank)]))
        objective = ir.Value(name=OBJECTIVE, type=FLOAT, shape=ir.Shape(["batch", "spec_rows", "spec_cols"]))
        graph.inputs.extend([eps, objective])
        radius = b.reduce("ReduceMax", b.op("Reshape", eps, b.ints([0, -1])), [1], keepdims=1)      # [batch, 1]
        margins = b.op("Squeeze", b.op("MatMul", objective, b.op("Unsqueeze", y, b.ints([-1]))), b.ints([-1]))
        rows = b.op("MatMul", objective, last)                                                   # [batch, m, in]
        row_norms = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", rows, rows), [-1], keepdims=0))
        spread = b.op("Mul", b.op("Mul", row_norms, walk.constants[hidden]), radius)
        originals = list(graph.outputs)
        if not self.keep_original:
            graph.outputs.clear()
        for name, value in ((MARGINS, margins), (f"{MARGINS}_lower", b.op("Sub", margins, spread))):
            named = b.op("Identity", value)
            named.name, named.type, named.shape = name, FLOAT, ir.Shape([originals[0].shape[0], "spec_rows"])
            graph.outputs.append(named)
        result.metadata_props["graphcert.method"] = "gloro"
        return ir.passes.PassResult(result, modified=True)


def supports(node: ir.Node) -> bool:
    return node.op_type in RULES
