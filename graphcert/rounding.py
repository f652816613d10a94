"""Float32 rounding: how far the deployed model's float32 outputs, and a bound graph's float32 margins, may be
from their real-arithmetic values, so that certificates hold for the model as it runs.

Bound graphs bound the model in real arithmetic and are themselves computed in float32. A certificate is about
the deployed model evaluated in float32 (each op rounded to nearest, in any summation order), so `certify` and
`verify` require every margin lower bound to beat `slack`, an upper bound on both errors.

The error analysis is the standard one for dot products (Higham, Accuracy and Stability of Numerical
Algorithms, ch. 3): with u = 2^-24 and γ_n = n·u / (1 - n·u), |fl(w·x + b) - (w·x + b)| <= γ_{n+1}·(|w|·|x| + |b|).
It is run as an interpreter with one rule per op over the model graph, emitting a graph that computes, for a
batch of input boxes, E, a bound on |fl(value) - value| of every value, from M, a bound on |value| over the box
(IBP's interval of the value, so magnitudes are those the network really reaches, not products of |W|; a
verifier may also feed CROWN's bounds of unit inputs over the set, graphcert.rounding_given).
Linear ops propagate E through |W| and add γ_n of the magnitudes they sum; exact ops (ReLU, max, reshapes,
selections) carry E through; smooth ops add their Lipschitz constant times E plus a few ulps of libm error.
Next to E the graph carries N, a per-sample bound on the L2 norm of the error (graphcert.rounding_norms:
||W||_2 through linear ops, so orthogonal and Lipschitz layers do not amplify it), and E is tightened to
min(E, N) at every op; a margin row c sees at most min(|c|·E, ||c||_2·N) of the model's error.

The bound graph's own rounding: a lipschitz bound graph (rounding_slack.POINT_BOUND_GRAPHS) is the model evaluated at the
centre of the ball (a point of the set: the same bound covers it) minus eps·K·||row||, with K folded rounded
up and a relative slack of its own (2^-16 of the magnitudes, passes/lipschitz.py) for the margin products. IBP propagates centres (the
model's own recursion, at magnitudes at most M) and radii through |W| (non-negative sums: no cancellation, the
error is γ_n of |W| times magnitudes at most M, layer after layer): together the recursion of the plain
|W|-product E, computed without the N tightening. CROWN's coefficient chains are products of the same |W|
and relaxation slopes in [0, 1] and are taken to be bounded the same way (argued, not proved op by op). So a
margin's slack is
    model + bound graph + 8·u·|c|·M,   model = min(|c|·E, ||c||_2·N),
    bound graph = model (lipschitz) or 2·|c|·E_plain (IBP, CROWN family: centre and radius parts),
computed in float64 from the graph's outputs and rounded up.
Ops without a rule here make `certify`/`verify` refuse with a one-line error naming them (rounding="real" opts
out: certificates then hold in real arithmetic only).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .arithmetic import FLOAT32, Arithmetic, of_model
from . import ops
from .builder import Builder
from .errors import UnsupportedOpError
from .interface import clone, perturbed_inputs
from .interpret import attr, check_supported, perturbed_nodes, registrar
from .interval import Interval
from .model import static_shape
from .rounding_walk import SAFETY, Walk  # noqa: F401  (SAFETY re-exported)

UNIT = FLOAT32.unit               # float32 unit roundoff (the default arithmetic)
LIBM_ULPS = 4                     # exp, tanh, ... are within a few ulps in every runtime we know

RULES: dict = {}
rule = registrar(RULES)


def gamma(n: int) -> float:
    return FLOAT32.gamma(n)


def _refused(node: ir.Node, why: str) -> UnsupportedOpError:
    return UnsupportedOpError("float32 rounding analysis", {node.op_type: [f"{node.name or '(unnamed)'}: {why}"]})


def _perturbed(walk: Walk, value) -> bool:
    return value is not None and value in walk.errors


# ---- exact ops: rounding-free selections, moves and maxima carry E through ---------------------------------

EXACT_OPS = ("Relu", "Identity", "Dropout", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Neg", "Abs",
             "Slice", "Gather", "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "Expand", "Tile",
             "DepthToSpace", "SpaceToDepth", "Split", "Clip", "Concat", "Pad")


@rule(*EXACT_OPS)
def _exact(walk: Walk, node: ir.Node):
    """|op(x~) - op(x)| <= op(|x~ - x|) elementwise for these ops (no arithmetic rounds); the other inputs
    (indices, shapes, limits, fill values) must not depend on the box, and unperturbed tensors fed to Concat
    carry no error."""
    x = node.inputs[0]
    if node.op_type == "Relu":
        # A unit whose exact input stays below -E is 0 in both the exact and the rounded network: no error.
        error = walk.errors[x]
        live = walk.b.op("Cast", walk.b.op("Greater", walk.b.op("Add", walk.upper(x), error), walk.c(0.0)), to=1)
        return [walk.b.op("Mul", error, live)]
    if node.op_type in ("Neg", "Abs", "Clip"):
        if any(_perturbed(walk, v) for v in node.inputs[1:]):
            raise _refused(node, "perturbed limits")
        if node.op_type == "Clip" and walk.weight_rounding:  # the limits were rounded to float32 too
            return [walk.plus(walk.errors[x], walk.magnitude(node.outputs[0]), FLOAT32.unit)]
        return [walk.errors[x]]
    if node.op_type == "Concat":
        parts = [walk.errors[v] if _perturbed(walk, v) else walk.b.op("Mul", walk.magnitude(v), walk.c(0.0))
                 for v in node.inputs]
        return [walk.b.copy(node, parts)]
    if any(_perturbed(walk, v) for v in node.inputs[1:]):
        raise _refused(node, "a perturbed index, shape or fill value")
    rest = list(node.inputs[1:])
    if node.op_type == "Pad" and len(rest) > 1:
        rest[1] = None  # the fill value is exact: no error at the border
    count = len(node.outputs) if node.op_type == "Split" else 1
    out = walk.b.copy(node, [walk.errors[x], *rest], count)
    return [out] if count == 1 else list(out)


@rule("LeakyRelu")
def _leaky_relu(walk: Walk, node: ir.Node):
    alpha = abs(attr(node, "alpha", 0.01))
    error = walk.b.op("Mul", walk.errors[node.inputs[0]], walk.c(max(1.0, alpha)))
    return [walk.plus(error, walk.magnitude(node.outputs[0]), 2 * walk.unit)]


# ---- linear ops: E through |W| plus γ_n of what they sum ---------------------------------------------------

def _linear(walk: Walk, node: ir.Node, x: ir.Value, apply_abs, fan_in: int, bias_abs=None):
    """y = W·x + b summed from fan_in terms: the runtime sums the computed x~ (|x~| <= M + E), so
    |fl(y~) - y| <= (1 + γ)·|W|·E + γ·(|W|·M + |b|), γ = γ_{fan_in + 1}. With norms tracked, (E, N): the
    rounding added, γ·(|W|·(M + E) + |b|), is what graphcert.rounding_norms adds to ||W||_2·N."""
    g = walk.gamma(fan_in + 1)
    out = node.outputs[0]
    if out in walk.reach:   # an L2 ball: |W|·|h(x)| <= |W|·|h(centre)| + ||w_j||_2·||h(x) - h(centre)||_2
        summed = walk.b.op("Add", apply_abs(walk.b.op("Abs", x)), walk.spread_of(out, walk.reach[out]))
    else:
        summed = apply_abs(walk.magnitude(x))
    if bias_abs is not None:
        summed = walk.b.op("Add", summed, bias_abs)
    propagated = apply_abs(walk.errors[x])
    error = walk.plus(walk.b.op("Mul", propagated, walk.c(1.0 + g)), summed, g)
    if walk.norms is None:
        return error
    fresh = walk.rounding(walk.b.op("Add", summed, propagated), g)
    return error, walk.norms.linear(node, x, fresh)


def _weight(walk: Walk, node: ir.Node, value: ir.Value) -> ir.Value:
    if _perturbed(walk, value):
        raise _refused(node, "a weight that depends on the input")
    return walk.magnitude(value)


@rule("MatMul")
def _matmul(walk: Walk, node: ir.Node):
    x, w = node.inputs
    if _perturbed(walk, x) and _perturbed(walk, w):
        raise _refused(node, "a product of two perturbed tensors")
    if _perturbed(walk, x):
        weight, dims = _weight(walk, node, w), static_shape(w)
        return [_linear(walk, node, x, lambda v: walk.b.op("MatMul", v, weight), int(dims[-2] if len(dims) >= 2
                                                                                      else dims[0]))]
    weight = _weight(walk, node, x)
    return [_linear(walk, node, w, lambda v: walk.b.op("MatMul", weight, v), int(static_shape(x)[-1]))]


@rule("Gemm")
def _gemm(walk: Walk, node: ir.Node):
    x, w, c = (list(node.inputs) + [None])[:3]
    if attr(node, "transA", 0):
        raise _refused(node, "transA")
    weight = _weight(walk, node, w)
    alpha, beta = abs(attr(node, "alpha", 1.0)), abs(attr(node, "beta", 1.0))
    trans_b = attr(node, "transB", 0)
    dims = static_shape(w)
    fan_in = int(dims[1] if trans_b else dims[0]) + 2   # the alpha and beta scalings round too
    bias = walk.b.op("Mul", _weight(walk, node, c), walk.c(beta)) if c is not None else None
    return [_linear(walk, node, x, lambda v: walk.b.op("Gemm", v, weight, alpha=alpha, transB=trans_b), fan_in,
                    bias)]


@rule("Conv", "ConvTranspose")
def _conv(walk: Walk, node: ir.Node):
    x, w, bias = (list(node.inputs) + [None])[:3]
    weight = _weight(walk, node, w)
    dims = static_shape(w)
    fan_in = int(np.prod(dims[1:])) if node.op_type == "Conv" else int(dims[0] * np.prod(dims[2:]))
    bias_abs = None
    if bias is not None:
        rank = len(static_shape(x))
        bias_abs = walk.b.op("Reshape", _weight(walk, node, bias), walk.b.ints([-1, *([1] * (rank - 2))]))
    return [_linear(walk, node, x, lambda v: walk.b.copy(node, [v, weight]), fan_in, bias_abs)]


@rule("BatchNormalization")
def _batch_norm(walk: Walk, node: ir.Node):
    x, *params = node.inputs[:5]
    if attr(node, "training_mode", 0):
        raise _refused(node, "training mode (the batch's own statistics)")
    if any(_perturbed(walk, p) or p.const_value is None for p in params):
        raise _refused(node, "parameters that are not constants")
    s, b, m, v = (p.const_value.numpy().astype(np.float64) for p in params)
    factor = s / np.sqrt(v + attr(node, "epsilon", 1e-5))
    shape = [-1, *([1] * (len(static_shape(x)) - 2))]
    times = walk.b.const(np.abs(factor).astype(np.float32).reshape(shape))
    shift = walk.b.const((np.abs(b) + np.abs(m * factor)).astype(np.float32).reshape(shape))
    # y = (x - mean)·factor + bias: a few roundings (sqrt and divide in the factor, subtract, multiply, add).
    return [_linear(walk, node, x, lambda val: walk.b.op("Mul", val, times), 5, shift)]


@rule("Add", "Sub", "Sum")
def _add(walk: Walk, node: ir.Node):
    errors = [walk.errors[v] for v in node.inputs if _perturbed(walk, v)]
    total = errors[0]
    for error in errors[1:]:
        total = walk.b.op("Add", total, error)
    # Each addition rounds once, relative to a sum of at most the terms' magnitudes (plus their errors).
    magnitudes = [walk.magnitude(v) for v in node.inputs]
    summed = magnitudes[0]
    for magnitude in magnitudes[1:]:
        summed = walk.b.op("Add", summed, magnitude)
    g = walk.gamma(len(node.inputs) - 1)
    error = walk.plus(walk.b.op("Mul", total, walk.c(1.0 + g)), summed, g)
    if walk.norms is None:
        return [error]
    fresh = walk.rounding(walk.b.op("Add", summed, total), g)  # g·Σ|x~_i| (+ underflow) bounds the rounding
    return [(error, walk.norms.add(node, fresh))]


@rule("Mul", "Div")
def _scale(walk: Walk, node: ir.Node):
    x, y = node.inputs
    if _perturbed(walk, x) and _perturbed(walk, y):
        if node.op_type == "Div":
            raise _refused(node, "a division by a perturbed tensor")
        return [_product(walk, x, y)]
    if node.op_type == "Div" and not _perturbed(walk, x):
        raise _refused(node, "a division by a perturbed tensor")
    moving, fixed = (x, y) if _perturbed(walk, x) else (y, x)
    factor = walk.magnitude(fixed)
    if node.op_type == "Div":
        if fixed.const_value is None or np.any(fixed.const_value.numpy() == 0):
            raise _refused(node, "a division by a tensor that is not a non-zero constant")
        factor = walk.b.const((1.0 / np.abs(fixed.const_value.numpy().astype(np.float64))).astype(np.float32))
    error = walk.b.op("Mul", walk.errors[moving], factor)
    return [walk.plus(error, walk.magnitude(node.outputs[0]), 3 * walk.unit + walk.weight_rounding * FLOAT32.unit)]


def _product(walk: Walk, x: ir.Value, y: ir.Value) -> ir.Value:
    """x~·y~ - x·y = x·e_y + y·e_x + e_x·e_y, then one rounding of |x~·y~| <= (M_x + E_x)·(M_y + E_y): the gates
    of an unrolled LSTM/GRU (graphcert.unroll) multiply two perturbed tensors (broadcast like the op)."""
    b = walk.b
    ex, ey = walk.errors[x], walk.errors[y]
    mx, my = walk.magnitude(x), walk.magnitude(y)
    error = b.op("Add", b.op("Add", b.op("Mul", mx, ey), b.op("Mul", my, ex)), b.op("Mul", ex, ey))
    computed = b.op("Mul", b.op("Add", mx, ex), b.op("Add", my, ey))
    return walk.plus(error, computed, walk.unit)


@rule("AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum")
def _average(walk: Walk, node: ir.Node):
    x = node.inputs[0]
    if node.op_type == "AveragePool":
        count = int(np.prod(attr(node, "kernel_shape")))
    else:
        dims = static_shape(x)
        axes = _axes(node)
        picked = range(2, len(dims)) if node.op_type == "GlobalAveragePool" else \
            (range(len(dims)) if not axes else [int(i) % len(dims) for i in axes])
        sizes = [dims[i] for i in picked]
        if not all(isinstance(d, int) for d in sizes):
            raise _refused(node, "a reduction over axes of unknown size")
        count = int(np.prod(sizes))
    rest = list(node.inputs[1:])
    error = walk.b.copy(node, [walk.errors[x], *rest])
    summed = walk.b.copy(node, [walk.magnitude(x), *rest])   # the same average (or sum) of the magnitudes
    g = walk.gamma(count + 1)
    return [walk.plus(walk.b.op("Mul", error, walk.c(1.0 + g)), summed, g)]


def _axes(node: ir.Node):
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        return node.inputs[1].const_value.numpy().reshape(-1).tolist()
    return attr(node, "axes", None)


# ---- smooth element-wise ops: Lipschitz constant times E, plus libm's error -------------------------------

SLOPES = {"Sigmoid": 0.25, "Tanh": 1.0, "Softsign": 1.0, "Softplus": 1.0, "Erf": 1.13, "Atan": 1.0}


@rule(*SLOPES, "Elu", "HardSigmoid", "Selu")
def _smooth(walk: Walk, node: ir.Node):
    op = node.op_type
    alpha = abs(attr(node, "alpha", 1.0))
    slope = SLOPES.get(op) or {"Elu": max(1.0, alpha), "HardSigmoid": abs(attr(node, "alpha", 0.2)),
                               "Selu": abs(attr(node, "gamma", 1.0507)) * max(1.0, abs(attr(node, "alpha", 1.6733)))}[op]
    x = node.inputs[0]
    factor = _local_slope(walk, x, op) if op in ("Sigmoid", "Tanh") and x in walk.intervals else walk.c(slope)
    error = walk.b.op("Mul", walk.errors[x], factor)
    return [walk.plus(error, walk.magnitude(node.outputs[0]), (LIBM_ULPS + 3) * walk.unit)]


def _elementwise_family(spec) -> None:
    """Element-wise ops stated in graphcert.ops (`def_elementwise`) with a slope bounded by L everywhere:
    |f(x~) - f(x)| <= L·E plus the library's few ulps, as `_smooth` (unless this module has a tighter rule)."""
    if spec.op_type not in RULES:
        rule(spec.op_type)(_stated_slope)


def _stated_slope(walk: Walk, node: ir.Node):
    slope = ops.ELEMENTWISE[node.op_type].lipschitz(node)
    if slope is None or len(node.inputs) != 1:
        raise _refused(node, "no bound on its slope for these attributes")
    error = walk.b.op("Mul", walk.errors[node.inputs[0]], walk.c(slope * (1 + 2.0 ** -20)))
    return [walk.plus(error, walk.magnitude(node.outputs[0]), (LIBM_ULPS + 3) * walk.unit)]


ops.on_elementwise(_elementwise_family)


def _local_slope(walk: Walk, x: ir.Value, op: str) -> ir.Value:
    """The largest slope of Sigmoid / Tanh between the exact and the computed input, both in [l - E, u + E]:
    the slope at d, the distance of that interval from 0 (both are even and fall with |z|). Bounded above by
    e^-d (Sigmoid: e^-d / (1 + e^-d)^2) and 4·e^-2d (Tanh), which stays a bound where 1 - σ rounds to 0; pushed
    up for exp's rounding, plus 2^-100 where exp underflows, capped by the global slope."""
    b, interval = walk.b, walk.intervals[x]
    interval = interval.materialised() if getattr(interval, "shared", False) else interval
    error = walk.errors[x]
    distance = b.op("Relu", b.op("Max", b.op("Sub", interval.lower, error),
                                 b.op("Neg", b.op("Add", interval.upper, error))))
    rate, scale, cap = (1.0, 1.0, 0.25) if op == "Sigmoid" else (2.0, 4.0, 1.0)
    bound = b.op("Mul", b.op("Exp", b.op("Mul", distance, walk.c(-rate))), walk.c(scale * (1 + 2.0 ** -10)))
    return b.op("Min", b.op("Add", bound, walk.c(2.0 ** -100)), walk.c(cap))


@rule("Softmax")
def _softmax(walk: Walk, node: ir.Node):
    """Softmax is 1/2-Lipschitz from L-inf to L-inf and its outputs lie in [0, 1]. Runtimes subtract the
    maximum first (an error of 2u·M each), then exp, sum n terms and divide."""
    x = node.inputs[0]
    axis = attr(node, "axis", -1)
    dims = static_shape(x)
    n = dims[axis]
    if not isinstance(n, int):
        raise _refused(node, "a softmax over an axis of unknown size")
    b = walk.b
    spread = b.op("Add", walk.errors[x], b.op("Mul", walk.magnitude(x), walk.c(2 * walk.unit)))
    worst = b.reduce("ReduceMax", spread, [axis % len(dims)])
    error = b.op("Mul", worst, walk.c(0.5))
    # The outputs lie in [0, 1]: each of the n + LIBM_ULPS + 2 roundings is at most u (plus η) of 1.
    return [walk.plus(error, b.op("Add", b.op("Mul", walk.magnitude(node.outputs[0]), walk.c(0.0)), walk.c(1.0)),
                      (n + LIBM_ULPS + 2) * walk.unit)]


# ---- the pass --------------------------------------------------------------------------------------------

MAGNITUDE, ERROR, NORM = "_magnitude", "_rounding_error", "_rounding_norm"


def error_graph(model: ir.Model, norm: str = "linf", tighten: bool = True, given: tuple = (),
                widen: bool = True, arithmetic: Arithmetic | None = None) -> ir.Model:
    """A graph whose inputs describe input sets, for every model output y giving `<y>_magnitude` (a bound on |y|
    over the set), `<y>_rounding_error` (a bound on |fl32(y) - y|) and, with `tighten`, `<y>_rounding_norm`
    [batch] (a bound on ||fl32(y) - y||_2 per sample, graphcert.rounding_norms; the elementwise bound is then
    tightened by it at every op). Without `tighten`, E is the plain |W|-product analysis. UnsupportedOpError
    names the nodes it cannot analyse. Input sets: boxes `<x>_lower`/`<x>_upper` (norm "linf"), or L2 balls,
    the point `<x>` and a radius `<x>_radius` [batch] (norm "l2"; magnitudes from the lipschitz pass's
    constants). `given` names values whose intervals over boxes are intersected with bounds fed as inputs
    (graphcert.rounding_given: widened by 2·E there when `widen`), and output as the intervals used.
    `arithmetic`: the one the errors are of (graphcert.arithmetic; default: the model's own, float16 for a
    float16 model); a bound graph's own rounding is analysed in the arithmetic the bound graph runs in."""
    from .passes import ibp
    from .rounding_norms import NormTracker, element_spreads
    result = clone(model)
    graph = result.graph
    sources = perturbed_inputs(result)
    nodes = perturbed_nodes(graph, set(sources))
    check_supported(nodes, RULES, "float32 rounding analysis")
    others = [x for x in sources if x.dtype != ir.DataType.FLOAT]
    if others:  # loaded models compute in float32 (graphcert.dtypes); a raw model of another type is not
        raise UnsupportedOpError("float32 rounding analysis",
                                 {"(input)": [f"{x.name}: the analysis reads models as loaded (float32 inside), "
                                              f"not {x.dtype.name}" for x in others]})
    from .dtypes import META
    loaded_from = model.metadata_props.get(META)
    arithmetic = arithmetic or of_model(model)
    b = Builder(graph, prefix="fp32")
    intervals: dict = {}
    dims = static_shape(sources[0]) if sources else []
    batched = len(dims) >= 2 and not isinstance(dims[0], int)
    tainted = set(sources) | {out for node in nodes for out in node.outputs}
    if norm == "l2":
        from .passes.lipschitz import lipschitz_constants
        constants, _ = lipschitz_constants(model)
        lipschitz = {value.name: float(k) for value, k in constants.items()}
        missing = [n for n in nodes for v in n.outputs if v.name not in lipschitz and v.uses()]
        if missing:
            raise _refused(missing[0], "no Lipschitz constant for its output (L2 balls need one)")
        [x] = sources[:1]
        radius = ir.Value(name=f"{x.name}_radius", type=x.type, shape=ir.Shape(["batch"]))
        graph.inputs.append(radius)
        walk = Walk(b, intervals, lipschitz, radius)
        lipschitz[x.name] = 1.0
        walk.errors[x] = b.op("Mul", x, walk.c(0.0))
        step = None
    else:
        check_supported(nodes, ibp.RULES, "float32 rounding analysis (through IBP)", ibp.accepts)
        walk = Walk(b, intervals)
        cx = ibp.Context(b, False)
        for x in sources:
            lower = ir.Value(name=f"{x.name}_lower", type=x.type, shape=x.shape)
            upper = ir.Value(name=f"{x.name}_upper", type=x.type, shape=x.shape)
            graph.inputs.extend([lower, upper])
            intervals[x] = Interval.from_bounds(b, lower, upper)
            walk.errors[x] = b.op("Mul", lower, walk.c(0.0))   # inputs are given exactly

        def step(node):
            args = [intervals.get(v, v) if v is not None else None for v in node.inputs]
            while args and args[-1] is None:
                args.pop()
            for value, interval in zip(node.outputs, ibp.RULES[node.op_type](cx, node, *args)):
                intervals[value] = interval
    walk.weight_rounding = 1 if loaded_from == "float64" else 0
    walk.arithmetic = arithmetic
    if tighten:
        walk.norms = NormTracker(walk, batched, tainted)
        for x in sources:
            found = walk.norms.l2(walk.errors[x], x)
            if found is not None:
                walk.norms.norms[x] = found
    given_bounds = None
    if given:
        from .rounding_given import GivenBounds
        if norm != "linf":
            raise ValueError("given bounds of intermediate values are for boxes")
        by_name = {out.name: out for node in nodes for out in node.outputs}
        given_bounds = GivenBounds(walk, graph, [by_name[name] for name in given], widen)
    for node in nodes:
        if step is not None:
            step(node)
        elif norm == "l2":
            for value, spread in zip(node.outputs, element_spreads(node, walk.lipschitz, walk.spreads, batched, walk.reach)):
                if spread is not None:
                    walk.spreads[value] = spread
        results = RULES[node.op_type](walk, node)
        errors = walk.norms.after(node, results) if walk.norms is not None else results
        for value, error in zip(node.outputs, errors):
            walk.errors[value] = error
            if given_bounds is not None:
                given_bounds.apply(value)
    originals = list(graph.outputs)
    graph.outputs.clear()
    for y in originals:
        if y not in walk.errors:
            continue
        wanted = [(walk.magnitude(y), MAGNITUDE, y.shape), (walk.errors[y], ERROR, y.shape)]
        if walk.norms is not None and y in walk.norms.norms:
            wanted.append((walk.norms.norms[y], NORM, ir.Shape(["batch"])))
        for value, suffix, shape in wanted:
            named = b.op("Identity", value)
            named.name = f"{y.name}{suffix}"
            named.shape, named.type = shape, y.type
            graph.outputs.append(named)
    if given_bounds is not None:
        given_bounds.outputs(graph)
    for node in reversed(list(graph)):  # the original computation is not needed (a shape read may stay)
        if node in nodes and not any(out.uses() for out in node.outputs):
            graph.remove(node, safe=True)
    return result
