"""Fold a linear objective on the outputs into the graph, so bounds are computed on margins directly.

margins = C · vec(y) + d, where y is the model output flattened per sample. C is either a constant
[m, n] matrix (a VNN-LIB property) or a run-time input `objective` of shape [batch, m, n] (certify: one
row e_label - e_j per other class). When y comes from a Gemm or MatMul+Add, C is merged into that layer,
which is what makes margin bounds much tighter than margins of output bounds.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.builder import Builder
from graphcert.errors import InputError
from graphcert.interface import FLOAT, OBJECTIVE, BoundPass, clone, epsilon_name, l2_radius
from graphcert.interpret import attr

MARGINS = "margins"


class SpecPass(ir.passes.FunctionalPass):
    def __init__(self, matrix: np.ndarray | None = None, offset: np.ndarray | None = None,
                 output: str | None = None, keep_output: bool = True):
        """`matrix` None means a run-time objective input; `output` names the model output (default: first)."""
        super().__init__()
        self.matrix = None if matrix is None else np.asarray(matrix, dtype=np.float32)
        self.offset = None if offset is None else np.asarray(offset, dtype=np.float32)
        self.output = output
        self.keep_output = keep_output

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = clone(model)
        graph = result.graph
        y = next((o for o in graph.outputs if self.output in (None, o.name)), None)
        if y is None:
            raise ValueError(f"model has no output named {self.output!r}")
        b = Builder(graph, prefix="spec")
        if self.matrix is not None and y.shape is not None:
            dims = list(y.shape)[1:] if len(y.shape) >= 2 else list(y.shape)
            if all(isinstance(d, int) for d in dims) and int(np.prod(dims)) != self.matrix.shape[1]:
                raise InputError(f"the objective has {self.matrix.shape[1]} columns but output {y.name} has "
                                 f"{int(np.prod(dims))} values per sample")
        fused = _fused(b, y, self.matrix) if self.matrix is not None else _fused_runtime(b, y)
        margins = fused or _appended(b, y, self.matrix)
        if self.offset is not None:
            margins = b.op("Add", margins, b.const(self.offset))
        margins = b.op("Identity", margins)
        margins.name, margins.type = MARGINS, FLOAT
        batched = y.shape is None or len(y.shape) >= 2
        m = self.matrix.shape[0] if self.matrix is not None else "spec_rows"
        margins.shape = ir.Shape(([y.shape[0]] if batched and y.shape is not None else []) + [m])
        if not self.keep_output:
            graph.outputs.clear()
        graph.outputs.append(margins)
        return ir.passes.PassResult(result, modified=True)


def _objective(b: Builder, matrix) -> ir.Value:
    if matrix is not None:
        return b.const(matrix)
    value = ir.Value(name=OBJECTIVE, type=FLOAT, shape=ir.Shape(["batch", "spec_rows", "spec_cols"]))
    b.graph.inputs.append(value)
    return value


def _affine_producer(y: ir.Value):
    """(h, W [k, n], bias or None, weight_on_left) when y = h·W + bias (or W·h + bias for 1-D models)."""
    node = y.producer()
    if node is None:
        return None
    bias = None
    if node.op_type == "Add":
        left, right = node.inputs
        if right.const_value is not None and left.producer() is not None:
            bias, node = right, left.producer()
        elif left.const_value is not None and right.producer() is not None:
            bias, node = left, right.producer()
        else:
            return None
        if node.op_type != "MatMul" or len(node.outputs[0].uses()) != 1:
            return None
    if node.op_type == "Gemm":
        a, w = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if w.const_value is None or attr(node, "transA", 0) or (c is not None and c.const_value is None):
            return None
        weight = w.const_value.numpy() * attr(node, "alpha", 1.0)
        weight = weight.T if attr(node, "transB", 0) else weight
        gemm_bias = None if c is None else np.broadcast_to(c.const_value.numpy() * attr(node, "beta", 1.0),
                                                           (weight.shape[1],))
        return a, weight, gemm_bias, False
    if node.op_type == "MatMul":
        a, w = node.inputs
        bias_array = None if bias is None else bias.const_value.numpy()
        if w.const_value is not None and w.const_value.numpy().ndim == 2:
            weight = w.const_value.numpy()
            if bias_array is not None:
                bias_array = np.broadcast_to(bias_array, (weight.shape[1],)) if bias_array.size in (1, weight.shape[1]) else None
                if bias_array is None:
                    return None
            return a, weight, bias_array, False
        if a.const_value is not None and a.const_value.numpy().ndim == 2 and w.shape is not None and len(w.shape) == 1:
            weight = a.const_value.numpy().T  # y = A·h  ==  h·Aᵀ for a vector h
            if bias_array is not None and bias_array.size not in (1, weight.shape[1]):
                return None
            if bias_array is not None:
                bias_array = np.broadcast_to(bias_array, (weight.shape[1],))
            return w, weight, bias_array, True
    return None


def _fused(b: Builder, y: ir.Value, matrix) -> ir.Value | None:
    found = _affine_producer(y)
    if found is None or (y.shape is not None and len(y.shape) > 2):
        return None
    h, weight, bias, vector_input = found
    if h.shape is not None and len(h.shape) != (1 if vector_input else 2):
        return None
    weight = weight.astype(np.float32)
    if matrix is not None:
        merged = b.const(weight @ matrix.T)                          # [k, m]
        out = b.op("MatMul", h, merged)
        if bias is not None:
            out = b.op("Add", out, b.const(matrix @ bias.astype(np.float32)))
        return out
    return None


def _fused_runtime(b: Builder, y: ir.Value) -> ir.Value | None:
    """objective·(h·W + c) as (objective·Wᵀ)·h + objective·c, reading W and c from the graph's own
    initializers so the merged layer stays trainable."""
    node = y.producer()
    if node is None or (y.shape is not None and len(y.shape) != 2):
        return None
    bias = None
    if node.op_type == "Add" and node.inputs[0].producer() is not None and node.inputs[0].producer().op_type == "MatMul":
        bias, node = node.inputs[1], node.inputs[0].producer()
    if node.op_type == "Gemm" and not attr(node, "transA", 0):
        h, w = node.inputs[0], node.inputs[1]
        rows_by_output = w if attr(node, "transB", 0) else b.op("Transpose", w, perm=[1, 0])   # [n, k]
        if attr(node, "alpha", 1.0) != 1.0:
            rows_by_output = b.op("Mul", rows_by_output, b.const(attr(node, "alpha", 1.0)))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2]
            if attr(node, "beta", 1.0) != 1.0:
                bias = b.op("Mul", bias, b.const(attr(node, "beta", 1.0)))
    elif node.op_type == "MatMul" and node.inputs[1].shape is not None and len(node.inputs[1].shape) == 2:
        h, rows_by_output = node.inputs[0], b.op("Transpose", node.inputs[1], perm=[1, 0])
    else:
        return None
    if h.shape is None or len(h.shape) != 2 or not isinstance(y.shape[1], int):
        return None
    n = y.shape[1]
    objective = _objective(b, None)                                             # [B, m, n]
    merged = b.op("MatMul", objective, rows_by_output)                          # [B, m, k]
    out = b.op("Squeeze", b.op("MatMul", merged, b.op("Unsqueeze", h, b.ints([-1]))), b.ints([-1]))
    if bias is not None:
        column = b.op("Reshape", b.op("Expand", bias, b.ints([n])), b.ints([n, 1]))
        out = b.op("Add", out, b.op("Squeeze", b.op("MatMul", objective, column), b.ints([-1])))
    return out


def _appended(b: Builder, y: ir.Value, matrix) -> ir.Value:
    rank = len(y.shape) if y.shape is not None else 2
    flat = y if rank <= 2 else b.op("Flatten", y, axis=1)
    if matrix is not None:
        return b.op("MatMul", flat, b.const(matrix.T))
    objective = _objective(b, None)
    return b.op("Squeeze", b.op("MatMul", objective, b.op("Unsqueeze", flat, b.ints([-1]))), b.ints([-1]))


class LipschitzTrainingPass(BoundPass):
    """Base of the passes whose training graphs bound margins by Lipschitz constants (gloro, orthogonal)."""

    def __init__(self, input_set=None, keep_original: bool = True):
        super().__init__()
        self.input_set = input_set
        self.keep_original = keep_original


def lipschitz_margin_outputs(model: ir.Model, b: Builder, x: ir.Value, last: ir.Value | None,
                             constant: ir.Value | None, keep_original: bool) -> None:
    """For training passes that bound margins by a Lipschitz constant: add inputs `epsilon` (an L2 radius per
    sample) and `objective`, and outputs `margins` = objective·y and `margins_lower` = margins −
    eps·K·‖objective·W_L‖₂, with W_L the last layer's matrix [out, in] (`last`; None: the identity) and K the
    constant of everything before it (`constant`, a scalar value; None: 1)."""
    graph = model.graph
    y = graph.outputs[0]
    eps = ir.Value(name=epsilon_name(model, x), type=FLOAT,
                   shape=ir.Shape([f"{x.name}_eps_d{i}" for i in range(len(x.shape))]))
    objective = ir.Value(name=OBJECTIVE, type=FLOAT, shape=ir.Shape(["batch", "spec_rows", "spec_cols"]))
    graph.inputs.extend([eps, objective])
    radius = l2_radius(b, eps, batched=True, keepdims=1)                                             # [batch, 1]
    margins = b.op("Squeeze", b.op("MatMul", objective, b.op("Unsqueeze", y, b.ints([-1]))), b.ints([-1]))
    # Rows as one [batch·m, n] matrix: onnxruntime-training's MatMul gradient fails on 3-D times 2-D.
    rows = objective if last is None else b.op("MatMul", b.op("Flatten", objective, axis=2), last)  # [batch·m, in]
    norms = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", rows, rows), [-1], keepdims=0))
    spread = b.op("Mul", b.op("Reshape", norms, b.op("Shape", margins)), radius)
    if constant is not None:
        spread = b.op("Mul", spread, constant)
    originals = list(graph.outputs)
    if not keep_original:
        graph.outputs.clear()
    for name, value in ((MARGINS, margins), (f"{MARGINS}_lower", b.op("Sub", margins, spread))):
        named = b.op("Identity", value)
        named.name, named.type, named.shape = name, FLOAT, ir.Shape([originals[0].shape[0], "spec_rows"])
        graph.outputs.append(named)
