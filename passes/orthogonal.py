"""Orthonormal training graphs for 1-Lipschitz dense networks (deel-lip's SpectralDense; Anil, Lucas and
Grosse, ICML 2019).

Every Gemm/MatMul weight W is replaced in the graph by W̄ = Björck(W / s) with s = ||W||_F / SCALE_CAP: the
Frobenius norm bounds the largest singular value, so every singular value of W / s is at most SCALE_CAP <
sqrt(3), where Björck converges. (A power-iteration estimate of σ_max is from below, so it would need this
bound as a floor; on weights of stable rank above SCALE_CAP², as dense layers have, the floor wins anyway.)
Then BJORCK_STEPS steps of

    W <- (1 + β) W - β W WᵀW        (β = 1/2, the cubic term through the smaller Gram matrix),

which drive every singular value towards 1 and never above it (s -> 1.5 s - 0.5 s³ maps [0, sqrt(3)] into
[0, 1]). Training moves the raw W (same initializer name); the deployed model carries W̄
(`deployable_weights`). Dense layers then have norm at most 1 and the other accepted ops (moves, biases,
ReLU, disjoint MaxPool, Neg, and GroupSort's Concat(-MaxPool(-P), MaxPool(P))) are 1-Lipschitz, so the
graph emits

    margins_lower = objective·y - eps·||objective·W̄_L||_2

with W̄_L the last layer. The bound trusts the float arithmetic of the iteration and is for training only;
`api` refuses it for certification: the `lipschitz` pass certifies the written model with sound constants.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.builder import Builder
from graphcert.errors import InputError
from graphcert.interface import FLOAT, clone, perturbed_inputs
from graphcert.interpret import RuleTable, attr, perturbed_nodes
from graphcert.model import static_shape
from graphcert.passes.lipschitz import RULES as LIPSCHITZ_RULES, Geometry, Support, support_context as lipschitz_support
from graphcert.passes.patterns import disjoint_windows, group_sort_input
from graphcert.passes.spec import LipschitzTrainingPass, lipschitz_margin_outputs

BETA = 0.5
BJORCK_STEPS = 15
SCALE_CAP = 1.5
ONE_LIPSCHITZ = {"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Relu", "Neg"}
LAYERS = {"Gemm", "MatMul"}


def orthonormalise(b: Builder, weight: ir.Value, shape: tuple[int, int]) -> ir.Value:
    """W̄ = Björck(W / s) for a 2-D weight value of static `shape` (either layout: Björck commutes with
    transposition)."""
    rows, cols = shape
    # keepdims=1, then a scalar: onnxruntime-training's gradient of a full ReduceSum with keepdims=0 is wrong.
    squares = b.reduce("ReduceSum", b.op("Mul", weight, weight), [0, 1], keepdims=1)
    frobenius = b.op("Sqrt", b.op("Reshape", squares, b.ints([])))
    scale = b.op("Add", b.op("Mul", frobenius, b.const(np.float32(1.0 / SCALE_CAP))), b.const(np.float32(1e-12)))
    w = b.op("Div", weight, scale)
    grow, shrink = b.const(np.float32(1.0 + BETA)), b.const(np.float32(BETA))
    for _ in range(BJORCK_STEPS):
        transposed = b.op("Transpose", w, perm=[1, 0])
        if rows <= cols:
            cubic = b.op("MatMul", b.op("MatMul", w, transposed), w)
        else:
            cubic = b.op("MatMul", w, b.op("MatMul", transposed, w))
        w = b.op("Sub", b.op("Mul", w, grow), b.op("Mul", cubic, shrink))
    w.type, w.shape = FLOAT, ir.Shape([rows, cols])
    return w


# The lipschitz rules this pass reuses, each also held to what a 1-Lipschitz training graph needs.
RULES = RuleTable("orthogonal", {op: LIPSCHITZ_RULES[op] for op in ONE_LIPSCHITZ | LAYERS | {"Add", "Sub", "MaxPool",
                                                                                           "Concat"}})


@RULES.precondition(*RULES)
def _orthogonal_layer(node: ir.Node, cx: Support) -> bool:
    """What lipschitz accepts, as a dense layer (an initializer weight, alpha 1), a bias, a MaxPool of disjoint
    windows, a GroupSort's Concat or a 1-Lipschitz map."""
    op, tainted = node.op_type, cx.tainted
    if LIPSCHITZ_RULES.verdict(node, cx) is not None:
        return False
    if op in LAYERS:
        weight = node.inputs[1]
        return node.inputs[0] in tainted and weight.is_initializer() and len(static_shape(weight)) == 2 \
            and float(attr(node, "alpha", 1.0)) == 1.0
    if op in ("Add", "Sub"):   # a bias, not a residual
        return sum(v in tainted for v in node.inputs) == 1 and (op == "Add" or node.inputs[0] in tainted)
    if op == "MaxPool":
        return disjoint_windows(node)
    if op == "Concat":
        return group_sort_input(node) is not None
    return op in ONE_LIPSCHITZ


def _network(model: ir.Model) -> tuple[ir.Value, list[ir.Node]]:
    """The perturbed input and the nodes reading it, refused unless every one is a dense layer or 1-Lipschitz."""
    sources = perturbed_inputs(model)
    if len(sources) != 1:
        raise InputError(f"orthogonal trains models with one input; this one has {len(sources)}")
    nodes, support = lipschitz_support(model, "orthogonal")
    RULES.check(nodes, support)
    return sources[0], nodes


def _layer_matrix(b: Builder, node: ir.Node, w_bar: ir.Value) -> ir.Value:
    """The layer's matrix [out, in]: Gemm with transB stores it so, MatMul stores its transpose."""
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return w_bar
    return b.op("Transpose", w_bar, perm=[1, 0])


def _last_layer(output: ir.Value, matrices: dict[ir.Node, ir.Value]) -> ir.Value | None:
    """The matrix of the dense layer the output is an affine image of (through biases and Identities)."""
    value = output
    while (node := value.producer()) is not None:
        if node in matrices:
            return matrices[node]
        if node.op_type not in ("Identity", "Add", "Sub"):
            return None
        value = next((v for v in node.inputs if v is not None and v.const_value is None), None)
        if value is None:
            return None
    return None


class OrthogonalPass(LipschitzTrainingPass):
    """Normalised dense network in, a training graph with orthonormalised weights and outputs `margins` and
    `margins_lower` (objective·y at an L2 radius `epsilon`) out."""

    rules = RULES

    def support_context(self, model: ir.Model):
        return lipschitz_support(model, "orthogonal")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = clone(model)
        graph = result.graph
        x, nodes = _network(result)
        b = Builder(graph, prefix="orthogonal")
        orthonormal: dict[ir.Value, ir.Value] = {}
        matrices: dict[ir.Node, ir.Value] = {}
        for node in nodes:
            if node.op_type in LAYERS:
                weight = node.inputs[1]
                if weight not in orthonormal:
                    orthonormal[weight] = orthonormalise(b, weight, tuple(static_shape(weight)))
                node.replace_input_with(1, orthonormal[weight])
                matrices[node] = _layer_matrix(b, node, orthonormal[weight])
        y = graph.outputs[0]
        last = _last_layer(y, matrices)
        lipschitz_margin_outputs(result, b, x, last, None, self.keep_original)
        graph.sort()
        result.metadata_props["graphcert.method"] = "orthogonal"
        return ir.passes.PassResult(result, modified=True)


def orthonormalised_names(model: ir.Model) -> list[str]:
    """Names of the weights the training graph of `model` orthonormalises."""
    _, nodes = _network(model)
    return list(dict.fromkeys(node.inputs[1].name for node in nodes if node.op_type in LAYERS))


def deployable_weights(model: ir.Model, trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained parameters with every orthonormalised weight W replaced by W̄, computed by the same graph
    the training ran (so the deployed network is the one that was trained); frozen weights are included,
    as the deployed model must carry their W̄ too."""
    from graphcert.export import to_proto
    from graphcert.runtime import Session
    arrays = dict(trained)
    for name in orthonormalised_names(model):
        raw = arrays[name] if name in arrays else model.graph.initializers[name].const_value.numpy()
        matrix = np.asarray(raw, dtype=np.float32)
        graph = ir.Graph([ir.Value(name="w", type=FLOAT, shape=ir.Shape(list(matrix.shape)))], [], nodes=[],
                         opset_imports={"": 17}, name="bjorck")
        b = Builder(graph, prefix="bjorck")
        w_bar = b.op("Identity", orthonormalise(b, graph.inputs[0], matrix.shape))
        w_bar.name, w_bar.type, w_bar.shape = "w_bar", FLOAT, ir.Shape(list(matrix.shape))
        graph.outputs.append(w_bar)
        arrays[name] = Session(to_proto(ir.Model(graph, ir_version=10))).run({"w": matrix})["w_bar"]
    return arrays


def supports(node: ir.Node) -> bool:
    """Node-level support, for `inspect` (takes every non-constant input as perturbed)."""
    tainted = {v for v in node.inputs if v is not None and v.const_value is None}
    dims = static_shape(next(iter(tainted))) if tainted else []
    return RULES.verdict(node, Support(Geometry(len(dims) >= 2 and not isinstance(dims[0], int)), tainted)) is None
