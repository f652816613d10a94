"""Which graphs the CROWN pass takes: per-node conditions beyond the op type, checked before emitting.

Linear adjoints need one perturbed operand in MatMul (Mul and Div of two perturbed tensors are relaxed as
products), static sample shapes where windows, copies or concatenation and reduction sizes are computed, and
ops that move elements must keep the batch axis first and whole, since coefficient tensors carry it right
after the rows.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.interpret import NO_RULE, UNMET, RuleTable, attr, raise_refused
from graphcert.model import static_shape
from graphcert.ops import WindowGeometry
from graphcert.passes import crown_fallback, ibp, relaxations
from graphcert.passes.adjoints import ADJOINTS, pad_axes, pad_mode, reduced_axes

RELAXED = relaxations.ELEMENTWISE | {"MaxPool"}
# Ops the CROWN pass rewrites into primitives first (`passes.crown_products`); Div only by a bounded tensor.
DECOMPOSED = {"Softmax", "LayerNormalization", "Div"}


def batched_inputs(sources) -> bool:
    """Normalised models carry a symbolic leading batch dimension on inputs of rank >= 2."""
    dims = [static_shape(v) for v in sources]
    return all(len(d) >= 2 and not isinstance(d[0], int) for d in dims)


def static_trailing(value: ir.Value) -> bool:
    dims = static_shape(value)
    return len(dims) >= 2 and all(isinstance(d, int) for d in dims[1:])


def _keeps_batch(node: ir.Node, batched: bool) -> bool:
    """Ops that move elements must leave the batch axis first and whole (shape inference may rename it)."""
    if not batched:
        return True
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else 0
    op = node.op_type
    if op == "Flatten":
        return attr(node, "axis", 1) == 1
    if op == "Transpose":
        return bool(rank) and (attr(node, "perm", None) or [rank - 1])[0] == 0
    if op in ("Squeeze", "Unsqueeze"):
        if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
            return False
        out_rank = rank if op == "Squeeze" else rank + node.inputs[1].const_value.numpy().size
        return all(int(a) % out_rank != 0 for a in node.inputs[1].const_value.numpy())
    target = node.inputs[1].const_value
    if target is None or not static_trailing(x):
        return False
    target = target.numpy()
    per_sample = int(np.prod(static_shape(x)[1:]))
    known = [int(d) for d in target[1:] if d != -1]
    inferred = len(target) - 1 - len(known)   # a -1 after the batch takes what the sample has left
    if len(target) < 1 or target[0] not in (0, -1) or any(d <= 0 for d in known) or inferred > 1 \
            or (target[0] == -1 and inferred):
        return False
    return per_sample % int(np.prod(known)) == 0 if inferred else int(np.prod(known)) == per_sample


def _pad_accepted(node: ir.Node, batched: bool) -> bool:
    """Constant pads (and axes), none negative, none on the batch axis; the copying modes need static sizes
    on the padded axes, and reflect pads shorter than the axis (ONNX's condition)."""
    value = node.inputs[2] if len(node.inputs) > 2 else None
    axes_input = node.inputs[3] if len(node.inputs) > 3 else None
    if any(v is not None and v.const_value is None for v in (node.inputs[1], value, axes_input)) \
            or node.inputs[0].shape is None:
        return False
    mode = pad_mode(node)
    axes, begins, ends = pad_axes(node)
    dims = static_shape(node.inputs[0])
    padded = [(a, p, q) for a, p, q in zip(axes, begins, ends) if p or q]
    if min(begins + ends, default=0) < 0 or (batched and any(a == 0 for a, _, _ in padded)):
        return False
    if mode == "constant":
        return True
    sizes_known = all(isinstance(dims[a], int) for a, _, _ in padded)
    return mode in ("edge", "wrap") and sizes_known or mode == "reflect" and sizes_known \
        and all(max(p, q) < dims[a] for a, p, q in padded)


def _normalises_within_samples(node: ir.Node, batched: bool) -> bool:
    """Softmax and LayerNormalization are rewritten into sums along their axes, which need static sizes and
    must leave the batch axis alone; LayerNormalization's mean and deviation outputs must be unused."""
    x = node.inputs[0]
    if x.shape is None or any(out.uses() for out in node.outputs[1:]):
        return False
    dims = static_shape(x)
    axis = attr(node, "axis", -1) % len(dims)
    axes = [axis] if node.op_type == "Softmax" else list(range(axis, len(dims)))
    return all(isinstance(dims[a], int) for a in axes) and not (batched and axis == 0)


def acceptor(perturbed: set, batched: bool):
    def accepts(node: ir.Node) -> bool:
        if not ibp.accepts(node):
            return False
        hit = [v is not None and v in perturbed for v in node.inputs]
        op = node.op_type
        if op in ("Add", "Sub", "Sum", "Neg", "Identity", "Dropout"):
            return True
        if op == "Concat":
            axis = attr(node, "axis") % len(node.outputs[0].shape)
            return (axis > 0 or not batched) and all(isinstance(static_shape(v)[axis], int) for v in node.inputs)
        if op == "MatMul":
            return sum(hit) == 1 and all(v.shape is not None for v in node.inputs)
        if op in ("Mul", "Div"):   # a product or quotient of two bounded tensors is relaxed (crown_products)
            return all(v.shape is not None for v in node.inputs)
        if any(hit[1:]):
            return False
        if op in ("Softmax", "LayerNormalization"):
            return _normalises_within_samples(node, batched)
        if op == "Gemm":
            return not attr(node, "transA", 0)
        if op in ("Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool", "MaxPool"):
            window_ok = not attr(node, "ceil_mode", 0) and attr(node, "output_shape", None) is None \
                and not (op == "ConvTranspose" and attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"))
            return window_ok and static_trailing(node.inputs[0]) and static_trailing(node.outputs[0]) \
                and all(v is None or v.shape is not None for v in node.inputs) and _windows_fit(node) \
                and (op != "MaxPool" or len(node.outputs) == 1 or not node.outputs[1].uses())
        if op in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"):
            return _keeps_batch(node, batched) and static_shape(node.inputs[0]) != []
        if op in ("ReduceMean", "ReduceSum"):
            axes = reduced_axes(node)
            dims = static_shape(node.inputs[0])
            return axes is not None and all(isinstance(dims[a], int) for a in axes) and (0 not in axes or not batched)
        if op == "Pad":
            return _pad_accepted(node, batched)
        if op in relaxations.ELEMENTWISE:
            return relaxations.accepts(node)
        return op in ADJOINTS
    return accepts


def _windows_fit(node: ir.Node) -> bool:
    """Every window inside the padded input: where one is not, runtimes disagree on the output size."""
    if node.op_type in ("GlobalAveragePool", "ConvTranspose"):
        return True
    kernel = attr(node, "kernel_shape", None)
    if kernel is None:
        kernel = static_shape(node.inputs[1])[2:]
    spatial = static_shape(node.inputs[0])[2:]
    if not all(isinstance(d, int) for d in [*kernel, *spatial]):
        return False
    return WindowGeometry.of(node, spatial, kernel).fits


def supports(node: ir.Node) -> bool:
    """Whether the op has a rule, judged without the graph around it (for `graphcert inspect`)."""
    if node.op_type in relaxations.ELEMENTWISE:
        return relaxations.accepts(node) and ibp.accepts(node)
    return (node.op_type in ADJOINTS or node.op_type in RELAXED | DECOMPOSED) and ibp.accepts(node)



def fallbacks(model: ir.Model, nodes: list[ir.Node], method: str, sources: list[ir.Value],
              tainted: set) -> dict[ir.Node, str]:
    """{node: why} for the nodes CROWN bounds through IBP (`passes.crown_fallback`): those its own rules do not
    take but IBP does. Raises an UnsupportedOpError naming every node neither bounds.

    In a batched graph, coefficients carry the batch on the leading axis of every tensor they reach. The
    rules keep it there; a leaf whose output a rule reads must too (`crown_fallback.batch_first`). Leaves
    that only feed other leaves, or the graph's outputs (bounded by their interval), may move it anywhere."""
    batched = batched_inputs(sources)
    accepts = acceptor(tainted, batched)
    own = RuleTable(method, {op: True for op in set(ADJOINTS) | RELAXED | DECOMPOSED})
    found, refused = {}, {}
    for node in nodes:
        reason = own.verdict(node)
        if reason is None and accepts(node):
            continue
        through_ibp = ibp.RULES.verdict(node)
        if through_ibp is not None:
            refused[node] = through_ibp
            continue
        found[node] = "no CROWN rule for this op type" if reason == NO_RULE else (reason or UNMET)
    if batched and found:
        first = crown_fallback.batch_first(model, sources)
        ruled = set(nodes) - set(found) - set(refused)
        for node, reason in list(found.items()):
            read = [out for out in node.outputs if out is not None and any(use[0] in ruled for use in out.uses())]
            if not all(first(out) for out in read):
                del found[node]
                refused[node] = f"{reason}; its IBP fallback feeds a CROWN rule a tensor whose batch axis is not first"
    raise_refused(method, refused)
    return {node: f"{crown_fallback.VERDICT} ({reason})" for node, reason in found.items()}
