"""Linear-relaxation bounds (CROWN, CROWN-IBP) as a rewrite: backward bound propagation emitted as ONNX.

This module schedules the work: which tensors get intermediate bounds, in graph order, and how the output
bounds are assembled. The backward passes themselves (coefficients, concretisation, the rules of relaxed ops)
are `passes.crown_backward`; which nodes have a rule, `passes.crown_support`; ops without one that IBP bounds
become leaves, `passes.crown_fallback`.

Softmax, LayerNormalization and division by a bounded tensor are first rewritten into primitives with rules
(`passes.crown_products`); products of two bounded tensors are relaxed with planes.

Nonlinear ops are relaxed on the interval of their input. CROWN-IBP takes that interval from IBP; CROWN runs
a backward pass from every such input (identity objective) and intersects it with IBP, except where IBP is
already exact (a single linear layer away from the input). IBP runs alongside on the tightened intervals and
also bounds the outputs; the final bounds are the intersection of both.
"""
from __future__ import annotations

import json

import numpy as np

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graphcert import interval as iv
from graphcert import rounding_leaves
from graphcert.builder import Builder
from graphcert.interface import InputSet, clone, close_outputs, epsilon_name, open_inputs, perturbed_inputs
from graphcert.interpret import perturbed_nodes
from graphcert.interval import Interval
from graphcert.model import static_shape
from graphcert.passes import crown_fallback, crown_products, ibp
from graphcert.passes.crown_backward import (ALPHA_PREFIX, BETA_PREFIX, CONCRETE_SLACK, AlphaInputs,  # noqa: F401
                                             BetaInputs, Context, relax)
from graphcert.passes.crown_support import RELAXED, RULES, batched_inputs, fallbacks, supports  # noqa: F401
from graphcert.passes.relaxations import Lines, WindowMax
from graphcert.passes.spec import MARGINS

ALPHA_INIT_PREFIX = "alpha_init."
# alpha="inputs": a boolean scalar input; true makes every slope CROWN's own adaptive choice (the fed slopes are
# ignored), which gives alpha-CROWN's start, its bounds and (outputs `alpha_init.<unit>`) its slopes, from the
# same graph as its steps.
ALPHA_START = "alpha_start"
# alpha="inputs": each output's linear bounds before they meet IBP's, which alpha-CROWN's steps follow. Where IBP's
# bound is the tighter one at the start, the met bound does not depend on the slopes at all: its gradient is 0 and
# Adam never leaves the start (eran's sigmoid net: most rows of a layer's bounds), though slopes in range can take
# the linear bound far below IBP's.
LINEAR_LOWER_PREFIX, LINEAR_UPPER_PREFIX = "linear_lower.", "linear_upper."
# split_bounds: run-time clamps on the inputs of ReLU units, and the clamped bounds the graph worked with.
SPLIT_LOWER_PREFIX, SPLIT_UPPER_PREFIX = "split_lower.", "split_upper."
CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX = "clamped_lower.", "clamped_upper."
# Units whose input z branch and bound may split: a ReLU's relaxation is exact on either side of 0; an S-shaped
# unit's lines tighten on each part of a split interval (`graphcert.verify.relu_bab`).
SPLIT_UNITS = {"Relu", "Sigmoid", "Tanh"}
# beta: run-time split signs of split unit inputs (their multipliers: `crown_backward.BETA_PREFIX`).
SPLIT_SIGN_PREFIX = "split_sign."
# input_coefficients: the margins' lower bounds as linear functions of each perturbed input, before concretising.
INPUT_COEFFICIENTS_PREFIX = "margins_coefficients."

# How IBP bounds of a tensor compare with the best linear bounds: exact for ops that only move or scale single
# input elements (POINTWISE) and after one linear layer on such a tensor (AFFINE); otherwise possibly loose.
POINTWISE, AFFINE, LOOSE = 0, 1, 2
_MOVING = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Pad"}
_SCALING = {"Neg", "BatchNormalization", "Add", "Sub", "Mul", "Div"}
_MIXING = {"Gemm", "MatMul", "Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool"}


def _meet(b: Builder, tighter: str, linear: ir.Value, interval: ir.Value) -> ir.Value:
    """The tighter ("Max" of lower bounds, "Min" of upper bounds) of a linear and an interval bound, or the one
    that is not NaN (inf - inf after an overflow; onnxruntime's Max and Min propagate NaN)."""
    linear = b.op("Where", b.op("IsNaN", linear), interval, linear)
    return b.op("Where", b.op("IsNaN", interval), linear, b.op(tighter, linear, interval))


# Element-wise ops non-decreasing on the whole line: f over an element's exact range [l, u] is exactly
# [f(l), f(u)], so IBP stays exact through them (no backward pass can do better, and one from a wide layer costs
# an identity over its units: 23,328^2 coefficients after a 32x27x27 convolution).
_POINTWISE_MONOTONE = set(ibp.MONOTONE) - {"MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin"}


# A backward pass holds coefficients [rows, batch, *tensor] for every tensor it walks through, rows being the
# bounded tensor's elements (twice that for both bounds). A pass whose largest such tensor would exceed this many
# bytes per sample is not built: the tensor keeps its IBP interval (sound, if looser). Decided from the shapes
# before any node is emitted; onnxruntime holds a few tensors of that size at once (slopes, their product).
MAX_PASS_BYTES = 1 << 27


def _elements(value: ir.Value, batched: bool) -> int | None:
    """Elements per sample of a tensor (None: a run-time sample shape)."""
    dims = static_shape(value)
    sample = dims[1:] if batched and dims else dims
    if not all(isinstance(d, int) for d in sample):
        return None
    return int(np.prod(sample, dtype=np.int64))


class _Reach:
    """For each perturbed tensor, the most elements per sample of any tensor a backward pass from it walks
    through (itself, its perturbed ancestors back to the inputs or to IBP leaves, and what a rule spreads its
    coefficients over on the way), so a pass's size is known before it is built."""

    def __init__(self, batched: bool):
        self.batched = batched
        self.widest: dict[ir.Value, int] = {}

    def of(self, value: ir.Value) -> int:
        if value not in self.widest:
            self.widest[value] = _elements(value, self.batched) or 0
        return self.widest[value]

    def step(self, node, cx: Context) -> None:
        """Record the node's outputs (after the pass has walked it forward)."""
        widest = 0
        if node in cx.decomposed:
            widest = self.of(cx.decomposed[node])
        elif node not in cx.fallback:
            widest = max([self.of(v) for v in node.inputs if v is not None and v in cx.perturbed], default=0)
            if node.op_type == "MaxPool" and isinstance(cx.relaxed.get(node), WindowMax):
                # the window max spreads each output's coefficient over its kernel: [rows, batch, C, K, *out]
                kernel = int(np.prod(cx.relaxed[node].geometry.kernel))
                widest = max(widest, kernel * (_elements(node.outputs[0], self.batched) or 0))
        for out in node.outputs:
            self.widest[out] = max(widest, _elements(out, self.batched) or 0)

    def fits(self, value: ir.Value, both: bool) -> bool:
        """Whether the largest coefficient tensor of a pass bounding `value` stays within MAX_PASS_BYTES."""
        count = _elements(value, self.batched)
        if count is None:   # a run-time number of margins ([batch, n]): rows known only when it runs
            return True
        rows = count * (2 if both else 1)
        return 4 * rows * self.of(value) <= MAX_PASS_BYTES


def _exactness(node: ir.Node, state: dict, perturbed: set) -> int:
    # A rounding leaf is an independent input: y + r is as exact as y (`graphcert.rounding_leaves`).
    inputs = [v for v in node.inputs if v is not None and v in perturbed and not rounding_leaves.is_leaf(v)]
    if len(inputs) != 1:
        return LOOSE
    before = state[inputs[0]]
    if node.op_type in _MOVING or (node.op_type in _SCALING
                                   and static_shape(inputs[0]) == static_shape(node.outputs[0])):
        return before
    if node.op_type in _POINTWISE_MONOTONE and inputs[0] is node.inputs[0] \
            and ibp.CONDITIONS.get(node.op_type, lambda n: True)(node) \
            and static_shape(inputs[0]) == static_shape(node.outputs[0]):
        return before   # (the condition: the attributes keep the op non-decreasing, as IBP's monotone rule asks)
    if node.op_type in _MIXING and before == POINTWISE:
        return AFFINE
    return LOOSE


class CrownPass(ir.passes.FunctionalPass):
    """Normalised model in, linear-relaxation bound graph out (same interface as `passes.ibp.IntervalPass`).

    intermediate: "crown" (full CROWN) or "ibp" (CROWN-IBP) bounds on the inputs of nonlinear ops.
    norm: "linf" (the input set's box) or "l2" (epsilon is the L2 radius around x; needs a linf input set).
    crown_upper: bound output maxima by CROWN too (twice the rows); None means for every output except the
        spec pass's `margins`, whose upper bounds then come from IBP (proofs only need margin lower bounds).
    alpha: "inputs" makes the lower slope of every ReLU-like unit a graph input per backward pass
        (`alpha.<n>`, shape [rows, *unit shape], projected onto its valid range in the graph; metadata
        `graphcert.alpha` maps each to its unit), adds the switch input ALPHA_START (true: CROWN's own slopes
        instead of those fed) and outputs `alpha_init.<unit>` with CROWN's adaptive choice, the starting
        point of alpha-CROWN.
    split_bounds: "clamp" adds, for the input z of every SPLIT_UNITS op, graph inputs `split_lower.<z>` /
        `split_upper.<z>` (shaped like z) that its bounds are intersected with before the Relu is relaxed,
        and outputs `clamped_lower.<z>` / `clamped_upper.<z>` with the intersection (metadata
        `graphcert.splits`: the z names in graph order). Feeding -inf / +inf gives plain CROWN; feeding 0 as
        the lower (upper) clamp bounds only the inputs whose z is >= 0 (<= 0) there, which is how ReLU
        branch and bound splits. A clamped lower above the clamped upper means no input of the set meets
        the clamps. "given" is the same without CROWN passes for those z: the inputs, which must then be
        sound bounds of z (say, clamped bounds from "clamp"), take their place (intersected with IBP), and
        only the outputs are bounded by CROWN, a far cheaper graph.
    beta: with split_bounds, beta-CROWN's multipliers of the split constraints in the backward passes that
        bound the outputs (not in those of intermediate bounds): inputs `split_sign.<z>` (shaped like z: +1
        where the domain has z >= its lower bound, -1 where z <= its upper bound, the bounds the relaxation
        uses: for a ReLU split at 0, z >= 0 or z <= 0; 0 for no constraint) and, per output pass, `beta.<n>`
        (shape [rows, *z shape]; metadata `graphcert.beta` maps each to its z). The bound then holds for
        every beta >= 0 (the caller keeps them so); beta = 0 gives the bounds of the graph without them.
    intermediate_rows: {name of a relaxed op's input: flat element indices}: that input's backward pass bounds
        only those elements (none: no pass), the others keeping their IBP interval (and run-time clamps, with
        split_bounds "clamp"): alpha-CROWN then optimises the bounds of units the clamps leave unstable only,
        at a fraction of the cost of every unit's (inputs not named: every element).
    input_coefficients: outputs `margins_coefficients.<x>` ([rows, batch, *x sample shape]) with the
        coefficients A of each perturbed input x in the spec margins' lower bounds (A·x + terms free of x,
        minimised over the box): which input dimensions the bound leans on (|A|·width), for input splitting.
    """

    def __init__(self, input_set: InputSet | None = None, keep_original: bool = True, trainable: bool = False,
                 intermediate: str = "crown", norm: str = "linf", crown_upper: bool | None = None,
                 alpha: str | None = None, split_bounds: str | None = None, beta: bool = False,
                 input_coefficients: bool = False, intermediate_rows: dict[str, np.ndarray] | None = None):
        super().__init__()
        if alpha not in (None, "inputs"):
            raise ValueError(f"alpha is None or 'inputs', not {alpha!r}")
        if split_bounds not in (None, "clamp", "given"):
            raise ValueError(f"split_bounds is None, 'clamp' or 'given', not {split_bounds!r}")
        if beta and split_bounds is None:
            raise ValueError("beta multiplies split constraints: it needs split_bounds")
        if intermediate not in ("crown", "ibp"):
            raise ValueError(f"intermediate bounds come from 'crown' or 'ibp', not {intermediate!r}")
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', not {norm!r}")
        self.input_set = input_set or InputSet()
        if norm == "l2" and self.input_set.kind != "linf":
            raise ValueError("an L2 ball needs the 'linf' input set (its epsilon becomes the L2 radius)")
        self.keep_original = keep_original
        self.trainable = trainable
        self.intermediate = intermediate
        self.norm = norm
        self.crown_upper = crown_upper
        self.alpha = alpha
        self.split_bounds = split_bounds
        self.beta = beta
        self.input_coefficients = input_coefficients
        self.intermediate_rows = dict(intermediate_rows or {})
        self.method = "crown" if intermediate == "crown" else "crown-ibp"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Rules need shapes, also of nodes added by earlier passes (the spec pass leaves them to inference).
        result = ShapeInferencePass()(clone(model)).model
        graph = result.graph
        sources = perturbed_inputs(result)
        nodes = perturbed_nodes(graph, set(sources))
        batched = batched_inputs(sources)
        tainted = set(sources) | {out for node in nodes for out in node.outputs}
        fallback = fallbacks(result, nodes, self.method, sources, tainted)
        b = Builder(graph, prefix=self.method.replace("-", "_"))
        epsilon_names = {x.name: epsilon_name(result, x) for x in sources}
        boxes = open_inputs(result, b, self.input_set)
        for original, source in zip(sources, boxes):  # a box's center stands in for the input: same shape
            source.shape, source.type = original.shape, original.type
        perturbed = set(boxes) | {out for node in nodes for out in node.outputs}
        cx = Context(b, batched, perturbed, boxes, self.norm)
        if self.norm == "l2":
            by_name = {v.name: v for v in graph.inputs}
            cx.epsilons = {x.name: by_name[epsilon_names[x.name]] for x in boxes}
            # The ball of radius r (the largest epsilon entry) lies in the box x ± r, not in x ± epsilon.
            for x in boxes:
                boxes[x] = cx.l2_box(x, self.input_set.domain)
        if self.alpha == "inputs":
            switch = ir.Value(name=ALPHA_START, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
            graph.inputs.append(switch)
            cx.alpha = AlphaInputs(graph, switch)
        if self.trainable:
            cx.support = None
        cx.fallback = set(fallback)

        intervals = _Intervals(b, self.trainable, boxes)
        reach = _Reach(batched)
        exposed: dict[str, tuple[ir.Value, ir.Shape]] = {}
        splits: list[str] = []
        index = 0
        while index < len(nodes):
            node = nodes[index]
            if node in cx.fallback:
                self._leaf(cx, intervals, reach, nodes, index)
                reach.step(node, cx)
                index += 1
                continue
            if node not in cx.decomposed and crown_products.decomposes(node, perturbed):
                # Walk the primitives first; the node itself then hands its coefficients to their result.
                parts, cx.decomposed[node] = crown_products.decompose(b, node, intervals.env)
                perturbed.update(part.outputs[0] for part in parts)
                nodes[index:index] = parts
                continue
            # A decomposed op (a pair MaxPool) is bounded through its primitives, not relaxed itself.
            needs = [] if node in cx.decomposed else crown_products.relaxed_inputs(node, perturbed)
            split = self.split_bounds is not None and node.op_type in SPLIT_UNITS
            for x in needs:
                # IBP is exact up to one linear layer on a box, never on an L2 ball.
                loose = intervals.exactness[x] == LOOSE or self.norm == "l2"
                given = split and self.split_bounds == "given"
                picked = self.intermediate_rows.get(x.name)
                if self.intermediate == "crown" and loose and x not in intervals.tightened and not given \
                        and crown_fallback.boundable(x, cx.batched) and reach.fits(x, both=True) \
                        and (picked is None or len(picked)):
                    lower, upper = cx.bound(nodes[:index], x, both=True, rows=picked)
                    intervals.tighten(x, lower, upper)
            if split and needs[0].name not in splits:
                x = needs[0]
                splits.append(x.name)
                lower, upper = intervals.clamp(x, _split_input(graph, SPLIT_LOWER_PREFIX, x),
                                               _split_input(graph, SPLIT_UPPER_PREFIX, x))
                exposed[CLAMPED_LOWER_PREFIX + x.name] = (lower, x.shape)
                exposed[CLAMPED_UPPER_PREFIX + x.name] = (upper, x.shape)
                if self.beta:
                    cx.split_signs[node] = _split_input(graph, SPLIT_SIGN_PREFIX, x)
                    cx.split_points[node] = (lower, upper)
            if needs:
                cx.relaxed[node] = relax(cx, node, *(intervals.env[x] for x in needs))
                if self.alpha == "inputs" and isinstance(cx.relaxed[node], Lines) \
                        and cx.relaxed[node].adaptive_alpha is not None:
                    exposed[f"{ALPHA_INIT_PREFIX}{node.outputs[0].name}"] = (cx.relaxed[node].adaptive_alpha,
                                                                            node.outputs[0].shape)
            intervals.step(node, perturbed)
            reach.step(node, cx)
            if node in cx.decomposed:   # the op's own IBP rule may be tighter than IBP through the primitives
                found = intervals.env[cx.decomposed[node]]
                intervals.meet(node.outputs[0], found.lower, found.upper)
            index += 1

        bounds = {}
        if self.beta:
            cx.beta = BetaInputs(graph)
        for out in graph.outputs:
            if out not in intervals.env:
                continue
            both = self.crown_upper if self.crown_upper is not None else out.name != MARGINS
            if out in cx.leaf_intervals or not crown_fallback.boundable(out, batched) or not reach.fits(out, both):
                # A leaf's own interval is what CROWN would find; outputs a backward pass cannot bound (boolean,
                # integer, another float type, a run-time sample shape) or whose pass would not fit keep their IBP
                # interval, as IBP gives it.
                box = iv.as_interval(b, intervals.env[out])
                bounds[out.name] = ibp._as_float(b, graph, out.name, box)   # as the IBP pass gives it
                continue
            coefficients = self.input_coefficients and out.name == MARGINS and not both
            cx.input_coefficients = {} if coefficients else None
            lower, upper = cx.bound(nodes, out, both)
            if coefficients:
                names = {source: original.name for original, source in zip(sources, boxes)}
                for x, part in cx.input_coefficients.items():
                    exposed[INPUT_COEFFICIENTS_PREFIX + names[x]] = (part, ir.Shape([out.shape[-1], *x.shape]))
                cx.input_coefficients = None
            if self.alpha == "inputs" and out.type is not None and out.type.dtype == ir.DataType.FLOAT:
                exposed[LINEAR_LOWER_PREFIX + out.name] = (lower, out.shape)
                if both:
                    exposed[LINEAR_UPPER_PREFIX + out.name] = (upper, out.shape)
            box = intervals.env[out]
            bounds[out.name] = (_meet(b, "Max", lower, box.lower),
                                _meet(b, "Min", upper, box.upper) if both else box.upper)
        close_outputs(result, b, bounds, self.keep_original, self.method)
        if fallback:
            result.metadata_props["graphcert.fallback"] = json.dumps({n.name: why for n, why in fallback.items()})
        for name, (value, shape) in exposed.items():
            _expose(graph, b, name, value, shape)
        if self.split_bounds is not None:
            result.metadata_props["graphcert.splits"] = json.dumps(splits)
        if cx.beta is not None:
            result.metadata_props["graphcert.beta"] = json.dumps(cx.beta.units)
        if cx.alpha is not None:
            result.metadata_props["graphcert.alpha"] = json.dumps(cx.alpha.units)
            result.metadata_props["graphcert.method"] = "alpha-" + self.method
        return ir.passes.PassResult(result, modified=True)


    def _leaf(self, cx: Context, intervals: "_Intervals", reach: _Reach, nodes: list[ir.Node], index: int) -> None:
        """A fallback node: IBP on its inputs' intervals (tightened by CROWN where IBP may be loose, as for a
        relaxed op's input); its outputs become leaves, whose IBP interval is exactly what CROWN would find."""
        node = nodes[index]
        # A rounding leaf's interval is only a magnitude bound (a few ulps of its op's inputs): a backward pass
        # per input to tighten it would double the passes for nothing worth having.
        if self.intermediate == "crown" and node.op_type != rounding_leaves.OP_TYPE:
            for x in dict.fromkeys(v for v in node.inputs if v is not None and v in cx.perturbed):
                loose = intervals.exactness.get(x, LOOSE) == LOOSE or self.norm == "l2"
                if loose and x not in intervals.tightened and crown_fallback.boundable(x, cx.batched) \
                        and reach.fits(x, both=True):
                    lower, upper = cx.bound(nodes[:index], x, both=True)
                    intervals.tighten(x, lower, upper)
        intervals.step(node, cx.perturbed)
        for out in node.outputs:
            if out in intervals.env:
                cx.leaf_intervals[out] = iv.as_interval(cx.b, intervals.env[out])
                intervals.exactness[out] = POINTWISE
                intervals.tightened.add(out)


class _Intervals:
    """IBP alongside the backward passes, on intervals tightened by them, and how exact each interval is."""

    def __init__(self, b: Builder, trainable: bool, boxes: dict):
        self.b = b
        self.ibp = ibp.Context(b, trainable)
        self.env = dict(boxes)
        self.exactness = {v: POINTWISE for v in boxes}
        self.tightened: set = set()

    def tighten(self, value: ir.Value, lower: ir.Value, upper: ir.Value) -> None:
        """Intersect with CROWN bounds, and remember that they were taken."""
        self.meet(value, lower, upper)
        self.tightened.add(value)

    def meet(self, value: ir.Value, lower: ir.Value, upper: ir.Value) -> None:
        b = self.b
        box = self.env[value]
        self._set(value, _meet(b, "Max", lower, box.lower), _meet(b, "Min", upper, box.upper))

    def clamp(self, value: ir.Value, lower: ir.Value, upper: ir.Value) -> tuple[ir.Value, ir.Value]:
        """Intersect with run-time clamps; the intersection as computed, before the order repair of `_set`."""
        b = self.b
        box = self.env[value]
        lower, upper = b.op("Max", box.lower, lower), b.op("Min", box.upper, upper)
        self._set(value, lower, upper)
        return lower, upper

    def _set(self, value: ir.Value, lower: ir.Value, upper: ir.Value) -> None:
        b = self.b
        # Rounding can cross bounds that are (nearly) equal; relaxations need lower <= upper.
        self.env[value] = Interval.from_bounds(b, b.op("Min", lower, upper), b.op("Max", lower, upper))

    def step(self, node: ir.Node, perturbed: set) -> None:
        args = [self.env.get(v, v) if v is not None else None for v in node.inputs]
        while args and args[-1] is None:
            args.pop()
        outs = ibp.RULES[node.op_type](self.ibp, node, *args)
        self.env.update(zip(node.outputs, outs))
        self.exactness[node.outputs[0]] = _exactness(node, self.exactness, perturbed)


def _split_input(graph: ir.Graph, prefix: str, like: ir.Value) -> ir.Value:
    value = ir.Value(name=prefix + like.name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(like.shape)))
    graph.inputs.append(value)
    return value


def _expose(graph: ir.Graph, b: Builder, name: str, value: ir.Value, shape: ir.Shape) -> None:
    named = b.op("Identity", value)
    named.name = name
    named.type = ir.TensorType(ir.DataType.FLOAT)
    named.shape = shape
    graph.outputs.append(named)
