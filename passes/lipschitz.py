"""L2 Lipschitz-margin certification (GloRo-style) as a rewrite: one sound Lipschitz rule per op type.

A walk over the perturbed nodes gives every tensor t an upper bound K[t] on the L2 Lipschitz constant of
x -> t (per sample). When the output is affine in a tensor h (y = h·W + c), the margin row r·y changes by
at most K[h]·||r·Wᵀ||_2·||dx||_2 (the bias cancels), which is much tighter than K[y]·||r||_2. The constants
are computed once, in float64, rounded up, and folded into the bound graph:

    margins_lower = objective·y - eps·K[h]·||objective·Wᵀ||_2 - slack

with `epsilon` the L2 radius (the largest entry per sample is taken). Without an objective the outputs get
`<out>_lower/_upper = y ∓ eps·K_i` per element. The whole L2 ball is used, never clipped to a data domain:
a superset of the clipped ball, so still sound.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphcert import __version__
from graphcert.builder import Builder
from graphcert.errors import InputError
from graphcert.interface import FLOAT, OBJECTIVE, InputSet, clone, epsilon_name, perturbed_inputs
from graphcert.interpret import RuleTable, attr, perturbed_nodes
from graphcert.model import static_shape
from graphcert.operator_norms import (EXACT_SIDE, RELATIVE_SLACK, ConvGeometry, average_pool_norm,  # noqa: F401
                                      circular_conv_norm, conv_matrix, outward, spectral_norm)
from graphcert import ops
from graphcert.ops import WindowGeometry
from graphcert.passes.patterns import disjoint_windows, group_sort_input  # noqa: F401  (re-exported)
from graphcert.passes.spec import MARGINS, _affine_producer

# op type -> rule, each with its precondition (graphcert.interpret.RuleTable; preconditions below the rules)
RULES = RuleTable("lipschitz")
rule, precondition = RULES.rule, RULES.precondition


class Geometry:
    """What rules may read besides the node: whether axis 0 is the batch, and per-sample sizes."""

    def __init__(self, batched: bool):
        self.batched = batched

    def sample_dims(self, value: ir.Value) -> list | None:
        dims = static_shape(value)
        dims = dims[1:] if self.batched else dims
        return dims if all(isinstance(d, int) for d in dims) else None

    def sample_size(self, value: ir.Value) -> int | None:
        dims = self.sample_dims(value)
        return None if dims is None else int(np.prod(dims, dtype=np.int64))

    def replication(self, source: ir.Value, out: ir.Value) -> float:
        """sqrt(how often broadcasting copies each element of `source` into `out`)."""
        return float(np.sqrt(self.sample_size(out) / self.sample_size(source)))

    def keeps_batch_axis(self, axes) -> bool:
        return not self.batched or all(int(a) != 0 for a in axes)


# ---- rules: (geometry, node, K of each input or None for constants) -> K of each output ----------------

def _constant(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


@rule("Identity", "Dropout", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "DepthToSpace",
      "SpaceToDepth", "Relu", "Tanh", "Neg", "Abs", "Softplus", "Softsign", "Clip", "MaxPool", "GlobalMaxPool",
      "Softmax", "Slice")
def _at_most_one(geo, node, k, *rest):
    """Permutations, element selections and maps whose slope is at most 1 (softmax: 1 in L2 too)."""
    if node.op_type == "MaxPool":
        # |max(a) - max(b)| <= ||a - b||_2 per window; an input in m windows counts m times.
        return [k * float(np.sqrt(_pool_geometry(node, node.inputs[0]).max_cover()))]
    return [k] * len(node.outputs)


def _slope_family(spec: ops.Elementwise) -> None:
    """Element-wise ops stated in graphcert.ops with a bounded slope: K grows by that slope (unless this module
    has a rule of its own), accepted where that slope is bounded (`_slope_bounded`)."""
    if spec.op_type not in RULES:
        RULES.rule(spec.op_type, accepts=_slope_bounded)(lambda geo, node, k: [k * spec.lipschitz(node)])


@rule("Sigmoid")
def _sigmoid(geo, node, k):
    return [k * 0.25]


@rule("LeakyRelu")
def _leaky_relu(geo, node, k):
    return [k * max(1.0, abs(attr(node, "alpha", 0.01)))]


@rule("Elu")
def _elu(geo, node, k):
    return [k * max(1.0, abs(attr(node, "alpha", 1.0)))]


@rule("Selu")
def _selu(geo, node, k):
    gamma, alpha = attr(node, "gamma", 1.05070102214813232421875), attr(node, "alpha", 1.67326319217681884765625)
    return [k * outward(abs(gamma) * max(1.0, abs(alpha)))]


@rule("HardSigmoid")
def _hard_sigmoid(geo, node, k):
    return [k * abs(attr(node, "alpha", 0.2))]


@rule("Gemm")
def _gemm(geo, node, k, w, bias=None):
    weight = _constant(node.inputs[1]) * attr(node, "alpha", 1.0)
    return [k * spectral_norm(weight)]


@rule("MatMul")
def _matmul(geo, node, a, b):
    weight = _constant(node.inputs[1] if a is not None else node.inputs[0])
    k = a if a is not None else b
    return [k * spectral_norm(weight.reshape(-1, 1) if weight.ndim == 1 else weight)]


@rule("Conv")
def _conv(geo, node, k, w, bias=None):
    weight = _constant(node.inputs[1])
    geometry = ConvGeometry(node, static_shape(node.inputs[0])[2:], list(weight.shape[2:]))
    group = attr(node, "group", 1)
    n_in = weight.shape[1] * group * int(np.prod(geometry.spatial))
    n_out = weight.shape[0] * int(np.prod(geometry.out))
    if min(n_in, n_out) <= EXACT_SIDE:
        return [k * spectral_norm(conv_matrix(weight, geometry, group))]
    return [k * circular_conv_norm(weight, geometry, group)]


@rule("BatchNormalization")
def _batch_norm(geo, node, k, *params):
    scale, _bias, _mean, var = (_constant(v).astype(np.float64) for v in node.inputs[1:5])
    factor = np.abs(scale) / np.sqrt(var + attr(node, "epsilon", 1e-5))
    return [k * outward(factor.max())]


@rule("AveragePool")
def _average_pool(geo, node, k):
    geometry = _pool_geometry(node, node.inputs[0])
    return [k * average_pool_norm(geometry, attr(node, "count_include_pad", 0), attr(node, "ceil_mode", 0))]


@rule("GlobalAveragePool")
def _global_average_pool(geo, node, k):
    return [k / float(np.sqrt(np.prod(geo.sample_dims(node.inputs[0])[1:]))) * (1 + RELATIVE_SLACK)]


@rule("ReduceMean", "ReduceSum")
def _reduce_linear(geo, node, k, *axes):
    count = _reduced_count(node)
    scale = 1.0 / np.sqrt(count) if node.op_type == "ReduceMean" else np.sqrt(count)
    return [k * outward(scale)]


@rule("ReduceMax", "ReduceMin")
def _reduce_max(geo, node, k, *axes):
    return [k]


@rule("Add", "Sub")
def _add(geo, node, a, b):
    out = node.outputs[0]
    total = 0.0
    for value, k in zip(node.inputs, (a, b)):
        if k is not None:
            total += k * geo.replication(value, out)
    return [total]


@rule("Mul", "Div")
def _mul(geo, node, a, b):
    factor = _constant(node.inputs[1] if a is not None else node.inputs[0]).astype(np.float64)
    factor = 1.0 / np.abs(factor) if node.op_type == "Div" else np.abs(factor)
    source = node.inputs[0] if a is not None else node.inputs[1]
    return [(a if a is not None else b) * outward(factor.max()) * geo.replication(source, node.outputs[0])]


@rule("Expand", "Tile")
def _replicate(geo, node, k, *rest):
    return [k * geo.replication(node.inputs[0], node.outputs[0])]


@rule("Split")
def _split(geo, node, k, *rest):
    return [k] * len(node.outputs)


@rule("Concat")
def _concat(geo, node, *ks):
    if group_sort_input(node) is not None:
        return [max(ks)]   # both halves carry the constant of the sorted tensor
    return [float(np.sqrt(sum(k * k for k in ks if k is not None)))]


@rule("Gather")
def _gather(geo, node, k, indices):
    picked = _constant(node.inputs[1]).reshape(-1).astype(np.int64)
    size = static_shape(node.inputs[0])[attr(node, "axis", 0)]
    repeats = np.bincount(np.where(picked < 0, picked + size, picked), minlength=size).max()
    return [k * float(np.sqrt(repeats))]


@rule("Pad")
def _pad(geo, node, k, *rest):
    dims = static_shape(node.inputs[0])
    pads = _constant(node.inputs[1]).astype(np.int64)
    mode = attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    copies = 1
    for axis, size in enumerate(dims):
        begin, end = int(pads[axis]), int(pads[axis + len(dims)])
        if begin == end == 0:
            continue
        sources = _pad_sources(np.arange(-begin, size + end), size, mode)
        sources = sources[(sources >= 0) & (sources < size)]
        copies *= int(np.bincount(sources, minlength=size).max()) if sources.size else 0
    return [k * float(np.sqrt(copies))]


def _pad_sources(positions: np.ndarray, size: int, mode: str) -> np.ndarray:
    """The input index each padded position copies (-1 for the constant)."""
    if mode == "edge":
        return np.clip(positions, 0, size - 1)
    if mode == "wrap":
        return positions % size
    if mode == "reflect":
        period = 2 * (size - 1)
        folded = np.abs(positions) % period if period else np.zeros_like(positions)
        return np.where(folded < size, folded, period - folded)
    return np.where((positions >= 0) & (positions < size), positions, -1)


def _pool_geometry(node: ir.Node, x: ir.Value) -> WindowGeometry:
    return ConvGeometry(node, static_shape(x)[2:], list(attr(node, "kernel_shape")))


def _reduced_count(node: ir.Node) -> int:
    dims = static_shape(node.inputs[0])
    axes = _reduce_axes(node)
    axes = range(len(dims)) if not axes else [int(a) % len(dims) for a in axes]
    return int(np.prod([dims[a] for a in axes]))


def _reduce_axes(node: ir.Node):
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return _constant(node.inputs[1]).reshape(-1).tolist()
    return attr(node, "axes", None)


# ---- which nodes the rules accept ---------------------------------------------------------------------

def _one_constant_operand(node: ir.Node, max_rank: int) -> bool:
    constants = [_constant(v) for v in node.inputs[:2]]
    found = [c for c in constants if c is not None]
    return len(found) == 1 and found[0].ndim <= max_rank


@dataclass(frozen=True)
class Support:
    """What a precondition reads besides the node: the geometry and the tensors that depend on the input."""
    geo: Geometry
    tainted: set


def _slope_bounded(node: ir.Node, cx: Support) -> bool:
    """One input and a slope bounded on the whole real line for this node's attributes."""
    return len(node.inputs) == 1 and ops.ELEMENTWISE[node.op_type].lipschitz(node) is not None


ops.on_elementwise(_slope_family)


@precondition("Dropout")
def _mask_unused(node: ir.Node, cx: Support) -> bool:
    """Its mask output unused."""
    return len(node.outputs) == 1 or not node.outputs[1].uses()


@precondition("Clip")
def _fixed_bounds(node: ir.Node, cx: Support) -> bool:
    """A perturbed input clipped to bounds that are not."""
    return node.inputs[0] in cx.tainted and all(v is None or v not in cx.tainted for v in node.inputs[1:])


@precondition("Flatten", "Reshape", "Squeeze", "Unsqueeze", "DepthToSpace", "SpaceToDepth", "Transpose")
def _rearranges_samples(node: ir.Node, cx: Support) -> bool:
    """The same static number of elements per sample in and out, the batch axis kept in place."""
    x, out, geo = node.inputs[0], node.outputs[0], cx.geo
    if node.op_type == "Transpose" and geo.batched and (attr(node, "perm", None) or [1])[0] != 0:
        return False
    size_in, size_out = geo.sample_size(x), geo.sample_size(out)
    return size_in is not None and size_in == size_out and x in cx.tainted


@precondition("Gemm")
def _gemm_fixed(node: ir.Node, cx: Support) -> bool:
    """A constant 2-D weight, transA = 0 and a bias that is not perturbed."""
    x, w, c = node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    return (not attr(node, "transA", 0) and _constant(w) is not None and _constant(w).ndim == 2
            and (c is None or c not in cx.tainted) and x in cx.tainted)


@precondition("MatMul")
def _matmul_fixed(node: ir.Node, cx: Support) -> bool:
    """Exactly one constant operand, of rank at most 2."""
    return _one_constant_operand(node, 2)


@precondition("Conv")
def _conv_fixed(node: ir.Node, cx: Support) -> bool:
    """A constant kernel on a perturbed input of static sample size, every window inside the padded input."""
    x, w = node.inputs[0], _constant(node.inputs[1])
    dims = cx.geo.sample_dims(x)
    bias_ok = len(node.inputs) < 3 or node.inputs[2] is None or node.inputs[2] not in cx.tainted
    return w is not None and dims is not None and x in cx.tainted and bias_ok \
        and WindowGeometry.of(node, static_shape(x)[2:], w.shape[2:]).fits


@precondition("BatchNormalization")
def _batch_norm_fixed(node: ir.Node, cx: Support) -> bool:
    """Inference mode with constant statistics, one output."""
    x, params = node.inputs[0], node.inputs[1:5]
    return (attr(node, "training_mode", 0) == 0 and len(node.outputs) == 1 and x in cx.tainted
            and all(_constant(v) is not None for v in params) and static_shape(x)[1:2] != [])


@precondition("MaxPool", "AveragePool")
def _pool_fixed(node: ir.Node, cx: Support) -> bool:
    """Static spatial sizes, a kernel_shape, no used Indices output, every window inside the padded input."""
    x = node.inputs[0]
    used = [o for o in node.outputs[1:] if o.uses()]
    dims = static_shape(x)
    return not used and len(dims) >= 3 and all(isinstance(d, int) for d in dims[2:]) \
        and attr(node, "kernel_shape") is not None and attr(node, "storage_order", 0) == 0 \
        and _pool_geometry(node, x).fits


@precondition("GlobalAveragePool", "GlobalMaxPool")
def _global_pool_fixed(node: ir.Node, cx: Support) -> bool:
    """Static spatial sizes."""
    dims = static_shape(node.inputs[0])
    return len(dims) >= 3 and all(isinstance(d, int) for d in dims[2:])


@precondition("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce_fixed(node: ir.Node, cx: Support) -> bool:
    """Constant axes of static size, not the batch axis."""
    runtime_axes = len(node.inputs) > 1 and node.inputs[1] is not None and _constant(node.inputs[1]) is None
    axes = _reduce_axes(node) if not runtime_axes else None
    if runtime_axes or (not axes and attr(node, "noop_with_empty_axes", 0)):
        return False
    dims = static_shape(node.inputs[0])
    axes = range(len(dims)) if not axes else [int(a) % len(dims) for a in axes]
    return cx.geo.keeps_batch_axis(axes) and all(isinstance(dims[a], int) for a in axes)


@precondition("Add", "Sub", "Mul", "Div", "Expand", "Tile")
def _broadcast_fixed(node: ir.Node, cx: Support) -> bool:
    """Static sample sizes and ranks; Mul by one constant operand, Div by a constant without zeros."""
    op, x, geo, tainted = node.op_type, node.inputs[0], cx.geo, cx.tainted
    if op == "Mul" and not _one_constant_operand(node, 8):
        return False
    if op == "Div" and (x not in tainted or _constant(node.inputs[1]) is None
                        or not np.all(_constant(node.inputs[1]) != 0)):
        return False
    sources = [v for v in node.inputs[:2 if op in ("Add", "Sub", "Mul", "Div") else 1] if v in tainted]
    out = node.outputs[0]
    return geo.sample_size(out) is not None and all(geo.sample_size(v) is not None and len(static_shape(v))
                                                   == len(static_shape(out)) for v in sources)


@precondition("Pad")
def _pad_fixed(node: ir.Node, cx: Support) -> bool:
    """Constant pads of static axes other than the batch axis, no axes input."""
    x, tainted = node.inputs[0], cx.tainted
    pads, axes = _constant(node.inputs[1]), node.inputs[3] if len(node.inputs) > 3 else None
    dims = static_shape(x)
    fixed = all(v is None or v not in tainted for v in node.inputs[1:])
    if pads is None or axes is not None or x not in tainted or not fixed:
        return False
    padded = [a for a in range(len(dims)) if pads[a] != 0 or pads[a + len(dims)] != 0]
    return cx.geo.keeps_batch_axis(padded) and all(isinstance(dims[a], int) for a in padded)


@precondition("Slice", "Split", "Gather", "Concat", "Softmax")
def _selection_fixed(node: ir.Node, cx: Support) -> bool:
    """Constant indices and split sizes, along an axis other than the batch axis."""
    geo, tainted, op = cx.geo, cx.tainted, node.op_type
    rank = len(static_shape(node.inputs[0]))
    if op == "Slice":
        axes = _constant(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else range(rank)
        fixed = all(v is None or v not in tainted for v in node.inputs[1:])
        return fixed and geo.keeps_batch_axis([int(a) % rank for a in axes] if rank else [])
    if op == "Gather":
        return _constant(node.inputs[1]) is not None and isinstance(static_shape(node.inputs[0])[
            attr(node, "axis", 0)], int) and geo.keeps_batch_axis([attr(node, "axis", 0) % rank])
    axis = attr(node, "axis", 0 if op in ("Split", "Concat") else -1)
    if op == "Split" and any(v in tainted for v in node.inputs[1:] if v is not None):
        return False
    return rank > 0 and geo.keeps_batch_axis([axis % rank])


def acceptor(geo: Geometry, tainted: set):
    """The per-node check of what this pass bounds, for `geo` and the tensors that depend on the input."""
    support = Support(geo, tainted)
    return lambda node: RULES.verdict(node, support) is None


def supports(node: ir.Node) -> bool:
    """Node-level support, for `inspect` (takes every non-constant input as perturbed)."""
    tainted = [v for v in node.inputs if v is not None and v.const_value is None]
    dims = static_shape(tainted[0]) if tainted else []
    batched = len(dims) >= 2 and not isinstance(dims[0], int)
    return acceptor(Geometry(batched), set(tainted))(node)


# ---- the pass -----------------------------------------------------------------------------------------

def support_context(model: ir.Model, method: str = "lipschitz") -> tuple[list[ir.Node], Support]:
    """The nodes depending on the model's single input, and what the preconditions read (`Support`)."""
    sources = perturbed_inputs(model)
    if len(sources) != 1:
        raise InputError(f"{method} bounds models with one input; this one has {len(sources)}")
    nodes = perturbed_nodes(model.graph, set(sources))
    dims = static_shape(sources[0])
    geo = Geometry(len(dims) >= 2 and not isinstance(dims[0], int))
    return nodes, Support(geo, set(sources) | {out for node in nodes for out in node.outputs})


def lipschitz_constants(model: ir.Model) -> tuple[dict[ir.Value, float], list[ir.Node]]:
    """K[t] for every tensor depending on the model's single input (K[x] = 1), and the nodes walked."""
    nodes, support = support_context(model)
    RULES.check(nodes, support)
    constants: dict[ir.Value, float] = {perturbed_inputs(model)[0]: 1.0}
    for node in nodes:
        ks = [constants.get(v) if v is not None else None for v in node.inputs]
        outs = RULES[node.op_type](support.geo, node, *ks)
        constants.update(zip(node.outputs, outs))
    return constants, nodes


# The pass itself (the margin graph it builds) lives in passes/lipschitz_pass.py.
from graphcert.passes.lipschitz_pass import (ABSOLUTE_SLACK, FLOAT32_SLACK, LipschitzPass,  # noqa: E402,F401
                                             output_lipschitz)
