"""The backward passes of CROWN (`passes.crown`): coefficients carried from an objective down to the perturbed
inputs through one rule per node, and concretised over the input set.

A lower bound on linear objectives of a tensor is carried backward through the graph as coefficients
(`passes.adjoints`: one adjoint per linear op; `passes.relaxations`: lines for nonlinear ops; planes for
products, `passes.crown_products`; leaves at ops bounded by IBP, `passes.crown_fallback`) down to the perturbed
inputs, and concretised over the input set: A·center - |A|·radius for a box, A·x - eps·||A||_2 for an L2 ball.
Upper bounds are lower bounds of the negated objective, stacked as extra rows. alpha-CROWN's free slopes and
beta-CROWN's multipliers enter as graph inputs (`AlphaInputs`, `BetaInputs`).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import rounding_leaves
from graphcert.builder import Builder
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.model import static_shape
from graphcert.passes import crown_fallback, crown_products, relaxations
from graphcert.passes.adjoints import ADJOINTS, Geometry, fold_leading, trailing, unbroadcast, unfold_leading
from graphcert.passes.relaxations import Lines, Planes, WindowMax

ALPHA_PREFIX = "alpha."
# beta: the multipliers of the split constraints (beta-CROWN), per output backward pass.
BETA_PREFIX = "beta."

# Relative slack for the float error of concretising A·x over the input set (see `Context.concretise`).
CONCRETE_SLACK = 2.0 ** -21
# Skipping dead units (`Context.live_product`) gathers the live coefficients along their last axis, which costs
# onnxruntime about as much per coefficient as a matrix product with ~370 columns (last-axis Gather of [100, 324,
# 50] float32: 27 ms; the MatMul by [50, 50]: 5 ms). Below this many columns the plain product is faster unless
# nearly every unit is dead (ACAS Xu's 50-unit layers: the gathers took half of the CROWN graph's time).
GATHER_FROM_COLUMNS = 128


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
        # beta-CROWN: the split sign input of each split unit, the bounds of its input z the relaxation uses
        # (the split points), and the multipliers of the current backward pass (None: no split constraint
        # enters the bound).
        self.split_signs: dict[ir.Node, ir.Value] = {}
        self.split_points: dict[ir.Node, tuple[ir.Value, ir.Value]] = {}
        self.beta: BetaInputs | None = None
        self.epsilons: dict[str, ir.Value] = {}
        # Builder values with the full shape of the tensor they go with (relaxation intercepts).
        self.full_shaped: set[ir.Value] = set()
        # Identity-start coefficients -> (whether they stack the negated identity below (upper bounds), the
        # indices of the elements they start from when not all).
        self.identities: dict[ir.Value, tuple[bool, ir.Value | None]] = {}
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
        # When a dict: the next backward pass records there each perturbed input's coefficients before they are
        # concretised (the lower bound's linear function of the input; `CrownPass(input_coefficients=True)`).
        self.input_coefficients: dict[ir.Value, ir.Value] | None = None

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

    def live_product(self, coef: ir.Value, matrix: ir.Value, columns: int | None) -> ir.Value:
        """coef @ matrix ([n, k], k = `columns` when known), skipping the units where coef is known to be zero
        where the product is wide enough for that to pay (GATHER_FROM_COLUMNS)."""
        b = self.b
        live = self.support.get(coef) if self.support is not None else None
        if live is None or not (isinstance(columns, int) and columns >= GATHER_FROM_COLUMNS):
            return b.op("MatMul", coef, matrix)
        return b.op("MatMul", b.op("Gather", coef, live, axis=-1), b.op("Gather", matrix, live, axis=0))

    def identity_product(self, coef: ir.Value, matrix: ir.Value) -> ir.Value | None:
        """identity-start coefficients times a [n, k] matrix without the product: the matrix (and its
        negation) as rows. None when coef is not an identity start."""
        if coef not in self.identities:
            return None
        b = self.b
        both, picked = self.identities[coef]
        if picked is not None:   # a start on some elements only: their rows of the matrix
            matrix = b.op("Gather", matrix, picked, axis=0)
        rows = b.op("Concat", matrix, b.op("Neg", matrix), axis=0) if both else matrix
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
                    if part is None:   # a flag per sample: the whole bound is -inf where it is set
                        reach = value if reach is None else b.op("Add", reach, value)
                    elif value in self.perturbed:
                        pending[value] = part if value not in pending else b.op("Add", pending[value], part)
                    elif value in self.unbounded:
                        term = self.contract(part, value, like=out)
                        reach = term if reach is None else b.op("Add", reach, term)
                    else:
                        term = self.contract(part, value, like=out)
                        bias = term if bias is None else b.op("Add", bias, term)
        if self.input_coefficients is not None:
            self.input_coefficients.update(pending)
        for source, part in pending.items():
            term = self.concretise(source, part)
            bias = term if bias is None else b.op("Add", bias, term)
        if reach is not None:
            bias = b.op("Where", b.op("Greater", reach, b.const(0.0)), b.const(-np.inf), bias)
        return bias

    def leaf_backward(self, out: ir.Value, coef: ir.Value) -> list:
        """A fallback node's output: coefficients concretised over its IBP interval (`passes.crown_fallback`)."""
        if out not in self._leaves:
            box = self.leaf_intervals[out]
            self._leaves[out] = crown_fallback.symmetric_leaf(self.b, box, self.batched) \
                if rounding_leaves.is_leaf(out) else crown_fallback.leaf(self.b, box)
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

    def bound(self, nodes: list[ir.Node], value: ir.Value, both: bool, rows: np.ndarray | None = None
              ) -> tuple[ir.Value, ir.Value | None]:
        """CROWN lower (and upper) bounds of every element of `value`, shaped like it. `rows` (flat indices into
        a static sample shape) bounds only those elements: the others get -inf / +inf, for the caller to meet
        with the bounds it has (a pass costs in proportion to its rows)."""
        b = self.b
        dims = static_shape(value)
        sample = dims[1:] if self.batched else dims
        picked = None
        if all(isinstance(d, int) for d in sample):
            count = int(np.prod(sample))
            if rows is not None:
                rows = np.asarray(rows, dtype=np.int64)
                picked = b.ints(rows)
            bounded = count if rows is None else len(rows)
            halves = b.ints([bounded, bounded])
            rows_dim = 2 * bounded if both else bounded
        else:  # a run-time number of margins: [batch, rows]
            if rows is not None:
                raise ValueError("rows picks elements of a static sample shape")
            n_1d = b.op("Shape", value, start=1, end=2)
            halves = b.op("Concat", n_1d, n_1d, axis=0)
            rows_dim = count = None
        if self.alpha is not None:
            self.alpha.start(rows_dim)
        if self.beta is not None:
            self.beta.start(rows_dim)
        if picked is not None:
            one_hot = np.zeros((len(rows), count), dtype=np.float32)
            one_hot[np.arange(len(rows)), rows] = 1.0
            eye = b.const(one_hot)
        else:
            n = b.const(np.array(count, dtype=np.int64), dtype=np.int64) if rows_dim is not None \
                else b.op("Squeeze", n_1d, b.ints([0]))
            index = b.op("Range", b.const(np.array(0, dtype=np.int64), dtype=np.int64), n,
                         b.const(np.array(1, dtype=np.int64), dtype=np.int64))
            eye = b.op("Cast", b.op("Equal", b.op("Unsqueeze", index, b.ints([1])),
                                    b.op("Unsqueeze", index, b.ints([0]))), to=ir.DataType.FLOAT)
        start = b.op("Concat", eye, b.op("Neg", eye), axis=0) if both else eye
        if self.batched and len(sample) == 1:
            coef = b.op("Unsqueeze", start, b.ints([1]))
            self.identities[coef] = (both, picked)
        else:
            coef = b.op("Reshape", start, b.ints([-1] + ([1] if self.batched else []) + list(sample)))
            if not self.batched and len(sample) == 1:
                self.identities[coef] = (both, picked)
        result = self.backward(nodes, value, coef)
        if not both:
            return self._shaped(self._spread(result, rows, count, -np.inf), sample), None
        lower, negated_upper = b.op("Split", result, halves, axis=0, num_outputs=2)
        return (self._shaped(self._spread(lower, rows, count, -np.inf), sample),
                self._shaped(self._spread(b.op("Neg", negated_upper), rows, count, np.inf), sample))

    def _spread(self, found: ir.Value, rows: np.ndarray | None, count: int, fill: float) -> ir.Value:
        """Bounds [len(rows), ...] of the picked elements -> [count, ...], `fill` elsewhere (rows None: as is)."""
        if rows is None:
            return found
        b = self.b
        where = np.full(count, len(rows), dtype=np.int64)
        where[rows] = np.arange(len(rows))
        # one more row of `fill`, shaped like a row of `found`, for every element not picked
        row_shape = b.op("Concat", b.ints([1]), b.op("Shape", found, start=1), axis=0)
        filler = b.op("Expand", b.const(np.full([1] * (2 if self.batched else 1), fill, dtype=np.float32)), row_shape)
        return b.op("Gather", b.op("Concat", found, filler, axis=0), b.ints(where), axis=0)

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
        lower_slope = relaxation.lower_slope_for(b, cx.alpha.chosen(b, node, relaxation.adaptive_alpha))
    relu_like = relaxation.negative_slope is not None
    positive = b.op("Relu", coef) if relu_like or relaxation.lower_intercept is not None else None
    negative = b.op("Min", coef, b.const(0.0)) if relu_like or relaxation.upper_intercept is not None else None
    if relu_like:
        back = relu_like_back(b, positive, negative, lower_slope, relaxation.upper_slope)
    else:
        back = b.op("Mul", coef, b.op("Where", b.op("Less", coef, b.const(0.0)), relaxation.upper_slope, lower_slope))
    if node in cx.alive:
        cx.support[back] = cx.alive[node]
    pairs = [(node.inputs[0], back)]
    if relaxation.lower_intercept is not None:
        pairs.append((relaxation.lower_intercept, positive))
    if relaxation.upper_intercept is not None:
        pairs.append((relaxation.upper_intercept, negative))
    pairs += cx.infinite_ends(relaxation.lower_unbounded, relaxation.upper_unbounded, coef)
    if cx.beta is not None and node in cx.split_signs:
        pairs += _split_constraint_pairs(cx, node)
    return pairs


def relu_like_back(b: Builder, positive: ir.Value, negative: ir.Value, lower_slope: ir.Value,
                   upper_slope: ir.Value) -> ir.Value:
    """coef·(lower slope where coef >= 0, upper slope where < 0) from coef's parts Relu(coef), Min(coef, 0).

    Each coefficient meets one slope and the other term is an exact zero, so this equals coef·Where(coef < 0,
    upper, lower) wherever the slopes are finite, which ReLU-like ones are (the chord's is NaN only where an
    input bound is infinite, and then so is its intercept, which makes the sample's bound NaN either way);
    onnxruntime runs these broadcasting products about 4x faster than a broadcasting Where."""
    return b.op("Add", b.op("Mul", positive, lower_slope), b.op("Mul", negative, upper_slope))


def _tangent_lines_backward(cx: Context, node: ir.Node, relaxation: Lines, coef: ir.Value):
    """alpha-CROWN on S-shaped ops: the lines of tangent points chosen per objective row and unit; each
    coefficient takes the lower line where positive and the upper line where negative, as above."""
    b = cx.b
    lower_slope, lower_intercept, upper_slope, upper_intercept = relaxation.tangent_lines(
        cx.alpha.chosen(b, node, relaxation.adaptive_alpha))
    negative = b.op("Less", coef, b.const(0.0))
    slope = b.op("Where", negative, upper_slope, lower_slope)
    intercept = b.op("Where", negative, upper_intercept, lower_intercept)   # [rows, *unit shape]: per row
    pairs = [(node.inputs[0], b.op("Mul", coef, slope)), (intercept, coef)]
    if cx.beta is not None and node in cx.split_signs:
        pairs += _split_constraint_pairs(cx, node)
    return pairs


def _split_constraint_pairs(cx: Context, node: ir.Node) -> list:
    """beta-CROWN's Lagrangian term -beta·s·(z - p) of a split constraint s·(z - p) >= 0, where s = +1 says the
    domain has z >= p for p its lower bound of z and s = -1 says z <= p for p its upper bound (a ReLU split at 0
    has p = 0; a Sigmoid or Tanh split anywhere). The term is <= 0 on the domain, so the objective's bound plus
    it bounds the objective there, for every beta >= 0: pairs -beta·s on z and beta·s on p. An infinite p (no
    constraint) leaves the term out."""
    b = cx.b
    sign, zero = cx.split_signs[node], b.const(0.0)
    lower, upper = cx.split_points[node]
    point = b.op("Where", b.op("Greater", sign, zero), lower, b.op("Where", b.op("Less", sign, zero), upper, zero))
    finite = b.op("Not", b.op("IsInf", point))
    weight = b.op("Where", finite, b.op("Mul", cx.beta.get(node), sign), zero)
    constant = b.op("Where", finite, point, zero)
    cx.full_shaped.add(constant)   # shaped like z, as the split inputs are
    return [(node.inputs[0], b.op("Neg", weight)), (constant, weight)]


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


def relax(cx: Context, node: ir.Node, box: Interval, other: Interval | None = None) -> Lines | WindowMax | Planes:
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


def _same_sample_shape(value: ir.Value, like: ir.Value, batched: bool) -> bool:
    """Whether value has every sample dimension of `like` (it may lack the batch or have batch 1)."""
    have, want = static_shape(value), static_shape(like)
    skip = 1 if batched else 0
    return len(have) == len(want) and len(want) > skip and have[skip:] == want[skip:] \
        and all(isinstance(d, int) for d in want[skip:])


class AlphaInputs:
    """alpha-CROWN parameters: one graph input per (backward pass, ReLU-like unit), made on first use."""

    prefix = ALPHA_PREFIX

    def __init__(self, graph: ir.Graph, switch: ir.Value | None = None):
        self.graph = graph
        self.switch = switch   # a boolean scalar input: true selects each unit's adaptive slope (`chosen`)
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

    def chosen(self, b: Builder, node: ir.Node, adaptive: ir.Value | None) -> ir.Value:
        """The slope parameter this pass uses for the unit: its input, or `adaptive` where the switch is on."""
        value = self.get(node)
        if self.switch is None or adaptive is None:
            return value
        return b.op("Where", self.switch, adaptive, value)

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
