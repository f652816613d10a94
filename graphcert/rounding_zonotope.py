"""The model's float32 error as a zonotope of rounding symbols, so that cancellation in W is kept.

graphcert.rounding bounds the error e of every value elementwise, |e| <= E, and a linear layer maps it to
|W|·E: signs are lost, and on deep nets E grows far faster than the error can (eran's 6x200 sigmoid net: E of
the outputs 15.7 where this analysis gives 0.8). Here each rounding is a symbol δ_j in [-r_j, r_j] and the
error of every value is kept as a linear form e = G·δ (Higham's first-order analysis made exact by secant
slopes, as zonotope domains do):

- a linear op y = W·x + b computed from x~ = x + e: fl(W·x~ + b) - (W·x + b) = W·e + δ, with one fresh symbol per
  output element, |δ| <= γ·(|W|·(M + E) + |b|) (E = |G|·r the elementwise bound of e, M of |x|);
- an activation f: f(x~) - f(x) = s·e with s the secant slope between x and x~, both in [l - E, u + E]; s lies in
  [s_lo, s_hi] (ReLU: exactly 0 or 1 when the interval is on one side of 0, else [0, 1]; Sigmoid/Tanh: their
  slopes at the interval's ends and nearest 0), so s·e = s_mid·e + (s - s_mid)·e, where the second term is at
  most s_rad·E elementwise: a fresh symbol, next to the library's own rounding (a few ulps of |f|);
- moves of elements (Reshape, Flatten, Identity) keep the form.
A margin row c then sees |c·e| <= |c·G|·r. Every step is an equality or an inclusion, so the bound holds for
every input of the box. The intervals [l, u] of the real values come from IBP here, intersected with bounds
the caller has from CROWN (`given`: valid for real values, as graphcert.rounding_given widens them). The
forms are computed in float64: their own rounding (2^-53 relative) is far below the γ terms, and every bound
is pushed up by 2^-20 at the end, every radius rounded up and every slope interval widened by 2^-40.

Only dense networks of the ops in RULES are analysed (an op outside them: None, and the elementwise analysis
stands alone); the forms are numpy arrays [samples, units, symbols], so convolutional nets are left out.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .arithmetic import FLOAT32, Arithmetic
from .interpret import attr, perturbed_nodes, registrar
from .interface import perturbed_inputs

LIBM_ULPS = 4
RULES: dict = {}
# Forms of a chunk of samples analysed together take about this much memory.
CHUNK_BYTES = 32 * 2 ** 20
# Order reduction at linear ops: at most this many symbols per output unit keep their own columns.
KEPT_PER_UNIT = 4
rule = registrar(RULES)


class Unsupported(Exception):
    """The model holds an op (or a use of one) this analysis does not follow."""


class Forms:
    """The forms of a batch of samples: for every value, G [batch, units, symbols] (or [units, symbols] for one
    sample) and the interval [l, u] [batch, units] of its real values; each symbol has its own radius per
    sample (the radii depend on the sample's magnitudes)."""

    def __init__(self, arithmetic: Arithmetic):
        self.arithmetic = arithmetic
        self.radii: list[np.ndarray] = []      # r [..., n] of each block of symbols, in order
        self.count = 0
        self.forms: dict[ir.Value, np.ndarray] = {}
        self.intervals: dict[ir.Value, tuple[np.ndarray, np.ndarray]] = {}

    def form(self, value: ir.Value) -> np.ndarray:
        found = self.forms[value]
        if found.shape[-1] < self.count:
            found = np.concatenate([found, np.zeros((*found.shape[:-1], self.count - found.shape[-1]))], axis=-1)
            self.forms[value] = found
        return found

    def radius(self) -> np.ndarray:
        return np.concatenate(self.radii, axis=-1) if self.radii else np.zeros(0)

    def bound(self, form: np.ndarray) -> np.ndarray:
        """E = |G|·r, elementwise."""
        if not self.count:
            return np.zeros(form.shape[:-1])
        return np.einsum("...us,...s->...u", np.abs(form), np.broadcast_to(self.radius(), (*form.shape[:-2], self.count)))

    def fresh(self, form: np.ndarray, radius: np.ndarray) -> np.ndarray:
        """form + one new symbol per element with these radii (rounded up).

        When the newest block of symbols enters `form` as a diagonal (a linear op's rounding followed by a bias or
        an activation: one unit's symbol reaches that unit only), it is folded into the new one: d·δ + δ' with
        |δ| <= r, |δ'| <= r' is one symbol of radius |d|·r + r' (its other uses keep δ; correlation is only lost,
        so every bound stays valid). Columns no live form uses are dropped by `compact`."""
        radius = np.asarray(radius, dtype=np.float64)
        units = form.shape[-2]
        if self.radii and self.radii[-1].shape[-1] == units and units:
            start = self.count - units
            block = form[..., start:start + units]
            diagonal = np.diagonal(block, axis1=-2, axis2=-1)
            if np.count_nonzero(block) == np.count_nonzero(diagonal):
                radius = radius + np.abs(diagonal) * self.radii[-1]
                form[..., start:start + units] = 0.0   # every caller passes a form of its own
        radius = np.nextafter(np.broadcast_to(radius, (*form.shape[:-2], units)).astype(np.float64), np.inf)
        self.radii.append(radius)
        grown = np.concatenate([form, np.zeros((*form.shape[:-1], self.count + units - form.shape[-1]))], axis=-1)
        grown[..., np.arange(units), self.count + np.arange(units)] = 1.0
        self.count += units
        return grown

    def reduce(self, form: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(form', boxed): at most KEPT_PER_UNIT symbols per unit keep their columns, those that reach the
        units most (Σ|G|·r over the batch) first; the others become boxed [..., units] = Σ|G|·r per unit, for
        the caller to add to a fresh symbol of its own (zonotope order reduction: sound, and the smallest
        contributions lose their correlations)."""
        units = form.shape[-2]
        limit = KEPT_PER_UNIT * units
        if self.count <= limit:
            return form, np.zeros(form.shape[:-1])
        radius = np.broadcast_to(self.radius(), (*form.shape[:-2], self.count))
        reach = np.abs(form) * radius[..., None, :]
        score = reach.reshape(-1, self.count).sum(axis=0)
        dropped = np.argsort(score)[:self.count - limit]
        boxed = reach[..., dropped].sum(axis=-1)
        form[..., dropped] = 0.0   # the caller's own array
        return form, boxed

    def compact(self, live) -> None:
        """Drop the symbols no live value's form uses (they can no longer reach the output)."""
        if not self.count:
            return
        used = np.zeros(self.count, dtype=bool)
        for value in live:
            form = self.forms.get(value)
            if form is not None:
                axes = tuple(range(form.ndim - 1))
                used[:form.shape[-1]] |= np.any(form != 0, axis=axes)
        if used.sum() > 0.9 * self.count:
            return
        radius = self.radius()[..., used]
        for value in live:
            if value in self.forms:
                self.forms[value] = self.form(value)[..., used]
        for value in [v for v in self.forms if v not in live]:
            del self.forms[value]
        self.radii, self.count = [radius], int(used.sum())

    def magnitude(self, value: ir.Value) -> np.ndarray:
        low, high = self.intervals[value]
        return np.maximum(np.abs(low), np.abs(high))


def _constant(value: ir.Value) -> np.ndarray:
    if value is None or value.const_value is None:
        raise Unsupported(f"{value.name if value is not None else '(missing)'} is not a constant")
    return value.const_value.numpy().astype(np.float64)


def _per_element(array: np.ndarray, like: ir.Value, size: int) -> np.ndarray:
    """A constant broadcast against one sample of `like` (its batch axis dropped), flattened."""
    dims = [d for d in (like.shape or [])]
    sample = [int(d) for d in dims[1:]] if dims else []
    if len(sample) + 1 != len(dims) or int(np.prod(sample)) != size:
        raise Unsupported(f"{like.name}: not a batch of static samples")
    if array.ndim > len(sample):
        if array.shape[0] != 1:
            raise Unsupported("a constant along the batch axis")
        array = array.reshape(array.shape[1:])
    return np.broadcast_to(array, sample).reshape(-1)


# ---- element moves ------------------------------------------------------------------------------------------

@rule("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _move(forms: Forms, node: ir.Node) -> None:
    """Row-major order is kept: a sample's elements stay where they are (the batch axis must stay first)."""
    x, y = node.inputs[0], node.outputs[0]
    if y.shape is None or not y.shape.dims or isinstance(y.shape.dims[0], int) != isinstance(x.shape.dims[0], int):
        raise Unsupported(f"{node.op_type} {node.name}: may move the batch axis")
    forms.forms[y] = forms.form(x)
    forms.intervals[y] = forms.intervals[x]


# ---- linear ops: W·e plus a fresh rounding ------------------------------------------------------------------

def _linear(forms: Forms, node: ir.Node, x: ir.Value, weight: np.ndarray, bias: np.ndarray | None, terms: int) -> None:
    """y = x·weight + bias per sample (weight [in, out]); `terms` roundings chain in each output."""
    form, y = forms.form(x), node.outputs[0]
    low, high = forms.intervals[x]
    centre, spread = ((low + high) / 2) @ weight, ((high - low) / 2) @ np.abs(weight)
    summed = (forms.magnitude(x) + forms.bound(form)) @ np.abs(weight)
    if bias is not None:
        centre, summed = centre + bias, summed + np.abs(bias)
    g = forms.arithmetic.gamma(terms)
    steps = g / forms.arithmetic.unit * max(forms.arithmetic.underflow, 2.0 ** -1022)
    kept, boxed = forms.reduce(np.matmul(weight.T, form))
    forms.forms[y] = forms.fresh(kept, g * summed + steps + boxed)
    forms.intervals[y] = (centre - spread, centre + spread)


@rule("Gemm")
def _gemm(forms: Forms, node: ir.Node) -> None:
    x, w, c = (list(node.inputs) + [None])[:3]
    if attr(node, "transA", 0):
        raise Unsupported("Gemm with transA")
    weight = _constant(w) * float(attr(node, "alpha", 1.0))
    weight = weight.T if attr(node, "transB", 0) else weight
    bias = None
    if c is not None:
        bias = np.broadcast_to(_constant(c) * float(attr(node, "beta", 1.0)), (weight.shape[1],)).astype(np.float64)
    _linear(forms, node, x, weight, bias, weight.shape[0] + 3)   # + alpha, beta and the bias


@rule("MatMul")
def _matmul(forms: Forms, node: ir.Node) -> None:
    x, w = node.inputs
    weight = _constant(w)
    if weight.ndim != 2 or len(x.shape or []) != 2:
        raise Unsupported("MatMul: only a batch of vectors times a constant matrix")
    _linear(forms, node, x, weight, None, weight.shape[0] + 1)


@rule("Add", "Sub", "Mul", "Div")
def _arithmetic(forms: Forms, node: ir.Node) -> None:
    a, b = node.inputs
    y = node.outputs[0]
    size = forms.form(a if a in forms.forms else b).shape[-2]
    unit = forms.arithmetic.unit
    tiny = max(forms.arithmetic.underflow, 2.0 ** -1022)
    if a in forms.forms and b in forms.forms:
        if node.op_type not in ("Add", "Sub"):
            raise Unsupported(f"{node.op_type} of two perturbed tensors")
        sign = 1.0 if node.op_type == "Add" else -1.0
        (la, ha), (lb, hb) = forms.intervals[a], forms.intervals[b]
        low, high = (la + lb, ha + hb) if sign > 0 else (la - hb, ha - lb)
        summed = forms.magnitude(a) + forms.bound(forms.form(a)) + forms.magnitude(b) + forms.bound(forms.form(b))
        forms.forms[y] = forms.fresh(forms.form(a) + sign * forms.form(b), unit * summed)
        forms.intervals[y] = (low, high)
        return
    moving, fixed = (a, b) if a in forms.forms else (b, a)
    c = _per_element(_constant(fixed), moving, size)
    form, (low, high) = forms.form(moving), forms.intervals[moving]
    if node.op_type in ("Add", "Sub"):
        sign = -1.0 if node.op_type == "Sub" and moving is b else 1.0
        shift = c if node.op_type == "Add" else (-c if moving is a else c)
        low, high = (sign * low + shift, sign * high + shift) if sign > 0 else (shift - high, shift - low)
        summed = forms.magnitude(moving) + forms.bound(form) + np.abs(c)
        forms.forms[y] = forms.fresh(sign * form, unit * summed + tiny)
    else:
        if node.op_type == "Div" and moving is b:
            raise Unsupported("Div by a perturbed tensor")
        factor = c if node.op_type == "Mul" else 1.0 / c   # the division is one rounding: 1/c is not computed
        ends = np.stack([low * factor, high * factor])
        low, high = ends.min(axis=0), ends.max(axis=0)
        summed = np.maximum(np.abs(low), np.abs(high)) + np.abs(factor) * forms.bound(form)
        forms.forms[y] = forms.fresh(form * factor[..., None], unit * summed + tiny)
    forms.intervals[y] = (low, high)


# ---- activations: a secant slope in an interval ------------------------------------------------------------

def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


CURVES = {"Sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1 - _sigmoid(z))),
          "Tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2)}


@rule("Relu", "LeakyRelu", "Sigmoid", "Tanh")
def _activation(forms: Forms, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    form = forms.form(x)
    low, high = forms.intervals[x]
    error = forms.bound(form)
    wide_low, wide_high = low - error, high + error      # the exact and the computed input both lie here
    if node.op_type in ("Relu", "LeakyRelu"):
        alpha = float(attr(node, "alpha", 0.01)) if node.op_type == "LeakyRelu" else 0.0
        if alpha < 0:
            raise Unsupported("LeakyRelu with a negative slope (not monotone)")
        lowest, highest = min(alpha, 1.0), max(alpha, 1.0)
        slope_low = np.where(wide_low >= 0, 1.0, np.where(wide_high <= 0, alpha, lowest))
        slope_high = np.where(wide_low >= 0, 1.0, np.where(wide_high <= 0, alpha, highest))
        out = (np.where(low > 0, low, alpha * low), np.where(high > 0, high, alpha * high))
        library = np.zeros_like(low) if alpha == 0 else forms.arithmetic.unit * np.abs(np.stack(out)).max(axis=0)
    else:
        curve, slope = CURVES[node.op_type]
        nearest_zero = np.clip(0.0, wide_low, wide_high)
        slope_high = slope(nearest_zero) * (1 + 2.0 ** -40)
        slope_low = np.minimum(slope(wide_low), slope(wide_high)) * (1 - 2.0 ** -40)
        out = (curve(low), curve(high))
        library = (LIBM_ULPS + 3) * forms.arithmetic.unit * np.maximum(np.abs(out[0]), np.abs(out[1]))
    middle, spread = (slope_low + slope_high) / 2, (slope_high - slope_low) / 2
    tiny = max(forms.arithmetic.underflow, 2.0 ** -1022) * (LIBM_ULPS + 3)
    forms.forms[y] = forms.fresh(form * middle[..., None], spread * error + library + tiny)
    forms.intervals[y] = (np.minimum(out[0], out[1]), np.maximum(out[0], out[1]))


# ---- the analysis ------------------------------------------------------------------------------------------

class ZonotopeErrors:
    """`rows_error(lower, upper, rows, given)`: per sample and margin row c, a bound on |c·(fl(y) - y)| over
    each box, or None for models outside RULES (checked once, when built)."""

    def __init__(self, model: ir.Model, arithmetic: Arithmetic = FLOAT32):
        self.arithmetic = arithmetic
        sources = perturbed_inputs(model)
        if len(sources) != 1 or len(model.graph.outputs) != 1:
            raise Unsupported("one perturbed input and one output")
        self.source, self.output = sources[0], model.graph.outputs[0]
        self.nodes = perturbed_nodes(model.graph, {self.source})
        missing = sorted({n.op_type for n in self.nodes if n.op_type not in RULES})
        if missing:
            raise Unsupported(f"no zonotope rule for {', '.join(missing)}")
        self.weight_rounding = model.metadata_props.get("graphcert.dtype") == "float64"
        # The values still needed after each node (read by a later node, or the output): symbols only the others
        # use are dropped as the analysis goes.
        last_use = {self.output: len(self.nodes)}
        for index, node in enumerate(self.nodes):
            for value in node.inputs:
                if value is not None:
                    last_use[value] = index
        self.live_after = [{v for v, last in last_use.items() if last > index} for index in range(len(self.nodes))]
        # Forms are [units, symbols] per sample: about one symbol per unit of each layer (the folding in
        # `Forms.fresh`), so the widest value times the units on the way bounds a sample's memory.
        sizes = [int(np.prod([d for d in v.shape.dims[1:]])) for node in self.nodes for v in node.outputs
                 if v.shape is not None and all(isinstance(d, int) for d in v.shape.dims[1:])]
        self.widest, self.symbols = max(sizes, default=1), sum(sizes) + 1

    def rows_error(self, lower: np.ndarray, upper: np.ndarray, rows: np.ndarray, given: dict | None = None
                   ) -> np.ndarray:
        """[batch, m] for boxes lower, upper [batch, ...] and rows [m, n] or [batch, m, n]; the samples are
        analysed together in chunks of CHUNK_BYTES of forms."""
        count = len(lower)
        rows = np.broadcast_to(np.asarray(rows, dtype=np.float64), (count, *np.asarray(rows).shape[-2:]))
        found = np.empty(rows.shape[:2])
        width = max(self.widest, 1)
        chunk = max(1, int(CHUNK_BYTES // (8 * width * max(self.symbols, 1))))
        for start in range(0, count, chunk):
            part = slice(start, min(count, start + chunk))
            sample_given = {name: (np.asarray(lo[part], np.float64).reshape(len(rows[part]), -1),
                                   np.asarray(hi[part], np.float64).reshape(len(rows[part]), -1))
                            for name, (lo, hi) in (given or {}).items()}
            form, radius = self._output_form(np.asarray(lower[part], np.float64).reshape(len(rows[part]), -1),
                                             np.asarray(upper[part], np.float64).reshape(len(rows[part]), -1),
                                             sample_given)
            found[part] = np.einsum("bms,bs->bm", np.abs(np.matmul(rows[part], form)), radius)
        return found * (1 + 2.0 ** -20)

    def _output_form(self, low: np.ndarray, high: np.ndarray, given: dict):
        """(G [batch, outputs, symbols], r [batch, symbols]) of the output for boxes low, high [batch, n]."""
        if self.weight_rounding:
            raise Unsupported("float64 models narrowed to float32")
        forms = Forms(self.arithmetic)
        forms.forms[self.source] = np.zeros((*low.shape, 0))
        forms.intervals[self.source] = (low, high)
        for index, node in enumerate(self.nodes):
            RULES[node.op_type](forms, node)
            for value in node.outputs:
                if value.name in given and value in forms.intervals:
                    own_low, own_high = forms.intervals[value]
                    given_low, given_high = given[value.name]
                    forms.intervals[value] = (np.maximum(own_low, given_low), np.minimum(own_high, given_high))
            forms.compact(self.live_after[index])
        radius = np.broadcast_to(forms.radius(), (len(low), forms.count))
        return forms.form(self.output), radius
