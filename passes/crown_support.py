"""Which nodes the CROWN pass bounds by its own rules: the CROWN `RuleTable`, each rule's precondition beside it.

Linear adjoints need one perturbed operand in MatMul (Mul and Div of two perturbed tensors are relaxed as
products), static sample shapes where windows, copies or concatenation and reduction sizes are computed, and
ops that move elements must keep the batch axis first and whole, since coefficient tensors carry it right
after the rows. A node outside the table that IBP bounds goes through IBP (`fallbacks`,
`passes.crown_fallback`); the pass, its error and `graphcert inspect` read the same verdicts.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.interpret import NO_RULE, RuleTable, attr, raise_refused
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


class Support:
    """What a CROWN precondition reads beyond the node: which values depend on the perturbed inputs, and
    whether tensors carry a batch axis first."""

    def __init__(self, perturbed: set, batched: bool):
        self.perturbed = perturbed
        self.batched = batched

    def first_only(self, node: ir.Node) -> bool:
        """Only the first input depends on the perturbed inputs (weights, pads, axes and clamps are fixed)."""
        return not any(v is not None and v in self.perturbed for v in node.inputs[1:])


# The one CROWN table: op type -> its rule (an adjoint, a relaxation or a decomposition into primitives), with
# each rule's precondition beside it. Ops without an entry, or outside it, go through IBP
# (`passes.crown_fallback`).
RULES = RuleTable("crown", dict(ADJOINTS))
RULES.update({op: relaxations.relax for op in relaxations.ELEMENTWISE})
RULES["MaxPool"] = relaxations.window_max


def _decomposed(b, node: ir.Node, env: dict):
    """Softmax and LayerNormalization: rewritten into primitives with rules (`passes.crown_products`)."""
    from graphcert.passes.crown_products import decompose
    return decompose(b, node, env)


RULES.update({op: _decomposed for op in ("Softmax", "LayerNormalization")})


@RULES.precondition("Concat")
def _concat(node: ir.Node, cx: Support) -> bool:
    """Static sizes along the concatenated axis, which is not the batch axis."""
    axis = attr(node, "axis") % len(node.outputs[0].shape)
    return (axis > 0 or not cx.batched) and all(isinstance(static_shape(v)[axis], int) for v in node.inputs)


@RULES.precondition("MatMul")
def _matmul(node: ir.Node, cx: Support) -> bool:
    """One perturbed operand (a product of two bounded matrices has no adjoint), known shapes."""
    return sum(v is not None and v in cx.perturbed for v in node.inputs) == 1 \
        and all(v.shape is not None for v in node.inputs)


@RULES.precondition("Mul", "Div")
def _product(node: ir.Node, cx: Support) -> bool:
    """Known operand shapes (a product or quotient of two bounded tensors is relaxed with planes)."""
    return all(v.shape is not None for v in node.inputs)


@RULES.precondition("Softmax", "LayerNormalization")
def _normalisation(node: ir.Node, cx: Support) -> bool:
    """Perturbed input only, static sizes along the normalised axes, not the batch axis, no Mean/InvStdDev use."""
    return cx.first_only(node) and _normalises_within_samples(node, cx.batched)


@RULES.precondition("Gemm")
def _gemm(node: ir.Node, cx: Support) -> bool:
    """Perturbed A only, not transposed."""
    return cx.first_only(node) and not attr(node, "transA", 0)


@RULES.precondition("Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool", "MaxPool")
def _window(node: ir.Node, cx: Support) -> bool:
    """Perturbed input only, static sample shapes, no ceil mode or output_shape, windows inside the input."""
    op = node.op_type
    window_ok = not attr(node, "ceil_mode", 0) and attr(node, "output_shape", None) is None \
        and not (op == "ConvTranspose" and attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"))
    return cx.first_only(node) and window_ok and static_trailing(node.inputs[0]) \
        and static_trailing(node.outputs[0]) and all(v is None or v.shape is not None for v in node.inputs) \
        and _windows_fit(node) and (op != "MaxPool" or len(node.outputs) == 1 or not node.outputs[1].uses())


@RULES.precondition("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
def _moving(node: ir.Node, cx: Support) -> bool:
    """Perturbed input only, not a scalar, the batch axis kept first and whole."""
    return cx.first_only(node) and _keeps_batch(node, cx.batched) and static_shape(node.inputs[0]) != []


@RULES.precondition("ReduceMean", "ReduceSum")
def _reduce(node: ir.Node, cx: Support) -> bool:
    """Perturbed input only, constant axes of static size, not the batch axis."""
    axes = reduced_axes(node)
    dims = static_shape(node.inputs[0])
    return cx.first_only(node) and axes is not None and all(isinstance(dims[a], int) for a in axes) \
        and (0 not in axes or not cx.batched)


@RULES.precondition("Pad")
def _pad(node: ir.Node, cx: Support) -> bool:
    """Perturbed input only; constant pads, none negative, none on the batch axis, copies within the axis."""
    return cx.first_only(node) and _pad_accepted(node, cx.batched)


@RULES.precondition("BatchNormalization")
def _first_only(node: ir.Node, cx: Support) -> bool:
    """Perturbed input only (constant parameters), inference mode (training mode: through IBP)."""
    return cx.first_only(node) and not attr(node, "training_mode", 0)


@RULES.precondition(*relaxations.ELEMENTWISE)
def _relaxed(node: ir.Node, cx: Support) -> bool:
    """Perturbed input only; LeakyRelu slope <= 1, Elu alpha in [0, 1], Pow by the constant 2."""
    return cx.first_only(node) and relaxations.accepts(node)


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
    """Whether CROWN bounds the node, judged without the graph around it (for `graphcert inspect`): by its own
    rule or, for any op IBP bounds, through IBP (`passes.crown_fallback`)."""
    return ibp.RULES.verdict(node) is None

def fallbacks(model: ir.Model, nodes: list[ir.Node], method: str, sources: list[ir.Value],
              tainted: set) -> dict[ir.Node, str]:
    """{node: why} for the nodes CROWN bounds through IBP (`passes.crown_fallback`): those its own rules do not
    take but IBP does. Raises an UnsupportedOpError naming every node neither bounds.

    In a batched graph, coefficients carry the batch on the leading axis of every tensor they reach. The
    rules keep it there; a leaf whose output a rule reads must too (`crown_fallback.batch_first`), else that
    rule's node becomes a leaf as well. Leaves that only feed other leaves, or the graph's outputs (bounded by
    their interval), may move it anywhere."""
    batched = batched_inputs(sources)
    support = Support(tainted, batched)
    found, refused = {}, {}
    for node in nodes:
        through_ibp = ibp.RULES.verdict(node)   # CROWN runs IBP alongside: every node needs IBP's rule
        if through_ibp is not None:
            refused[node] = through_ibp
            continue
        reason = RULES.verdict(node, support)
        if reason is not None:
            found[node] = "no CROWN rule for this op type" if reason == NO_RULE else reason
    if batched and found:
        # A rule reading a leaf output whose batch axis is not first (a Reshape to a run-time shape that moves
        # it) goes through IBP too, and so on downstream until the batch is first again: bounds as IBP's there.
        first = crown_fallback.batch_first(model, sources)
        ruled = set(nodes) - set(found) - set(refused)
        check = list(found)
        while check:
            node = check.pop()
            for out in node.outputs:
                if out is None or first(out):
                    continue
                for reader in dict.fromkeys(use[0] for use in out.uses()):
                    if reader in ruled:
                        ruled.discard(reader)
                        found[reader] = f"its input {out.name} (an IBP fallback's output) has no batch axis first"
                        check.append(reader)
    raise_refused(method, refused)
    return {node: f"{crown_fallback.VERDICT} ({reason})" for node, reason in found.items()}
