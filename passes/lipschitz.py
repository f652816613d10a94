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

import numpy as np
import onnx_ir as ir

from graphcert import __version__
from graphcert.builder import Builder
from graphcert.errors import InputError
from graphcert.interface import FLOAT, OBJECTIVE, InputSet, clone, epsilon_name, perturbed_inputs
from graphcert.interpret import attr, check_supported, perturbed_nodes, refusal, registrar
from graphcert.model import static_shape
from graphcert.operator_norms import (EXACT_SIDE, RELATIVE_SLACK, ConvGeometry, average_pool_norm,  # noqa: F401
                                      circular_conv_norm, conv_matrix, outward, spectral_norm)
from graphcert import ops
from graphcert.ops import WindowGeometry
from graphcert.passes.patterns import disjoint_windows, group_sort_input  # noqa: F401  (re-exported)
from graphcert.passes.spec import MARGINS, _affine_producer

RULES: dict = {}
rule = registrar(RULES)

# Margins are computed in float32 by the runtime: this fraction of their magnitude is subtracted as well.
FLOAT32_SLACK = 2.0 ** -16
ABSOLUTE_SLACK = 1e-6


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
    has a rule of its own); nodes whose slope is unbounded are refused by `_conditions`."""
    if spec.op_type not in RULES:
        RULES[spec.op_type] = lambda geo, node, k: [k * spec.lipschitz(node)]
        _SLOPE_FAMILY.add(spec.op_type)


_SLOPE_FAMILY: set[str] = set()
ops.on_elementwise(_slope_family)


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


def _conditions(geo: Geometry, node: ir.Node, tainted: set) -> bool:
    op = node.op_type
    x = node.inputs[0]
    out = node.outputs[0]
    if op in _SLOPE_FAMILY:
        return len(node.inputs) == 1 and ops.ELEMENTWISE[op].lipschitz(node) is not None
    if op in ("Identity", "Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Softplus", "Softsign", "LeakyRelu", "Elu",
              "Selu", "HardSigmoid"):
        return True
    if op == "Dropout":
        return len(node.outputs) == 1 or not node.outputs[1].uses()
    if op == "Clip":
        return x in tainted and all(v is None or v not in tainted for v in node.inputs[1:])
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "DepthToSpace", "SpaceToDepth", "Transpose"):
        if op == "Transpose" and geo.batched and (attr(node, "perm", None) or [1])[0] != 0:
            return False
        size_in, size_out = geo.sample_size(x), geo.sample_size(out)
        return size_in is not None and size_in == size_out and x in tainted
    if op in ("Slice", "Split", "Gather", "Concat", "Softmax"):
        return _selection_ok(geo, node, tainted)
    if op == "Gemm":
        w, c = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        return (not attr(node, "transA", 0) and _constant(w) is not None and _constant(w).ndim == 2
                and (c is None or c not in tainted) and x in tainted)
    if op == "MatMul":
        return _one_constant_operand(node, 2)
    if op == "Conv":
        w = _constant(node.inputs[1])
        dims = geo.sample_dims(x)
        bias_ok = len(node.inputs) < 3 or node.inputs[2] is None or node.inputs[2] not in tainted
        return w is not None and dims is not None and x in tainted and bias_ok \
            and WindowGeometry.of(node, static_shape(x)[2:], w.shape[2:]).fits
    if op == "BatchNormalization":
        params = node.inputs[1:5]
        return (attr(node, "training_mode", 0) == 0 and len(node.outputs) == 1 and x in tainted
                and all(_constant(v) is not None for v in params) and static_shape(x)[1:2] != [])
    if op in ("MaxPool", "AveragePool"):
        used = [o for o in node.outputs[1:] if o.uses()]
        dims = static_shape(x)
        return not used and len(dims) >= 3 and all(isinstance(d, int) for d in dims[2:]) \
            and attr(node, "kernel_shape") is not None and attr(node, "storage_order", 0) == 0 \
            and _pool_geometry(node, x).fits
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        dims = static_shape(x)
        return len(dims) >= 3 and all(isinstance(d, int) for d in dims[2:])
    if op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        runtime_axes = len(node.inputs) > 1 and node.inputs[1] is not None and _constant(node.inputs[1]) is None
        axes = _reduce_axes(node) if not runtime_axes else None
        if runtime_axes or (not axes and attr(node, "noop_with_empty_axes", 0)):
            return False
        dims = static_shape(x)
        axes = range(len(dims)) if not axes else [int(a) % len(dims) for a in axes]
        return geo.keeps_batch_axis(axes) and all(isinstance(dims[a], int) for a in axes)
    if op in ("Add", "Sub", "Mul", "Div", "Expand", "Tile"):
        if op == "Mul" and not _one_constant_operand(node, 8):
            return False
        if op == "Div" and (x not in tainted or _constant(node.inputs[1]) is None
                            or not np.all(_constant(node.inputs[1]) != 0)):
            return False
        sources = [v for v in node.inputs[:2 if op in ("Add", "Sub", "Mul", "Div") else 1] if v in tainted]
        out_size = geo.sample_size(out)
        return out_size is not None and all(geo.sample_size(v) is not None and len(static_shape(v))
                                            == len(static_shape(out)) for v in sources)
    if op == "Pad":
        pads, axes = _constant(node.inputs[1]), node.inputs[3] if len(node.inputs) > 3 else None
        dims = static_shape(x)
        fixed = all(v is None or v not in tainted for v in node.inputs[1:])
        if pads is None or axes is not None or x not in tainted or not fixed:
            return False
        padded = [a for a in range(len(dims)) if pads[a] != 0 or pads[a + len(dims)] != 0]
        return geo.keeps_batch_axis(padded) and all(isinstance(dims[a], int) for a in padded)
    return False


def _selection_ok(geo: Geometry, node: ir.Node, tainted: set) -> bool:
    op = node.op_type
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
    def accepts(node: ir.Node) -> bool:
        try:
            return _conditions(geo, node, tainted)
        except (TypeError, IndexError, ValueError):
            return False  # attributes or shapes the rule cannot read
    return accepts


def supports(node: ir.Node) -> bool:
    """Node-level support, for `inspect` (takes every non-constant input as perturbed)."""
    tainted = [v for v in node.inputs if v is not None and v.const_value is None]
    dims = static_shape(tainted[0]) if tainted else []
    batched = len(dims) >= 2 and not isinstance(dims[0], int)
    return node.op_type in RULES and acceptor(Geometry(batched), set(tainted))(node) and refusal(node) is None


# ---- the pass -----------------------------------------------------------------------------------------

def lipschitz_constants(model: ir.Model) -> tuple[dict[ir.Value, float], list[ir.Node]]:
    """K[t] for every tensor depending on the model's single input (K[x] = 1), and the nodes walked."""
    sources = perturbed_inputs(model)
    if len(sources) != 1:
        raise InputError(f"lipschitz bounds models with one input; this one has {len(sources)}")
    nodes = perturbed_nodes(model.graph, set(sources))
    dims = static_shape(sources[0])
    geo = Geometry(len(dims) >= 2 and not isinstance(dims[0], int))
    tainted = set(sources) | {out for node in nodes for out in node.outputs}
    check_supported(nodes, RULES, "lipschitz", acceptor(geo, tainted))
    constants: dict[ir.Value, float] = {sources[0]: 1.0}
    for node in nodes:
        ks = [constants.get(v) if v is not None else None for v in node.inputs]
        outs = RULES[node.op_type](geo, node, *ks)
        constants.update(zip(node.outputs, outs))
    return constants, nodes


def output_lipschitz(model: ir.Model, output: ir.Value, constants: dict) -> tuple[float, np.ndarray | None]:
    """(K_sub, W [k, n]) when output = h·W + c with K_sub = K[h]; else (K[output], None)."""
    affine = output
    while affine.producer() is not None and affine.producer().op_type == "Identity":
        affine = affine.producer().inputs[0]   # the spec pass names its margins with an Identity
    found = _affine_producer(affine)
    if found is not None and found[0] in constants and len(static_shape(output)) <= 2:
        h, weight = found[0], found[1]
        return constants[h], np.asarray(weight, dtype=np.float64)
    return constants.get(output, 0.0), None


class LipschitzPass(ir.passes.FunctionalPass):
    """Normalised model in, Lipschitz bound graph out; `objective=True` adds the certify margins interface.

    Inputs: the model input, `epsilon` (an L2 radius; the largest entry per sample counts) and, with an
    objective, `objective` [batch, m, n]. Outputs: the originals (optional) and either `margins`,
    `margins_lower`, `margins_upper` (objective·y ∓ eps·K_row) or `<out>_lower/_upper` per output.
    """

    def __init__(self, input_set: InputSet | None = None, keep_original: bool = True, objective: bool = False):
        super().__init__()
        self.input_set = input_set or InputSet()
        if self.input_set.kind != "linf":
            raise InputError("lipschitz bounds an L2 ball around x: give an epsilon input set, not a box")
        self.keep_original = keep_original
        self.objective = objective

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = clone(model)
        graph = result.graph
        constants, _ = lipschitz_constants(result)
        x = perturbed_inputs(result)[0]
        b = Builder(graph, prefix="lipschitz")
        rank = len(x.shape) if x.shape is not None else 0
        eps = ir.Value(name=epsilon_name(result, x), type=FLOAT,
                       shape=ir.Shape([f"{x.name}_eps_d{i}" for i in range(rank)]))
        graph.inputs.append(eps)
        batched = rank >= 2 and not isinstance(static_shape(x)[0], int)
        radius = b.reduce("ReduceMax", b.op("Reshape", eps, b.ints([0, -1] if batched else [1, -1])), [1],
                          keepdims=0)                                         # [batch] or [1]
        originals = list(graph.outputs)
        if not self.keep_original:
            graph.outputs.clear()
        if self.objective:
            self._margins(result, b, originals[0], constants, radius)
        else:
            for y in originals:
                self._elementwise(result, b, y, constants, radius, batched)
        result.metadata_props["graphcert.method"] = "lipschitz"
        result.metadata_props["graphcert.version"] = __version__
        return ir.passes.PassResult(result, modified=True)

    def _margins(self, model, b: Builder, y: ir.Value, constants, radius) -> None:
        graph = model.graph
        objective = ir.Value(name=OBJECTIVE, type=FLOAT, shape=ir.Shape(["batch", "spec_rows", "spec_cols"]))
        graph.inputs.append(objective)
        k_sub, weight = output_lipschitz(model, y, constants)
        flat = y if len(static_shape(y)) == 2 else b.op("Flatten", y, axis=1)
        margins = b.op("Squeeze", b.op("MatMul", objective, b.op("Unsqueeze", flat, b.ints([-1]))), b.ints([-1]))
        rows = objective if weight is None else b.op("MatMul", objective, b.const(weight.T.astype(np.float32)))
        row_norms = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", rows, rows), [-1], keepdims=0))   # [batch, m]
        spread = b.op("Mul", b.op("Mul", row_norms, b.const(_up32(k_sub))), b.op("Unsqueeze", radius, b.ints([1])))
        size = b.op("Squeeze", b.op("MatMul", b.op("Abs", objective),
                                    b.op("Unsqueeze", b.op("Abs", flat), b.ints([-1]))), b.ints([-1]))
        width = _with_slack(b, spread, size)
        named = {MARGINS: margins, f"{MARGINS}_lower": b.op("Sub", margins, width),
                 f"{MARGINS}_upper": b.op("Add", margins, width)}
        if not self.keep_original:
            named.pop(MARGINS)
        for name, value in named.items():
            _expose(graph, b, name, value, ir.Shape([y.shape[0] if y.shape is not None else "batch", "spec_rows"]))

    def _elementwise(self, model, b: Builder, y: ir.Value, constants, radius, batched) -> None:
        k_sub, weight = output_lipschitz(model, y, constants)
        if weight is not None:
            per_element = k_sub * np.sqrt((weight ** 2).sum(axis=0))                       # [n]
        else:
            per_element = np.array(k_sub)
        rank = len(static_shape(y))
        # The radius per sample, shaped to broadcast against y ([batch, 1, ...], or y's rank of ones unbatched).
        scale = b.op("Reshape", radius, b.ints(([-1] + [1] * (rank - 1)) if batched else [1] * rank))
        spread = b.op("Mul", b.const(_up32(per_element)), scale)
        width = _with_slack(b, spread, b.op("Abs", y))
        for suffix, value in (("lower", b.op("Sub", y, width)), ("upper", b.op("Add", y, width))):
            _expose(model.graph, b, f"{y.name}_{suffix}", value, y.shape)


def _up32(value) -> np.ndarray:
    """float64 constants as float32, rounded towards +inf."""
    value = np.asarray(value, dtype=np.float64)
    rounded = value.astype(np.float32)
    return np.where(rounded.astype(np.float64) < value, np.nextafter(rounded, np.float32(np.inf)), rounded)


def _with_slack(b: Builder, spread: ir.Value, magnitude: ir.Value) -> ir.Value:
    """spread plus what float32 arithmetic may have lost on values of this magnitude (and on spread)."""
    relative = b.op("Mul", b.op("Add", spread, magnitude), b.const(FLOAT32_SLACK))
    return b.op("Add", b.op("Add", spread, relative), b.const(ABSOLUTE_SLACK))


def _expose(graph: ir.Graph, b: Builder, name: str, value: ir.Value, shape) -> None:
    named = b.op("Identity", value)
    named.name, named.type, named.shape = name, FLOAT, shape
    graph.outputs.append(named)
