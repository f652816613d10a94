"""Interval bound propagation (IBP) as a rewrite: one rule per op type, each a few lines of interval maths.

Every tensor that depends on the perturbed inputs is carried as an `Interval`; rules emit the ONNX nodes
that compute its bounds. Linear ops send the center through the op and the radius through the op with
|W|; non-decreasing ops map lower to lower and upper to upper; everything else has its own sound rule.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert import ops
from graphcert.builder import Builder
from graphcert.interface import (BoundPass, InputSet, _as_float32_outward, clone, close_outputs, open_inputs,
                                 perturbed_inputs)
from graphcert.interpret import attr, perturbed_nodes
from graphcert.interval import Interval

from graphcert.passes.ibp_core import (CONDITIONS, RULES, Context, both_forms as _both_forms, condition, rule,
                                       widened as _widened)


# ---- ops that only move, copy or select elements -------------------------------------------------------

@rule("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice", "Gather", "Expand",
      "Tile", "DepthToSpace", "SpaceToDepth")
def _move(cx, node, x, *rest):
    return [_both_forms(cx, x, lambda v: cx.b.copy(node, [v, *rest]))]


@rule("Dropout")
def _dropout(cx, node, x, *rest):
    return [x]


def _tensor_given(node: ir.Node) -> bool:
    """A tensor input (an optional or sequence value is no interval)."""
    return isinstance(node.inputs[0].type, ir.TensorType)


@rule("OptionalGetElement", accepts=_tensor_given)
def _optional_element(cx, node, x):
    """The element of a tensor is the tensor itself."""
    return [x]


@rule("Split")
def _split(cx, node, x, *rest):
    n = len(node.outputs)
    lows = cx.b.copy(node, [x.lower, *rest], num_outputs=n)
    highs = cx.b.copy(node, [x.upper, *rest], num_outputs=n)
    lows, highs = (lows, highs) if n > 1 else ([lows], [highs])
    return [Interval.from_bounds(cx.b, lo, hi) for lo, hi in zip(lows, highs)]


@rule("Pad")
def _pad(cx, node, x, *rest):
    # The pad value is a point, so pad lower and upper alike (center-radius would pad the radius too).
    return [Interval.from_bounds(cx.b, cx.b.copy(node, [x.lower, *rest]), cx.b.copy(node, [x.upper, *rest]))]


@rule("Concat")
def _concat(cx, node, *xs):
    parts = [iv.as_interval(cx.b, x) for x in xs]
    return [Interval.from_bounds(cx.b, cx.b.copy(node, [p.lower for p in parts]),
                                 cx.b.copy(node, [p.upper for p in parts]))]


@rule("AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum")
def _positive_linear(cx, node, x, *rest):
    # Non-negative weights: |op| is the op itself.
    return [Interval.from_center(cx.b, cx.b.copy(node, [x.center, *rest]), cx.b.copy(node, [x.radius, *rest]))]


@rule("Add", "Sub")
def _add_sub(cx, node, x, y):
    b = cx.b
    if isinstance(x, Interval) and isinstance(y, Interval):
        return [iv.add(b, x, y) if node.op_type == "Add" else iv.sub(b, x, y)]
    if isinstance(x, Interval):
        if x.has_center_form:
            return [Interval.from_center(b, b.op(node.op_type, x.center, y), x.radius)]
        return [Interval.from_bounds(b, b.op(node.op_type, x.lower, y), b.op(node.op_type, x.upper, y))]
    if node.op_type == "Add":
        return _add_sub(cx, node, y, x)
    return [iv.neg(b, _add_sub(cx, node, y, x)[0])]  # k - x = -(x - k)


@rule("Mul")
def _mul(cx, node, x, y):
    b = cx.b
    if isinstance(x, Interval) and isinstance(y, Interval):
        return [iv.square(b, x) if x is y else iv.mul(b, x, y)]
    if not isinstance(x, Interval):
        x, y = y, x
    return [Interval.from_center(b, b.op("Mul", x.center, y), b.op("Mul", x.radius, cx.abs(y)))]


@rule("Div")
def _div(cx, node, x, y):
    b = cx.b
    if isinstance(y, Interval):
        return [iv.mul(b, iv.as_interval(b, x), iv.reciprocal(b, _widened(cx, y, node.inputs[1].dtype)))]
    return [Interval.from_center(b, b.op("Div", x.center, y), b.op("Div", x.radius, cx.abs(y)))]


@rule("Neg")
def _neg(cx, node, x):
    return [iv.neg(cx.b, x)]


@rule("Sum")
def _sum(cx, node, *xs):
    total = iv.as_interval(cx.b, xs[0])
    for x in xs[1:]:
        total = iv.add(cx.b, total, iv.as_interval(cx.b, x))
    return [total]


# ---- non-decreasing ops: lower to lower, upper to upper -----------------------------------------------

MONOTONE = ["Relu", "Sigmoid", "Tanh", "Clip", "Softplus", "Softsign", "Exp", "Erf", "Atan",
            "Asinh", "Sinh", "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin",
            "LeakyRelu", "Elu", "Selu", "HardSigmoid", "ThresholdedRelu"]


@condition("MaxPool", "AveragePool")
def _pool_size_agreed(node: ir.Node) -> bool:
    """No ceil-mode window that would start in the end padding (onnxruntime drops it, onnx's shape inference counts it)."""
    if not attr(node, "ceil_mode", 0):
        return True
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        return False
    geometry = ops.WindowGeometry.of(node, shape[2:])
    counted = ops.WindowGeometry(geometry.spatial, geometry.kernel, geometry.strides, geometry.dilations,
                                 geometry.begin, geometry.end, True, count_padding_starts=True)
    return geometry.out == counted.out


@condition("LeakyRelu", "Elu", "Selu", "HardSigmoid", "ThresholdedRelu")
def _is_monotone(node: ir.Node) -> bool:
    """Non-negative slopes (a negative alpha or gamma makes LeakyRelu/Elu/Selu/HardSigmoid decreasing somewhere)."""
    if node.op_type in ("LeakyRelu", "Elu", "Selu", "HardSigmoid"):
        return attr(node, "alpha", 0.01) >= 0 and attr(node, "gamma", 1.0) >= 0
    if node.op_type == "ThresholdedRelu":
        return attr(node, "alpha", 1.0) >= 0
    return True


@rule(*MONOTONE)
def _monotone(cx, node, x, *rest):
    # Clip is non-decreasing in its bounds too: bounded min/max inputs go lower to lower, upper to upper.
    low = [r.lower if isinstance(r, Interval) else r for r in rest]
    high = [r.upper if isinstance(r, Interval) else r for r in rest]
    x = iv.as_interval(cx.b, x)
    return [Interval.from_bounds(cx.b, cx.b.copy(node, [x.lower, *low]), cx.b.copy(node, [x.upper, *high]))]


def _monotone_family(spec: ops.Elementwise) -> None:
    """Element-wise ops stated in graphcert.ops as non-decreasing get the monotone rule (unless this module
    has a rule of its own), accepted where the node's attributes keep them non-decreasing."""
    if spec.op_type in RULES:
        return
    RULES[spec.op_type] = _monotone
    CONDITIONS[spec.op_type] = spec.monotone
    MONOTONE.append(spec.op_type)


@rule("Floor", "Ceil", "Sign")
def _step(cx, node, x, *rest):
    """Non-decreasing but rounding: widened first, so an ulp of error cannot cost a whole step."""
    x = _widened(cx, x, node.inputs[0].dtype)
    return [iv.monotone(cx.b, x, lambda v: cx.b.copy(node, [v, *rest]))]


@rule("Log", "Sqrt")
def _steep_monotone(cx, node, x):
    """Increasing with an unbounded slope at 0: widened first (see `_widened`)."""
    x = _widened(cx, x, node.inputs[0].dtype, non_negative=True)
    return [iv.monotone(cx.b, x, lambda v: cx.b.copy(node, [v]))]


@rule("Max", "Min")
def _max_min(cx, node, *xs):
    parts = [iv.as_interval(cx.b, x) for x in xs]
    return [Interval.from_bounds(cx.b, cx.b.copy(node, [p.lower for p in parts]),
                                 cx.b.copy(node, [p.upper for p in parts]))]


# ---- non-monotone ops: their own interval rules ---------------------------------------------------------

@rule("Abs")
def _abs(cx, node, x):
    return [iv.absolute(cx.b, x)]


@rule("Reciprocal")
def _reciprocal(cx, node, x):
    return [iv.reciprocal(cx.b, _widened(cx, x, node.inputs[0].dtype))]


def _softmax_bounds(cx, node, x):
    """softmax_i = e^{x_i} / (e^{x_i} + sum_{j != i} e^{x_j}): smallest at x_i = l_i, x_j = u_j; largest vice versa."""
    b = cx.b
    axis = attr(node, "axis", -1)
    shift = b.reduce("ReduceMax", x.upper, [axis])
    e_low, e_high = b.op("Exp", b.op("Sub", x.lower, shift)), b.op("Exp", b.op("Sub", x.upper, shift))
    others_high, others_low = _sum_of_others(b, e_high, axis), _sum_of_others(b, e_low, axis)
    tiny = b.const(np.finfo(np.float32).tiny)
    zero, one = b.const(0.0), b.const(1.0)
    den_low = b.op("Add", e_low, others_high)
    den_high = b.op("Add", e_high, others_low)
    lower = b.op("Where", b.op("Greater", den_low, tiny), b.op("Div", e_low, b.op("Max", den_low, tiny)), zero)
    upper = b.op("Where", b.op("Greater", den_high, tiny), b.op("Div", e_high, b.op("Max", den_high, tiny)), one)
    return b.op("Clip", lower, zero, one), b.op("Clip", upper, zero, one)


def _sum_of_others(b: Builder, e: ir.Value, axis: int) -> ir.Value:
    """sum_{j != i} e_j along `axis` as the sums before and after i: sum(e) - e_i cancels catastrophically
    when e_i dominates, and an others-sum rounded to 0 would let a softmax lower bound reach 1."""
    along = b.const(np.int64(axis), dtype=np.int64)
    return b.op("Add", b.op("CumSum", e, along, exclusive=1), b.op("CumSum", e, along, exclusive=1, reverse=1))


@rule("Softmax")
def _softmax(cx, node, x):
    return [Interval.from_bounds(cx.b, *_softmax_bounds(cx, node, x))]


@rule("LogSoftmax")
def _log_softmax(cx, node, x):
    """In log space (the log of softmax bounds is -inf once exp underflows): x_i - logsumexp(x) is smallest at
    x_i = l_i, x_j = u_j and equals -softplus(logsumexp_{j != i} u_j - l_i); the largest vice versa."""
    b = cx.b
    axis = attr(node, "axis", -1)
    lower = b.op("Neg", b.op("Softplus", _log_sum_exp_of_others(b, x.upper, axis, minus=x.lower)))
    upper = b.op("Neg", b.op("Softplus", _log_sum_exp_of_others(b, x.lower, axis, minus=x.upper)))
    # A few ulps outward for the rounding of the softplus; NaN (inf - inf at infinite ends) says nothing.
    slack = b.const(1.0 + 2.0 ** -20)
    lower = b.op("Where", b.op("IsNaN", lower), b.const(-np.inf), b.op("Mul", lower, slack))
    upper = b.op("Where", b.op("IsNaN", upper), b.const(0.0), b.op("Min", b.op("Div", upper, slack), b.const(0.0)))
    return [Interval.from_bounds(b, lower, upper)]


def _log_sum_exp_of_others(b: Builder, v: ir.Value, axis: int, minus: ir.Value) -> ir.Value:
    """log sum_{j != i} exp(v_j) - minus_i along `axis` for every i (-inf for an axis of one), shifted by the
    largest other entry so that the sum lies in [1, n - 1]: the top of the axis for every i but a unique top, the
    runner-up for that one."""
    top = b.reduce("ReduceMax", v, [axis])
    is_top = b.op("Equal", v, top)
    count = b.reduce("ReduceSum", b.op("Cast", is_top, to=ir.DataType.FLOAT), [axis])
    minus_inf = b.const(-np.inf)
    runner_up = b.reduce("ReduceMax", b.op("Where", is_top, minus_inf, v), [axis])
    alone = b.op("And", is_top, b.op("Equal", count, b.const(1.0)))
    shift = b.op("Where", alone, runner_up, top)
    # Others' sum for the unique top (shift = runner-up): every entry but the top. For the rest (shift = top):
    # the entries before and after i, which keeps the top's term of 1 exact.
    below_top = b.reduce("ReduceSum", b.op("Where", is_top, b.const(0.0), b.op("Exp", b.op("Sub", v, runner_up))),
                         [axis])
    others = _sum_of_others(b, b.op("Exp", b.op("Sub", v, top)), axis)
    # (shift - minus) + log(sum), in that order: at large magnitudes shift + log(sum) would round the log away.
    return b.op("Add", b.op("Sub", shift, minus), b.op("Log", b.op("Where", alone, below_top, others)))


def _layer_norm_supported(node: ir.Node) -> bool:
    """Static sizes along the normalised axes."""
    shape = node.inputs[0].shape
    if shape is None:
        return False
    axis = attr(node, "axis", -1) % len(shape)
    return all(isinstance(shape[a], int) for a in range(axis, len(shape)))


@rule("LayerNormalization", accepts=_layer_norm_supported)
def _layer_norm(cx, node, x, scale, bias=None):
    """(x - mean) / sqrt(var + eps) · scale + bias, bounding each factor soundly rather than the whole."""
    b = cx.b
    x = iv.as_interval(b, x)
    shape = node.inputs[0].shape
    rank = len(shape)
    axis = attr(node, "axis", -1) % rank
    axes = list(range(axis, rank))
    normed, inverse = _standardised(b, x, axes, int(np.prod([shape[a] for a in axes])), attr(node, "epsilon", 1e-5))
    out = _affine(cx, normed, scale, bias)
    # The optional Mean and InvStdDev outputs (reduced axes kept as 1, like the reductions here).
    mean = Interval.from_center(b, b.reduce("ReduceMean", x.center, axes), b.reduce("ReduceMean", x.radius, axes))
    return [out, mean, inverse][:len(node.outputs)]


def _instance_norm_supported(node: ir.Node) -> bool:
    """Static spatial sizes."""
    shape = node.inputs[0].shape
    return shape is not None and len(shape) >= 3 and all(isinstance(d, int) for d in shape[2:])


@rule("InstanceNormalization", accepts=_instance_norm_supported)
def _instance_norm(cx, node, x, scale, bias):
    """Layer normalisation over each sample's and channel's spatial axes, then a per-channel scale and bias."""
    b = cx.b
    shape = node.inputs[0].shape
    axes = list(range(2, len(shape)))
    n = int(np.prod(shape[2:]))
    x = iv.as_interval(b, x)
    normed, inverse = _standardised(b, x, axes, n, attr(node, "epsilon", 1e-5))
    # onnxruntime takes the variance as E[x^2] - E[x]^2, whose rounding (about n ulps of E[x^2]) is large next to a
    # small variance: its result may leave the exact one's bounds by that much, relative to 1/std, plus the
    # rounding of the mean (n ulps of E|x|) times 1/std.
    unit = b.const(4.0 * n * 2.0 ** -24)
    magnitude = iv.absolute(b, x).upper
    second_moment = b.reduce("ReduceMean", b.op("Mul", magnitude, magnitude), axes)
    relative = b.op("Mul", unit, b.op("Mul", second_moment, b.op("Mul", inverse.upper, inverse.upper)))
    absolute = b.op("Mul", b.op("Mul", unit, b.reduce("ReduceMean", magnitude, axes)), inverse.upper)
    slack = b.op("Add", b.op("Mul", iv.absolute(b, normed).upper, relative), absolute)
    normed = Interval.from_bounds(b, b.op("Sub", normed.lower, slack), b.op("Add", normed.upper, slack))
    per_channel = b.ints([-1] + [1] * len(axes))
    scale, bias = ((Interval.from_bounds(b, b.op("Reshape", v.lower, per_channel), b.op("Reshape", v.upper, per_channel))
                    if isinstance(v, Interval) else b.op("Reshape", v, per_channel)) for v in (scale, bias))
    return [_affine(cx, normed, scale, bias)]


def _affine(cx, normed: Interval, scale, bias) -> Interval:
    b = cx.b
    if isinstance(scale, Interval):
        out = iv.mul(b, normed, scale)
    else:
        out = Interval.from_center(b, b.op("Mul", normed.center, scale), b.op("Mul", normed.radius, cx.abs(scale)))
    if isinstance(bias, Interval):
        out = iv.add(b, out, bias)
    elif bias is not None:
        out = Interval.from_center(b, b.op("Add", out.center, bias), out.radius)
    return out


def _standardised(b: Builder, x: Interval, axes: list[int], n: int, eps: float) -> tuple[Interval, Interval]:
    """(x - mean) / sqrt(var + eps) over `axes` (n elements), bounding each factor soundly rather than the whole;
    and the bounds of 1 / sqrt(var + eps)."""
    # d_i = x_i - mean(x) is linear in x with coefficients (1 - 1/n) on x_i and -1/n elsewhere.
    centered_c = b.op("Sub", x.center, b.reduce("ReduceMean", x.center, axes))
    spread = b.op("Mul", b.reduce("ReduceSum", x.radius, axes), b.const(1.0 / n))
    centered_r = b.op("Add", b.op("Mul", x.radius, b.const(max(1.0 - 2.0 / n, 0.0))), spread)
    centered = Interval.from_center(b, centered_c, centered_r)
    sq = iv.square(b, centered)
    var = Interval.from_bounds(b, b.reduce("ReduceMean", sq.lower, axes), b.reduce("ReduceMean", sq.upper, axes))
    std = iv.monotone(b, var, lambda v: b.op("Sqrt", b.op("Add", v, b.const(eps))))
    inverse = iv.reciprocal(b, std)
    return iv.mul(b, centered, inverse), inverse




ops.on_elementwise(_monotone_family)


def accepts(node: ir.Node) -> bool:
    """Whether the node meets IBP's precondition for its op (CROWN asks this of ops it shares with IBP)."""
    return RULES.meets_precondition(node)


class IntervalPass(BoundPass):
    """Normalised model in, IBP bound graph out (see `graphcert.interface` for its inputs and outputs)."""

    rules = RULES

    def __init__(self, input_set=None, keep_original: bool = True, trainable: bool = False):
        super().__init__()
        self.input_set = input_set or InputSet()
        self.keep_original = keep_original
        self.trainable = trainable

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = clone(model)
        nodes = perturbed_nodes(result.graph, set(perturbed_inputs(result)))   # checked by `requires`
        b = Builder(result.graph, prefix="ibp")
        boxes = open_inputs(result, b, self.input_set, share_radius=True)
        bounds = propagate(result.graph, nodes, b, boxes, trainable=self.trainable)
        named = {name: _as_float(b, result.graph, name, v) for name, v in bounds.items()}
        close_outputs(result, b, named, self.keep_original, "ibp")
        return ir.passes.PassResult(result, modified=True)


def _as_float(b: Builder, graph: ir.Graph, name: str, bounds: Interval) -> tuple[ir.Value, ir.Value]:
    """Bounds of a boolean or integer output (a comparison, an arg-max index) as float32 numbers."""
    out = next(v for v in graph.outputs if v.name == name)
    if out.dtype is None or out.dtype.is_floating_point():
        return bounds.lower, bounds.upper
    if out.dtype in WIDE_INTEGERS:  # beyond 2^24 a float32 rounds them: through double, moved outward
        return _as_float32_outward(b, *(b.op("Cast", v, to=ir.DataType.DOUBLE) for v in (bounds.lower, bounds.upper)),
                                   ir.DataType.DOUBLE)
    return tuple(b.op("Cast", v, to=ir.DataType.FLOAT) for v in (bounds.lower, bounds.upper))


WIDE_INTEGERS = (ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT32, ir.DataType.UINT64)


SAMPLEWISE_LINEAR = {"MatMul", "Conv", "ConvTranspose", "BatchNormalization", "AveragePool", "GlobalAveragePool",
                     "Add", "Sub", "Mul", "Div", "Neg", "Identity", "Dropout"}


def _keeps_batch_axis(node: ir.Node) -> bool:
    """Ops that act on each sample alone with the batch on axis 0 in and out: a batch-shared radius (see
    `Interval.shared`) goes through them as one row. Others that index the batch axis (Slice, Gather, Tile,
    reshapes across it, reductions over it) get a materialised radius."""
    op = node.op_type
    if op == "Gemm":
        return not attr(node, "transA", 0)
    if op == "Flatten":
        return attr(node, "axis", 1) == 1
    if op == "Reshape":
        target = node.inputs[1].const_value
        return target is not None and int(target.numpy().reshape(-1)[0]) == 0 and not attr(node, "allowzero", 0)
    if op == "Transpose":
        return list(attr(node, "perm", [0]))[:1] == [0]
    if op == "BatchNormalization" and attr(node, "training_mode", 0):
        return False  # batch statistics: every sample's output reads the whole batch
    if op in ("Squeeze", "Unsqueeze"):
        axes = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
        return axes is not None and 0 not in axes.numpy().reshape(-1).tolist()
    return op in SAMPLEWISE_LINEAR


def propagate(graph: ir.Graph, nodes: list[ir.Node], b: Builder, boxes: dict,
              trainable: bool = False) -> dict[str, Interval]:
    """Interval of every graph output that depends on the boxes, by name."""
    cx = Context(b, trainable)
    env: dict = dict(boxes)
    for node in nodes:
        args = [env.get(v, v) if v is not None else None for v in node.inputs]
        while args and args[-1] is None:
            args.pop()
        shared = [a for a in args if isinstance(a, Interval) and a.shared]
        keeps = shared and _keeps_batch_axis(node)
        if shared and not keeps and node.op_type not in MONOTONE:  # monotone rules only use lower and upper
            args = [a.materialised() if isinstance(a, Interval) else a for a in args]
        outs = RULES[node.op_type](cx, node, *args)
        if keeps and len(shared) == sum(isinstance(a, Interval) for a in args):
            for out in outs:
                if isinstance(out, Interval):
                    out.shared = out.has_center_form
        env.update(zip(node.outputs, outs))
    return {out.name: iv.as_interval(b, env.get(out, out)) for out in graph.outputs if out in env}


# The other rule families register into the same table (passes/ibp_core.RULES).
from graphcert.passes import (ibp_rules_deform, ibp_rules_elementwise, ibp_rules_linear,  # noqa: E402,F401
                              ibp_rules_logic, ibp_rules_qcontrib, ibp_rules_qlinear, ibp_rules_quant,
                              ibp_rules_random, ibp_rules_reduce, ibp_rules_rounding, ibp_rules_sampling)
