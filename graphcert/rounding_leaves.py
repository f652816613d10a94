"""The deployed model's float32 rounding inside the relaxation: every op that rounds gets a bounded error leaf.

`graphcert.rounding` bounds |fl(y) - y|, the distance between the model run in float32 and in real arithmetic,
by carrying each op's error forward through |W| (and as a zonotope of rounding symbols, until this); a margin must
then beat that distance. On deep nets the distance is carried through every unstable ReLU at any slope in
[0, 1] and grows far beyond the margins (eran's 9x200 ReLU net: 4-10 where margins are about 2).

Here the float32 model itself is what gets bounded. Each op that rounds computes fl(op(x~)) = op(x~) + r from
the inputs x~ it was given (already rounded), where |r| <= e, the op's own rounding given bounds on |x~|:
graphcert.rounding's rule for the op with no error on its inputs (γ_n·(|W|·M + |b|) for a linear op, a few
ulps of the result for a smooth one). `with_rounding_leaves` rewrites the model so that the op's output is
op(x~) + RoundingError(...), whose IBP rule is [-e, e] from the intervals the bound graph has for the op's
inputs at that point (tightened by CROWN, clamped by branch and bound, per domain). Every bound pass then
bounds the float32 model in real arithmetic: CROWN takes the leaves as independent inputs (IBP fallbacks,
`passes.crown_fallback`), so a margin pays only sum_k |Λ_k|·e_k, its own sensitivity to each rounding, and
relaxations see the float32 values' ranges (the fl-network's ReLU inputs are what gets split).

What is left for the slack is the bound graph's own rounding (`RoundingSlack(model_error=False)`); run in
float64 (graphcert.precision) it all but vanishes. In the model's own computation (a bound graph that keeps
the original outputs) a leaf is 0: the model's real-arithmetic value, as before.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from . import rounding
from .arithmetic import ARITHMETICS, of_model
from .dtypes import META
from .interface import clone, perturbed_inputs
from .interpret import attr, check_supported, perturbed_nodes
from .interval import Interval
from .rounding_walk import Walk

OP_TYPE, DOMAIN = "RoundingError", "graphcert"
# Ops whose computed result is the exact one (selections, moves, maxima): no leaf.
EXACT = set(rounding.EXACT_OPS) - {"Clip"}


def with_rounding_leaves(model: ir.Model) -> ir.Model:
    """A copy of the model in which the output y of every perturbed op that rounds is y + RoundingError(y,
    *op inputs), keeping y's name (outputs, and the unit inputs branch and bound splits, keep theirs).
    UnsupportedOpError names the ops graphcert.rounding has no rule for, as the float32 slack would."""
    result = clone(model)
    graph = result.graph
    nodes = perturbed_nodes(graph, set(perturbed_inputs(result)))
    check_supported(nodes, rounding.RULES, "float32 rounding analysis")
    arithmetic = of_model(model).name
    weight_rounding = 1 if model.metadata_props.get(META) == "float64" else 0
    graph_outputs = list(graph.outputs)
    for node in nodes:
        if node.op_type in EXACT or (node.op_type == "Clip" and not weight_rounding):
            continue
        if len(node.outputs) != 1:
            raise rounding._refused(node, "an op with several outputs that rounds")
        y = node.outputs[0]
        name, uses = y.name, list(y.uses())
        y.name = f"{name}_exact"
        leaf = ir.node(OP_TYPE, [y, *node.inputs], domain=DOMAIN, name=f"{node.name or name}_rounding",
                       attributes={"arithmetic": arithmetic, "weight_rounding": weight_rounding})
        error = leaf.outputs[0]
        error.name, error.shape, error.type = f"{name}_rounding_error", y.shape, y.type
        rounded = ir.node("Add", [y, error], name=f"{node.name or name}_rounded")
        out = rounded.outputs[0]
        out.name, out.shape, out.type = name, y.shape, y.type
        graph.insert_after(node, [leaf, rounded])
        for user, index in uses:
            user.replace_input_with(index, out)
        for k, value in enumerate(graph_outputs):
            if value is y:
                graph.outputs[k] = out
    result.opset_imports[DOMAIN] = 1
    return result


def is_leaf(value: ir.Value | None) -> bool:
    """Whether the value is a rounding leaf's output."""
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == OP_TYPE and producer.domain == DOMAIN


def leaf_interval(cx, node: ir.Node, *args) -> list[Interval]:
    """IBP rule of a leaf: [-e, e], e the rounding of the op that produced its first input, from graphcert.rounding's
    rule for that op with exact inputs (|x~| bounded by the intervals args gives)."""
    b = cx.b
    op = node.inputs[0].producer()
    walk = Walk(b, {})
    walk.arithmetic = ARITHMETICS[attr(node, "arithmetic", "float32")]
    walk.weight_rounding = int(attr(node, "weight_rounding", 0))
    for value, arg in zip(node.inputs, args):
        if isinstance(arg, Interval):
            walk.intervals[value] = arg
            if value is not node.inputs[0]:
                lower = (arg.materialised() if getattr(arg, "shared", False) else arg).lower
                walk.errors[value] = b.op("ConstantOfShape", b.op("Shape", lower),
                                          value=ir.tensor(np.zeros(1, dtype=np.float32)))
    found = rounding.RULES[op.op_type](walk, op)[0]
    error = found[0] if isinstance(found, tuple) else found
    return [Interval.from_bounds(b, b.op("Neg", error), error)]


def zero_in_model(graph: ir.Graph) -> None:
    """Leaves left in a bound graph's copy of the model's own computation are 0 there (onnxruntime has no such
    op): that computation is the model in real arithmetic."""
    for node in list(graph):
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            continue
        shape = ir.node("Shape", [node.inputs[0]])
        zeros = ir.node("ConstantOfShape", [shape.outputs[0]], attributes={"value": ir.tensor(np.zeros(1, np.float32))})
        out = node.outputs[0]
        zeros.outputs[0].shape, zeros.outputs[0].type = out.shape, out.type
        graph.insert_before(node, [shape, zeros])
        for user, index in list(out.uses()):
            user.replace_input_with(index, zeros.outputs[0])
        graph.remove(node, safe=True)
        zeros.outputs[0].name = out.name
