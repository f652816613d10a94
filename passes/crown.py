"""Linear-relaxation bounds (CROWN, CROWN-IBP) as a rewrite: backward bound propagation emitted as ONNX.

A lower bound on linear objectives of a tensor is carried backward through the graph as coefficients
(`passes.adjoints`: one adjoint per linear op; `passes.relaxations`: lines for nonlinear ops) down to the
perturbed inputs, and concretised over the input set: A·center - |A|·radius for a box, A·x - eps·||A||_2 for
an L2 ball. Upper bounds are lower bounds of the negated objective, stacked as extra rows.

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

from graphcert.builder import Builder
from graphcert.interface import InputSet, clone, close_outputs, epsilon_name, open_inputs, perturbed_inputs
from graphcert import interval as iv
from graphcert.interpret import NO_RULE, UNMET, RuleTable, attr, perturbed_nodes, raise_refused
from graphcert.interval import Interval
from graphcert.model import static_shape
from graphcert.passes import crown_fallback, crown_products, ibp, relaxations
from graphcert.passes.adjoints import ADJOINTS, Geometry, fold_leading, trailing, unbroadcast, unfold_leading
from graphcert.passes.crown_support import RELAXED, acceptor, batched_inputs, fallbacks, supports  # noqa: F401
from graphcert.passes.relaxations import Lines, Planes, WindowMax
from graphcert.passes.spec import MARGINS

ALPHA_PREFIX = "alpha."
ALPHA_INIT_PREFIX = "alpha_init."
# split_bounds: run-time clamps on the inputs of ReLU units, and the clamped bounds the graph worked with.
SPLIT_LOWER_PREFIX, SPLIT_UPPER_PREFIX = "split_lower.", "split_upper."
CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX = "clamped_lower.", "clamped_upper."
# Units whose input z branch and bound may split: a ReLU's relaxation is exact on either side of 0; an S-shaped
# unit's lines tighten on each part of a split interval (`graphcert.verify.relu_bab`).
SPLIT_UNITS = {"Relu", "Sigmoid", "Tanh"}
# beta: run-time split signs of ReLU inputs and the multipliers of the split constraints (beta-CROWN).
SPLIT_SIGN_PREFIX, BETA_PREFIX = "split_sign.", "beta."

# Relative slack for the float error of concretising A·x over the input set (see `Context.concretise`).
CONCRETE_SLACK = 2.0 ** -21

# How IBP bounds of a tensor compare with the best linear bounds: exact for ops that only move or scale single
# input elements (POINTWISE) and after one linear layer on such a tensor (AFFINE); otherwise possibly loose.
POINTWISE, AFFINE, LOOSE = 0, 1, 2
_MOVING = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Pad"}
_SCALING = {"Neg", "BatchNormalization", "Add", "Sub", "Mul", "Div"}
_MIXING = {"Gemm", "MatMul", "Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool"}


class Context:
    """What backward rules share: the builder, which values are perturbed, the relaxations made so far."""

    def __init__(self, b: Builder, batched: bool, perturbed: set, boxes: dict, norm: str):
        self.b = b
        self.batched = batched
        self.perturbed = perturbed
        self.boxes = boxes
        self.norm = norm
        self.relaxed: dict[ir.Node, Lines | WindowMax | Planes] = {}
        # Ops rewritten into primitives (`passes.crown_products`) -> the primitive value holding their output.
        self.decomposed: dict[ir.Node, ir.Value] = {}
        # alpha-CROWN: the free lower slopes of the current backward pass (None: CROWN's adaptive slopes).
        self.alpha: AlphaInputs | None = None
        # beta-CROWN: the split sign input of each split ReLU, and the multipliers of the current backward pass
        # (None: no split constraint enters the bound).
        self.split_signs: dict[ir.Node, ir.Value] = {}
        self.beta: BetaInputs | None = None
        self.epsilons: dict[str, ir.Value] = {}
        # Builder values with the full shape of the tensor they go with (relaxation intercepts).
        self.full_shaped: set[ir.Value] = set()
        # Identity-start coefficients -> whether they stack the negated identity below (upper bounds).
        self.identities: dict[ir.Value, bool] = {}
        # Coefficients of [batch, n] tensors that are zero outside the given unit indices (dead ReLUs), for
        # linear adjoints to multiply only the live part; off (None) for training graphs, which keep to ops
        # every training backend differentiates.
        self.support: dict[ir.Value, ir.Value] | None = {}
        self.alive: dict[ir.Node, ir.Value] = {}
        self._slackened: dict[Interval, ir.Value] = {}
        # 0/1 flags of relaxed ops' infinite range ends (see `infinite_ends`), full-shaped like intercepts.
        self.unbounded: set[ir.Value] = set()
        # Nodes bounded by IBP and treated as leaves (`passes.crown_fallback`): their outputs' intervals, and
        # the leaf boxes made of them on first use.
        self.fallback: set[ir.Node] = set()
        self.leaf_intervals: dict[ir.Value, Interval] = {}
        self._leaves: dict[ir.Value, crown_fallback.Leaf] = {}

    @property
    def lead(self) -> int:
        """Leading axes of a coefficient tensor before the tensor's own sample axes: rows (and batch)."""
        return 2 if self.batched else 1

    def fit(self, coef: ir.Value, value: ir.Value, out: ir.Value) -> ir.Value:
        """Coefficients of a broadcasting op's output, summed to the shape of a perturbed input."""
        return unbroadcast(self.b, coef, value, out) if value in self.perturbed else coef

    def contract(self, coef: ir.Value, value: ir.Value, like: ir.Value | None = None) -> ir.Value:
        """sum over sample axes of coef·value ([rows, batch]), for coefficients of `like` (the tensor value
        broadcasts to), as a matrix product where the shapes allow one."""
        b = self.b
        if value in self.full_shaped or (like is not None and _same_sample_shape(value, like, self.batched)):
            return self._per_sample_product(coef, value)
        dims = static_shape(value)
        sample_rank = len(static_shape(like)) - (1 if self.batched else 0) if like is not None else None
        if sample_rank == 1 and len(dims) == 1 and isinstance(dims[0], int) and dims[0] > 1:
            # [n, 1] rather than [n]: onnxruntime multiplies by a vector operand many times slower.
            column = b.op("Unsqueeze", value, b.ints([1]))
            return b.op("Squeeze", b.op("MatMul", coef, column), b.ints([-1]))
        flat = b.op("Reshape", b.op("Mul", coef, value), b.ints([0] * self.lead + [-1]))
        return b.reduce("ReduceSum", flat, [self.lead], keepdims=0)

    def _per_sample_product(self, coef: ir.Value, value: ir.Value) -> ir.Value:
        """contract for a value with the tensor's full sample shape: [batch, rows, n] @ [batch, n, 1]."""
        b = self.b
        if not self.batched:
            product = b.op("MatMul", b.op("Reshape", coef, b.ints([0, -1])), b.op("Reshape", value, b.ints([-1, 1])))
            return b.op("Squeeze", product, b.ints([1]))
        per_sample = b.op("Transpose", b.op("Reshape", coef, b.ints([0, 0, -1])), perm=[1, 0, 2])
        product = b.op("MatMul", per_sample, b.op("Reshape", value, b.ints([0, -1, 1])))
        return b.op("Transpose", b.op("Squeeze", product, b.ints([2])), perm=[1, 0])

    def live_product(self, coef: ir.Value, matrix: ir.Value) -> ir.Value:
        """coef @ matrix ([n, k]), skipping the units where coef is known to be zero."""
        b = self.b
        live = self.support.get(coef) if self.support is not None else None
        if live is None:
            return b.op("MatMul", coef, matrix)
        return b.op("MatMul", b.op("Gather", coef, live, axis=-1), b.op("Gather", matrix, live, axis=0))

    def identity_product(self, coef: ir.Value, matrix: ir.Value) -> ir.Value | None:
        """identity-start coefficients times a [n, k] matrix without the product: the matrix (and its
        negation) as rows. None when coef is not an identity start."""
        if coef not in self.identities:
            return None
        b = self.b
        rows = b.op("Concat", matrix, b.op("Neg", matrix), axis=0) if self.identities[coef] else matrix
        return b.op("Unsqueeze", rows, b.ints([1])) if self.batched else rows

    def backward(self, nodes: list[ir.Node], start: ir.Value, coef: ir.Value) -> ir.Value:
        """Lower bounds [rows, batch] of coef·start over the input set."""
        b = self.b
        pending = {start: coef}
        bias = None
        reach = None   # > 0 where the bound leans on an infinite end of a relaxed op's range
        for node in reversed(nodes):
            if node in self.fallback:   # a leaf: every output's coefficients end here
                steps = [(out, lambda cx, node, coef, out=out: cx.leaf_backward(out, coef))
                         for out in node.outputs if out in pending]
            elif node.outputs[0] not in pending:
                continue
            elif node in self.relaxed:
                steps = [(node.outputs[0], _relaxed_backward)]
            elif node in self.decomposed:
                steps = [(node.outputs[0], _decomposed_backward)]
            else:
                steps = [(node.outputs[0], ADJOINTS[node.op_type])]
            for out, rule in steps:
                for value, part in rule(self, node, pending.pop(out)):
                    if value in self.perturbed:
                        pending[value] = part if value not in pending else b.op("Add", pending[value], part)
                    elif value in self.unbounded:
                        term = self.contract(part, value, like=out)
                        reach = term if reach is None else b.op("Add", reach, term)
                    else:
                        term = self.contract(part, value, like=out)
                        bias = term if bias is None else b.op("Add", bias, term)
        for source, part in pending.items():
            term = self.concretise(source, part)
            bias = term if bias is None else b.op("Add", bias, term)
        if reach is not None:
            bias = b.op("Where", b.op("Greater", reach, b.const(0.0)), b.const(-np.inf), bias)
        return bias

    def leaf_backward(self, out: ir.Value, coef: ir.Value) -> list:
        """A fallback node's output: coefficients concretised over its IBP interval (`passes.crown_fallback`)."""
        if out not in self._leaves:
            self._leaves[out] = crown_fallback.leaf(self.b, self.leaf_intervals[out])
        return crown_fallback.leaf_backward(self, self._leaves[out], coef)

    def infinite_ends(self, lower_flag: ir.Value | None, upper_flag: ir.Value | None, coef: ir.Value) -> list:
        """Pairs that make a lower bound -inf where a positive coefficient meets a lower end of -inf or a
        negative one an upper end of +inf (flags from `relaxations.unbounded`)."""
        pairs = []
        for flag, weight in ((lower_flag, coef), (upper_flag, self.b.op("Neg", coef))):
            if flag is not None:
                self.unbounded.add(flag)
                pairs.append((flag, self.b.op("Relu", weight)))
        return pairs

    def concretise(self, source: ir.Value, coef: ir.Value) -> ir.Value:
        b = self.b
        if self.norm == "l2":
            # min over ||x' - x||_2 <= eps of A·x' is A·x - eps·||A||_2 (the dual norm of L2 is L2).
            squares = b.op("Reshape", b.op("Mul", coef, coef), b.ints([0] * self.lead + [-1]))
            norm = b.op("Sqrt", b.reduce("ReduceSum", squares, [self.lead], keepdims=0))
            # Rounding slack of A·x: a few ulps of |A|·|x| <= ||A||_2·||x||_2 (see `_radius_with_slack`).
            size = b.op("Sqrt", b.reduce("ReduceSum", b.op("Reshape", b.op("Mul", source, source),
                                                            b.ints([0 if self.batched else 1, -1])), [1], keepdims=0))
            reach = b.op("Add", self.radius_l2(source), b.op("Mul", size, b.const(CONCRETE_SLACK)))
            return b.op("Sub", self._per_sample_product(coef, source), b.op("Mul", norm, reach))
        box = self.boxes[source]
        return b.op("Sub", self._per_sample_product(coef, box.center),
                    self._per_sample_product(b.op("Abs", coef), self._radius_with_slack(box)))

    def _radius_with_slack(self, box: Interval) -> ir.Value:
        """The box radius plus a few ulps of the centre: |A|·(r + s·|c|) also covers the rounding of A·c, which
        cancels where the input is large and the coefficients sum to about zero (a softmax at 1e4)."""
        if box not in self._slackened:
            b = self.b
            self._slackened[box] = b.op("Add", box.radius, b.op("Mul", b.op("Abs", box.center), b.const(CONCRETE_SLACK)))
        return self._slackened[box]

    def l2_box(self, source: ir.Value, domain: tuple[float, float] | None) -> Interval:
        """The box x ± r around the L2 ball of radius r (per sample), clipped to the data domain like IBP's."""
        b = self.b
        rank = len(static_shape(source))
        radius = b.op("Reshape", self.radius_l2(source), b.ints([-1] + [1] * (rank - 1) if self.batched else [1] * rank))
        lower, upper = b.op("Sub", source, radius), b.op("Add", source, radius)
        if domain is not None:
            lower = b.op("Clip", lower, b.const(domain[0]))
            upper = b.op("Clip", upper, None, b.const(domain[1]))
        return Interval.from_bounds(b, lower, upper)

    def radius_l2(self, source: ir.Value) -> ir.Value:
        """The L2 radius per sample: the largest epsilon entry of the sample (epsilon broadcasts like x)."""
        b = self.b
        eps = self.epsilons[source.name]
        if not self.batched:
            return b.reduce("ReduceMax", b.op("Reshape", eps, b.ints([1, -1])), [1], keepdims=0)
        return b.reduce("ReduceMax", b.op("Reshape", eps, b.ints([0, -1])), [1], keepdims=0)

    def bound(self, nodes: list[ir.Node], value: ir.Value, both: bool) -> tuple[ir.Value, ir.Value | None]:
        """CROWN lower (and upper) bounds of every element of `value`, shaped like it."""
        b = self.b
        dims = static_shape(value)
        sample = dims[1:] if self.batched else dims
        if all(isinstance(d, int) for d in sample):
            count = int(np.prod(sample))
            n = b.const(np.array(count, dtype=np.int64), dtype=np.int64)
            halves = b.ints([count, count])
            rows_dim = 2 * count if both else count
        else:  # a run-time number of margins: [batch, rows]
            n_1d = b.op("Shape", value, start=1, end=2)
            n = b.op("Squeeze", n_1d, b.ints([0]))
            halves = b.op("Concat", n_1d, n_1d, axis=0)
            rows_dim = None
        if self.alpha is not None:
            self.alpha.start(rows_dim)
        if self.beta is not None:
            self.beta.start(rows_dim)
        index = b.op("Range", b.const(np.array(0, dtype=np.int64), dtype=np.int64), n,
                     b.const(np.array(1, dtype=np.int64), dtype=np.int64))
        eye = b.op("Cast", b.op("Equal", b.op("Unsqueeze", index, b.ints([1])), b.op("Unsqueeze", index, b.ints([0]))),
                   to=ir.DataType.FLOAT)
        rows = b.op("Concat", eye, b.op("Neg", eye), axis=0) if both else eye
        if self.batched and len(sample) == 1:
            coef = b.op("Unsqueeze", rows, b.ints([1]))
            self.identities[coef] = both
        else:
            coef = b.op("Reshape", rows, b.ints([-1] + ([1] if self.batched else []) + list(sample)))
            if not self.batched and len(sample) == 1:
                self.identities[coef] = both
        result = self.backward(nodes, value, coef)
        if not both:
            return self._shaped(result, sample), None
        lower, negated_upper = b.op("Split", result, halves, axis=0, num_outputs=2)
        return self._shaped(lower, sample), self._shaped(b.op("Neg", negated_upper), sample)

    def _shaped(self, rows: ir.Value, sample: list) -> ir.Value:
        """[n, batch] -> [batch, *sample] (or [n] -> sample without a batch)."""
        b = self.b
        if not self.batched:
            return b.op("Reshape", rows, b.ints(sample))
        per_sample = b.op("Transpose", rows, perm=[1, 0])
        return per_sample if len(sample) == 1 else b.op("Reshape", per_sample, b.ints([-1] + list(sample)))


def _decomposed_backward(cx: Context, node: ir.Node, coef: ir.Value):
    return [(cx.decomposed[node], coef)]


def _relaxed_backward(cx: Context, node: ir.Node, coef: ir.Value):
    """Positive coefficients take the lower line, negative ones the upper line."""
    b = cx.b
    relaxation = cx.relaxed[node]
    if isinstance(relaxation, Planes):
        return crown_products.product_backward(cx, node, relaxation, coef)
    if isinstance(relaxation, WindowMax):
        positive = b.op("Relu", coef)
        return _window_max_backward(cx, node, relaxation, positive, b.op("Sub", coef, positive))
    if cx.alpha is not None and relaxation.tangent_lines is not None:
        return _tangent_lines_backward(cx, node, relaxation, coef)
    lower_slope = relaxation.lower_slope
    if cx.alpha is not None and relaxation.alpha_floor is not None:
        lower_slope = relaxation.lower_slope_for(b, cx.alpha.get(node))
    slope = b.op("Where", b.op("Less", coef, b.const(0.0)), relaxation.upper_slope, lower_slope)
    back = b.op("Mul", coef, slope)
    if node in cx.alive:
        cx.support[back] = cx.alive[node]
    pairs = [(node.inputs[0], back)]
    if relaxation.lower_intercept is not None:
        pairs.append((relaxation.lower_intercept, b.op("Relu", coef)))
    if relaxation.upper_intercept is not None:
        pairs.append((relaxation.upper_intercept, b.op("Min", coef, b.const(0.0))))
    pairs += cx.infinite_ends(relaxation.lower_unbounded, relaxation.upper_unbounded, coef)
    if cx.beta is not None and node in cx.split_signs:
        # The Lagrangian term -beta·s·z of the split constraint s·z >= 0: it is <= 0 on the split domain, so
        # the bound of the objective plus it is a bound of the objective there, for every beta >= 0.
        pairs.append((node.inputs[0], b.op("Neg", b.op("Mul", cx.beta.get(node), cx.split_signs[node]))))
    return pairs


def _tangent_lines_backward(cx: Context, node: ir.Node, relaxation: Lines, coef: ir.Value):
    """alpha-CROWN on S-shaped ops: the lines of tangent points chosen per objective row and unit; each
    coefficient takes the lower line where positive and the upper line where negative, as above."""
    b = cx.b
    lower_slope, lower_intercept, upper_slope, upper_intercept = relaxation.tangent_lines(cx.alpha.get(node))
    negative = b.op("Less", coef, b.const(0.0))
    slope = b.op("Where", negative, upper_slope, lower_slope)
    intercept = b.op("Where", negative, upper_intercept, lower_intercept)   # [rows, *unit shape]: per row
    pairs = [(node.inputs[0], b.op("Mul", coef, slope)), (intercept, coef)]
    if cx.beta is not None and node in cx.split_signs:
        pairs.append((node.inputs[0], b.op("Neg", b.op("Mul", cx.beta.get(node), cx.split_signs[node]))))
    return pairs


def _alive_units(cx: Context, box: Interval) -> ir.Value:
    """Indices of the units of a [batch, n] (or [n]) ReLU input that may be positive in some sample."""
    b = cx.b
    positive = b.op("Cast", b.op("Greater", box.upper, b.const(0.0)), to=ir.DataType.FLOAT)
    if cx.batched:
        positive = b.reduce("ReduceMax", positive, [0], keepdims=0)
    return b.op("Squeeze", b.op("NonZero", positive), b.ints([0]))


def _window_max_backward(cx: Context, node: ir.Node, relaxation: WindowMax, positive, negative):
    b = cx.b
    x, out = node.inputs[0], node.outputs[0]
    shape_in, shape_out = trailing(x), trailing(out)
    per_window = b.op("Add", positive, b.op("Mul", negative, relaxation.upper_slope))
    # [rows, batch, C, *out] -> [rows, batch, C, K, *out] on the chosen inputs -> transposed patch extraction.
    spread = b.op("Mul", b.op("Unsqueeze", per_window, b.ints([3])), relaxation.select)
    size = int(np.prod(relaxation.geometry.kernel))
    flat = fold_leading(b, spread, [size, *shape_out[1:]])
    geometry = relaxation.geometry
    back = b.op("ConvTranspose", flat, relaxation.patches,
                output_padding=geometry.output_padding(shape_out[1:]), **geometry.attributes())
    back = unfold_leading(b, back, spread, shape_in)
    return [(x, back), (relaxation.upper_intercept, negative)]


def _relax(cx: Context, node: ir.Node, box: Interval, other: Interval | None = None) -> Lines | WindowMax | Planes:
    if other is not None:
        return relaxations.mccormick(cx.b, box, other)
    if node.op_type != "MaxPool":
        found = relaxations.relax(cx.b, node, box)
        cx.full_shaped.update(v for v in (found.lower_intercept, found.upper_intercept, found.lower_unbounded,
                                          found.upper_unbounded) if v is not None)
        if found.negative_slope == 0.0 and cx.support is not None and len(node.inputs[0].shape) == cx.lead:
            cx.alive[node] = _alive_units(cx, box)
        return found
    x = node.inputs[0]
    shape_in, shape_out = trailing(x), trailing(node.outputs[0])
    geometry = Geometry(node, shape_in[1:], [int(k) for k in attr(node, "kernel_shape")])
    found = relaxations.window_max(cx.b, node, box, shape_in, shape_out, geometry)
    cx.full_shaped.add(found.upper_intercept)
    return found


def _meet(b: Builder, tighter: str, linear: ir.Value, interval: ir.Value) -> ir.Value:
    """The tighter ("Max" of lower bounds, "Min" of upper bounds) of a linear and an interval bound, or the one
    that is not NaN (inf - inf after an overflow; onnxruntime's Max and Min propagate NaN)."""
    linear = b.op("Where", b.op("IsNaN", linear), interval, linear)
    return b.op("Where", b.op("IsNaN", interval), linear, b.op(tighter, linear, interval))


def _same_sample_shape(value: ir.Value, like: ir.Value, batched: bool) -> bool:
    """Whether value has every sample dimension of `like` (it may lack the batch or have batch 1)."""
    have, want = static_shape(value), static_shape(like)
    skip = 1 if batched else 0
    return len(have) == len(want) and len(want) > skip and have[skip:] == want[skip:] \
        and all(isinstance(d, int) for d in want[skip:])


def _exactness(node: ir.Node, state: dict, perturbed: set) -> int:
    inputs = [v for v in node.inputs if v is not None and v in perturbed]
    if len(inputs) != 1:
        return LOOSE
    before = state[inputs[0]]
    if node.op_type in _MOVING or (node.op_type in _SCALING
                                   and static_shape(inputs[0]) == static_shape(node.outputs[0])):
        return before
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
        `graphcert.alpha` maps each to its unit); "init" adds outputs `alpha_init.<unit>` with CROWN's
        adaptive choice, the starting point of alpha-CROWN.
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
        where the domain has z >= 0, -1 where z <= 0, 0 for no constraint) and, per output pass, `beta.<n>`
        (shape [rows, *z shape]; metadata `graphcert.beta` maps each to its z). The bound then holds for
        every beta >= 0 (the caller keeps them so); beta = 0 gives the bounds of the graph without them.
    """

    def __init__(self, input_set: InputSet | None = None, keep_original: bool = True, trainable: bool = False,
                 intermediate: str = "crown", norm: str = "linf", crown_upper: bool | None = None,
                 alpha: str | None = None, split_bounds: str | None = None, beta: bool = False):
        super().__init__()
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
            cx.alpha = AlphaInputs(graph)
        if self.trainable:
            cx.support = None
        cx.fallback = set(fallback)

        intervals = _Intervals(b, self.trainable, boxes)
        exposed: dict[str, tuple[ir.Value, ir.Shape]] = {}
        splits: list[str] = []
        index = 0
        while index < len(nodes):
            node = nodes[index]
            if node in cx.fallback:
                self._leaf(cx, intervals, nodes, index)
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
                if self.intermediate == "crown" and loose and x not in intervals.tightened and not given:
                    lower, upper = cx.bound(nodes[:index], x, both=True)
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
            if needs:
                cx.relaxed[node] = _relax(cx, node, *(intervals.env[x] for x in needs))
                if self.alpha == "init" and isinstance(cx.relaxed[node], Lines) \
                        and cx.relaxed[node].adaptive_alpha is not None:
                    exposed[f"{ALPHA_INIT_PREFIX}{node.outputs[0].name}"] = (cx.relaxed[node].adaptive_alpha,
                                                                            node.outputs[0].shape)
            intervals.step(node, perturbed)
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
            if out in cx.leaf_intervals or not crown_fallback.boundable(out, batched):
                # A leaf's own interval is what CROWN would find; outputs a backward pass cannot bound (boolean,
                # integer, a run-time sample shape) keep their IBP interval, as float32.
                box = iv.as_interval(b, intervals.env[out])
                bounds[out.name] = tuple(crown_fallback.as_float32(b, v) for v in (box.lower, box.upper))
                continue
            both = self.crown_upper if self.crown_upper is not None else out.name != MARGINS
            lower, upper = cx.bound(nodes, out, both)
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


    def _leaf(self, cx: Context, intervals: "_Intervals", nodes: list[ir.Node], index: int) -> None:
        """A fallback node: IBP on its inputs' intervals (tightened by CROWN where IBP may be loose, as for a
        relaxed op's input); its outputs become leaves, whose IBP interval is exactly what CROWN would find."""
        node = nodes[index]
        if self.intermediate == "crown":
            for x in dict.fromkeys(v for v in node.inputs if v is not None and v in cx.perturbed):
                loose = intervals.exactness.get(x, LOOSE) == LOOSE or self.norm == "l2"
                if loose and x not in intervals.tightened and crown_fallback.boundable(x, cx.batched):
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


class AlphaInputs:
    """alpha-CROWN parameters: one graph input per (backward pass, ReLU-like unit), made on first use."""

    prefix = ALPHA_PREFIX

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.units: dict[str, str] = {}
        self.rows = None
        self._made: dict = {}
        self._pass = 0

    def start(self, rows: int | None) -> None:
        """A new backward pass with `rows` objective rows (None: known at run time only)."""
        self._pass += 1
        self.rows = rows if rows is not None else f"rows_{self._pass}"

    def get(self, node: ir.Node) -> ir.Value:
        key = (self._pass, node)
        if key not in self._made:
            unit = self.unit(node)
            name = f"{self.prefix}{len(self.units)}"
            value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT),
                             shape=ir.Shape([self.rows, *unit.shape]))
            self.graph.inputs.append(value)
            self.units[name] = unit.name
            self._made[key] = value
        return self._made[key]

    @staticmethod
    def unit(node: ir.Node) -> ir.Value:
        return node.outputs[0]


class BetaInputs(AlphaInputs):
    """beta-CROWN multipliers: one graph input per (output backward pass, split ReLU), shaped like the
    coefficients of its input z ([rows, *z shape]) and mapped to z's name, made on first use."""

    prefix = BETA_PREFIX

    @staticmethod
    def unit(node: ir.Node) -> ir.Value:
        return node.inputs[0]


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
