"""Planted counterexamples: small networks whose property is violated only in a narrow pocket of the input set.

Each case is a network `y = base(x) + H·g(x)·e_t` written as ONNX, with a VNN-LIB property around it:
- `base` is a random network (dense ReLU, conv, residual, Tanh or Sigmoid) whose outputs are shifted so that
  the unsafe conjuncts (`y_t >= y_k`, several disjuncts) are at least `floor` away on the whole input set (a
  sound float64 interval bound of the base over every input box);
- `g(x) = relu(1 - ||(x - p) / w||_1)` is a pocket built from ReLU differences (|z| = relu(z) + relu(-z), one
  tent per input, their sum minus n - 1): zero, with zero gradient, outside an L1 ball of width `w` (a
  fraction of the box) around the point `p`; `p` sits on the side of the box that the base's gradient at the
  center points away from: at a vertex, on a face, or inside.
Planted cases set H so that the target conjunct's rows are all `margin` above zero at `p` (the violating set
is an L1 ball of radius about `margin / H` times `w`: a needle); their "near-miss" twins set H so that the
target conjunct's first row stays `gap` below zero even at the top of the pocket (a sound bound over the
pocket's box), so the property holds. Every case checks its point with onnxruntime in float32: `p` violates the
planted property and does not violate the twin's.
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ARCHITECTURES = ("dense", "conv", "residual", "tanh", "sigmoid")
PLACEMENTS = ("corner", "face", "interior")
OPSET = 17


@dataclasses.dataclass
class Linear:
    """y = M x + b on the flattened tensor; `conv` = (kernel, image shape, pad) when it is a convolution."""
    matrix: np.ndarray
    bias: np.ndarray
    conv: tuple | None = None


@dataclasses.dataclass
class Activation:
    name: str          # Relu, Tanh or Sigmoid


@dataclasses.dataclass
class Residual:
    """h + f(h) for a list of layers f that keeps the width."""
    layers: list


@dataclasses.dataclass
class Flatten:
    pass


_NUMPY_ACTIVATIONS = {"Relu": lambda v: np.maximum(v, 0), "Tanh": np.tanh,
                      "Sigmoid": lambda v: 1 / (1 + np.exp(-v))}


def forward(layers: list, x: np.ndarray) -> np.ndarray:
    """The base in float64 on flat inputs x [B, n]."""
    for layer in layers:
        if isinstance(layer, Linear):
            x = x @ layer.matrix.T + layer.bias
        elif isinstance(layer, Activation):
            x = _NUMPY_ACTIVATIONS[layer.name](x)
        elif isinstance(layer, Residual):
            x = x + forward(layer.layers, x)
    return x


def interval(layers: list, lower: np.ndarray, upper: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Sound float64 upper bounds of rows · base(x) over the box [lower, upper] (interval arithmetic; the rows
    are folded into the last linear layer). Returns [len(rows)]."""
    *body, last = layers
    assert isinstance(last, Linear)
    lo, hi = lower.astype(np.float64), upper.astype(np.float64)
    for layer in body:
        lo, hi = _interval_step(layer, lo, hi)
    folded = rows @ last.matrix
    mid, rad = 0.5 * (lo + hi), 0.5 * (hi - lo)
    upper_bound = folded @ mid + np.abs(folded) @ rad + rows @ last.bias
    # Outward by a relative margin that covers float64 rounding of the above.
    return upper_bound + 1e-9 * (np.abs(folded) @ np.abs(mid) + np.abs(folded) @ rad + np.abs(rows @ last.bias) + 1)


def _interval_step(layer, lo, hi):
    if isinstance(layer, Linear):
        mid, rad = 0.5 * (lo + hi), 0.5 * (hi - lo)
        center, radius = layer.matrix @ mid + layer.bias, np.abs(layer.matrix) @ rad
        slack = 1e-9 * (np.abs(layer.matrix) @ np.abs(mid) + radius + np.abs(layer.bias) + 1)
        return center - radius - slack, center + radius + slack
    if isinstance(layer, Activation):
        f = _NUMPY_ACTIVATIONS[layer.name]
        return f(lo) - 1e-12, f(hi) + 1e-12
    if isinstance(layer, Residual):
        flo, fhi = lo, hi
        for inner in layer.layers:
            flo, fhi = _interval_step(inner, flo, fhi)
        return lo + flo, hi + fhi
    return lo, hi


def conv_matrix(kernel: np.ndarray, shape: tuple, pad: int) -> np.ndarray:
    """The dense matrix of a stride-1 convolution of an image [C, H, W] (C order) by kernel [Co, C, k, k]."""
    c_out, c_in, k, _ = kernel.shape
    _, height, width = shape
    out_h, out_w = height + 2 * pad - k + 1, width + 2 * pad - k + 1
    matrix = np.zeros((c_out, out_h, out_w, c_in, height, width))
    for i, j, a, b in itertools.product(range(out_h), range(out_w), range(k), range(k)):
        r, s = i + a - pad, j + b - pad
        if 0 <= r < height and 0 <= s < width:
            matrix[:, i, j, :, r, s] = kernel[:, :, a, b]
    return matrix.reshape(c_out * out_h * out_w, c_in * height * width)


def _weights(rng, rows: int, cols: int) -> np.ndarray:
    return rng.normal(scale=1 / np.sqrt(cols), size=(rows, cols)).astype(np.float32).astype(np.float64)


def _bias(rng, size: int) -> np.ndarray:
    return rng.normal(scale=0.3, size=size).astype(np.float32).astype(np.float64)


def random_base(rng, architecture: str, image: tuple, outputs: int) -> list:
    """A random network of the given architecture from the flat image (C order) to `outputs` values."""
    n = int(np.prod(image))
    hidden = int(rng.integers(6, 13))
    if architecture == "conv":
        channels = int(rng.integers(2, 4))
        kernel = rng.normal(scale=1 / 3, size=(channels, image[0], 3, 3)).astype(np.float32).astype(np.float64)
        bias = _bias(rng, channels)
        conv = Linear(conv_matrix(kernel, image, 1), np.repeat(bias, image[1] * image[2]), (kernel, image, 1, bias))
        width = channels * image[1] * image[2]
        return [conv, Activation("Relu"), Flatten(), Linear(_weights(rng, hidden, width), _bias(rng, hidden)),
                Activation("Relu"), Linear(_weights(rng, outputs, hidden), _bias(rng, outputs))]
    if architecture == "residual":
        block = [Linear(_weights(rng, hidden, hidden), _bias(rng, hidden)), Activation("Relu"),
                 Linear(_weights(rng, hidden, hidden), _bias(rng, hidden))]
        return [Linear(_weights(rng, hidden, n), _bias(rng, hidden)), Activation("Relu"), Residual(block),
                Activation("Relu"), Linear(_weights(rng, outputs, hidden), _bias(rng, outputs))]
    act = {"dense": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}[architecture]
    return [Linear(_weights(rng, hidden, n), _bias(rng, hidden)), Activation(act),
            Linear(_weights(rng, hidden, hidden), _bias(rng, hidden)), Activation(act),
            Linear(_weights(rng, outputs, hidden), _bias(rng, outputs))]


class _Graph:
    """onnx.helper nodes and initializers with generated names."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array) -> str:
        name = self._name("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        out = self._name("t")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attributes))
        return out

    def dense(self, h: str, matrix: np.ndarray, bias: np.ndarray) -> str:
        return self.op("Add", self.op("MatMul", h, self.const(matrix.T)), self.const(bias))


def _emit_base(graph: _Graph, layers: list, h: str) -> str:
    for layer in layers:
        if isinstance(layer, Linear) and layer.conv is not None:
            kernel, _, pad, bias = layer.conv
            h = graph.op("Conv", h, graph.const(kernel), graph.const(bias), pads=[pad] * 4)
        elif isinstance(layer, Linear):
            h = graph.dense(h, layer.matrix, layer.bias)
        elif isinstance(layer, Activation):
            h = graph.op(layer.name, h)
        elif isinstance(layer, Flatten):
            h = graph.op("Flatten", h, axis=1)
        elif isinstance(layer, Residual):
            h = graph.op("Add", h, _emit_base(graph, layer.layers, h))
    return h


def _emit_pocket(graph: _Graph, x: str, image: tuple | None, point: np.ndarray, width: np.ndarray) -> str:
    """g(x) = relu(sum_i relu(1 - |x_i - p_i| / w_i) - (n - 1)) as [1, 1] (Conv 1x1 on images, MatMul on vectors)."""
    n = len(point)
    if image is None:
        both = np.concatenate([np.diag(1 / width), -np.diag(1 / width)], axis=0)     # [2n, n]
        split = graph.op("Relu", graph.dense(x, both, np.concatenate([-point / width, point / width])))
        tents = graph.op("Relu", graph.dense(split, -np.concatenate([np.eye(n), np.eye(n)], axis=1), np.ones(n)))
    else:
        c = image[0]
        scaled = graph.op("Mul", graph.op("Sub", x, graph.const(point.reshape(1, *image))),
                          graph.const((1 / width).reshape(1, *image)))
        signs = np.concatenate([np.eye(c), -np.eye(c)]).reshape(2 * c, c, 1, 1)
        split = graph.op("Relu", graph.op("Conv", scaled, graph.const(signs)))
        merge = -np.concatenate([np.eye(c), np.eye(c)], axis=1).reshape(c, 2 * c, 1, 1)
        tents = graph.op("Flatten", graph.op("Relu", graph.op("Conv", split, graph.const(merge),
                                                               graph.const(np.ones(c)))), axis=1)
    return graph.op("Relu", graph.dense(tents, np.ones((1, n)), np.array([-(n - 1.0)])))


def build_model(layers: list, image: tuple | None, n: int, outputs: int, point, width, height: float,
                target: int) -> onnx.ModelProto:
    graph = _Graph()
    shape = [1, *image] if image is not None else [1, n]
    base = _emit_base(graph, layers, "x")
    pocket = _emit_pocket(graph, "x", image, point, width)
    lift = np.zeros((1, outputs))
    lift[0, target] = height
    y_name = "y"
    graph.nodes.append(helper.make_node("Add", [base, graph.op("MatMul", pocket, graph.const(lift))], [y_name]))
    onnx_graph = helper.make_graph(graph.nodes, "planted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                   [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, [1, outputs])],
                                   graph.initializers)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@dataclasses.dataclass
class PlantedCase:
    name: str
    model: onnx.ModelProto
    spec: str                         # VNN-LIB text
    point: np.ndarray                 # flat float32: the pocket's top (violates the property iff planted)
    planted: bool                     # True: violated (at `point`); False: the near-miss twin (holds)
    boxes: list                       # [(lower, upper)] float32
    conjuncts: list                   # [(row matrix [r, m], bound [r])]: violated when rows·y <= bound
    layers: list                      # the base (float64 reference)
    width: np.ndarray                 # the pocket's half-width per input
    height: float                     # the pocket's height, added to output `target`
    target: int

    def write(self, folder) -> tuple[pathlib.Path, pathlib.Path]:
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model, spec = folder / f"{self.name}.onnx", folder / f"{self.name}.vnnlib"
        onnx.save(self.model, model)
        spec.write_text(self.spec)
        return model, spec

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """The model's flat output at x under onnxruntime (float32)."""
        import onnxruntime
        session = onnxruntime.InferenceSession(self.model.SerializeToString(), providers=["CPUExecutionProvider"])
        shape = [d.dim_value for d in self.model.graph.input[0].type.tensor_type.shape.dim]
        return session.run(None, {"x": np.asarray(x, dtype=np.float32).reshape(shape)})[0].reshape(-1)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The network in float64 on flat inputs x [B, n] (for sampling many points at once)."""
        x = np.asarray(x, dtype=np.float64)
        pocket = np.maximum(1 - np.abs((x - self.point) / self.width).sum(axis=1), 0)
        y = forward(self.layers, x)
        y[:, self.target] += self.height * pocket
        return y

    def reference_violations(self, x: np.ndarray) -> np.ndarray:
        """[B]: the float64 network meets some unsafe conjunct at x (inputs assumed inside the boxes)."""
        y = self.reference(x)
        return np.any([np.all(y @ rows.T <= bound, axis=1) for rows, bound in self.conjuncts], axis=0)

    def violates(self, x: np.ndarray) -> bool:
        """x lies in an input box and its float32 output meets some unsafe conjunct."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        inside = any(np.all((x >= lo) & (x <= hi)) for lo, hi in self.boxes)
        y = self.outputs(x).astype(np.float64)
        return inside and any(np.all(rows @ y <= bound) for rows, bound in self.conjuncts)


def _number(value) -> str:
    return repr(float(value))


def vnnlib_text(boxes: list, conjuncts: list, n: int, m: int) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(n)] + [f"(declare-const Y_{j} Real)" for j in range(m)]
    terms = [" ".join(f"(>= X_{i} {_number(lo[i])}) (<= X_{i} {_number(hi[i])})" for i in range(n))
             for lo, hi in boxes]
    lines.append(f"(assert (and {terms[0]}))" if len(terms) == 1
                 else "(assert (or " + " ".join(f"(and {t})" for t in terms) + "))")
    outs = []
    for pairs in conjuncts:
        outs.append("(and " + " ".join(f"(>= Y_{t} Y_{k})" for t, k in pairs) + ")")
    lines.append(f"(assert {outs[0]})" if len(outs) == 1 else "(assert (or " + " ".join(outs) + "))")
    return "\n".join(lines) + "\n"


def _rows(pairs: list, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(y_t >= y_k) as rows·y <= 0: y_k - y_t <= 0."""
    rows = np.zeros((len(pairs), m))
    for r, (t, k) in enumerate(pairs):
        rows[r, k], rows[r, t] = 1.0, -1.0
    return rows, np.zeros(len(pairs))


def make_case(seed: int, architecture: str = "dense", placement: str = "interior", planted: bool = True,
              boxes: int = 1, disjuncts: int = 1, pocket_width: float = 1e-2, margin: float = 0.02,
              saturated: bool = False, inputs: int | None = None) -> PlantedCase:
    """One case. `pocket_width` is the pocket's half-width per input as a fraction of the box width; `margin`
    the violation at the pocket's top as a fraction of the pocket height (the violating set has L1 radius of
    about margin x pocket_width); `saturated` shifts the first hidden layer so that its ReLUs are off on most
    of the box (zero gradients almost everywhere); `inputs` fixes the number of inputs of a dense net (3-6 by
    default; conv nets take 4x4 to 5x5 images); `boxes` > 1 cuts the input set into several boxes (the pocket
    lies in one) plus a disjoint one; `disjuncts` unsafe conjuncts (output targets), the pocket raises one."""
    rng = np.random.default_rng(seed)
    image = (1, int(rng.integers(4, 6)), int(rng.integers(4, 6))) if architecture == "conv" else None
    n = int(np.prod(image)) if image else int(rng.integers(3, 7))
    n = inputs if inputs is not None and image is None else n
    m = disjuncts + 1 + int(rng.integers(0, 2))
    layers = random_base(rng, architecture, image or (n,), m)
    center = rng.uniform(-1, 1, size=n).astype(np.float32)
    radius = rng.uniform(0.2, 1.0, size=n).astype(np.float32)
    lower, upper = (center - radius).astype(np.float32), (center + radius).astype(np.float32)
    if saturated:
        # The first dense layer (a convolution's bias is per channel), over its input's interval on the box.
        lo, hi = lower.astype(np.float64), upper.astype(np.float64)
        for first in layers:
            if isinstance(first, Linear) and first.conv is None:
                break
            lo, hi = _interval_step(first, lo, hi)
        pre = first.matrix @ (0.5 * (lo + hi)) + first.bias
        spread = np.abs(first.matrix) @ (0.5 * (hi - lo))
        first.bias = (first.bias - pre - 0.6 * spread).astype(np.float32).astype(np.float64)
    # Conjuncts: output k >= 1 beats output 0 (and, for the pocket's target, every other output too).
    target = 1
    conjunct_pairs = [[(t, 0)] + ([(t, k) for k in range(1, m) if k != t] if t == target else [])
                      for t in range(1, disjuncts + 1)]
    all_pairs = sorted({pair for pairs in conjunct_pairs for pair in pairs})
    # Raise output 0 so every row (y_t - y_k of the base) is at least `floor` below zero on the whole box.
    input_boxes = _cut(rng, lower, upper, boxes)
    gaps = np.array([_rows([pair], m)[0][0] for pair in all_pairs])        # rows of y_k - y_t
    highest = np.max([-_lower_bound(layers, lo, hi, gaps) for lo, hi in input_boxes], axis=0)  # of y_t - y_k
    gap_scale = float(np.max(np.abs(highest))) + 1.0
    floor = 0.05 * gap_scale
    last = layers[-1]
    shift = max(0.0, float(np.max([h for h, (t, k) in zip(highest, all_pairs) if k == 0]))) + floor
    last.bias = last.bias.copy()
    last.bias[0] += shift
    last.bias = last.bias.astype(np.float32).astype(np.float64)
    # The pocket goes to the side of the box the target row's gradient at the center points away from.
    target_row = _rows([(target, 0)], m)[0][0]
    grad = _gradient(layers, 0.5 * (lower + upper), -target_row)
    away = np.where(grad > 0, 0.0, 1.0)                 # 0: the lower face, 1: the upper face
    unit = {"corner": away,
            "face": np.where(rng.random(n) < 0.5, away, np.abs(away - rng.uniform(0.1, 0.45, n))),
            "interior": np.abs(away - rng.uniform(0.1, 0.45, n))}[placement]
    inside = np.clip((lower + unit * (upper - lower)).astype(np.float32), lower, upper)
    point = np.where(unit == 0, lower, np.where(unit == 1, upper, inside))      # faces exactly (no rounding)
    width = (pocket_width * (upper - lower)).astype(np.float32).astype(np.float64)
    target_rows, _ = _rows(conjunct_pairs[0], m)
    base_at_point = forward(layers, point.astype(np.float64)[None])[0]
    if planted:
        # Every row of the target conjunct `margin` (of the pocket height) above zero at the point.
        need = float(np.max(target_rows @ base_at_point))               # largest y_k - y_t there
        height = need / (1 - margin) if need > 0 else gap_scale
    else:
        # The target conjunct's first row (y_t - y_0) stays `margin` (of the height) below zero over the
        # pocket's box: the property holds.
        near = _lower_bound(layers, point - width, point + width, target_rows[:1])[0]   # lower bound of y_0 - y_t
        height = near * (1 - margin)
    assert height > 0, "the base already violates the property at the point"
    height = float(np.float32(height))
    model = build_model(layers, image, n, m, point.astype(np.float64), width, height, target)
    spec = vnnlib_text(input_boxes, conjunct_pairs, n, m)
    conjuncts = [_rows(pairs, m) for pairs in conjunct_pairs]
    name = (f"{architecture}_{placement}_{'planted' if planted else 'twin'}_s{seed}_b{boxes}_d{disjuncts}"
            f"{'_sat' if saturated else ''}")
    case = PlantedCase(name, model, spec, point.astype(np.float32), planted, input_boxes, conjuncts, layers, width,
                       height, target)
    assert case.violates(case.point) == planted, f"{name}: onnxruntime disagrees with the construction at the point"
    return case


def _lower_bound(layers, lower, upper, rows) -> np.ndarray:
    """Sound lower bounds of rows · base over the box."""
    return -interval(layers, lower, upper, -rows)


def _gradient(layers, x: np.ndarray, row: np.ndarray, step: float = 1e-4) -> np.ndarray:
    """Central differences of row · base at x."""
    eye = np.eye(len(x)) * step
    plus = forward(layers, x.astype(np.float64) + eye) @ row
    minus = forward(layers, x.astype(np.float64) - eye) @ row
    return (plus - minus) / (2 * step)


def _cut(rng, lower, upper, boxes: int) -> list:
    """The box cut into `boxes - 1` slabs along a random input (the pocket lies in one of them) plus a
    disjoint box beside it; one box when boxes == 1."""
    if boxes <= 1:
        return [(lower, upper)]
    d = int(rng.integers(len(lower)))
    cuts = np.sort(rng.uniform(lower[d], upper[d], size=boxes - 2)).astype(np.float32)
    edges = [lower[d], *cuts, upper[d]]
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        lo, hi = lower.copy(), upper.copy()
        lo[d], hi[d] = a, b
        out.append((lo, hi))
    extra_lo, extra_hi = lower.copy(), upper.copy()
    extra_lo[d] = np.float32(upper[d] + 1.0)
    extra_hi[d] = np.float32(upper[d] + 1.5)
    out.append((extra_lo, extra_hi))
    return out


def suite(seeds=range(3), planted: bool = True) -> list[PlantedCase]:
    """One case per (seed, architecture), cycling through placements, box and disjunct counts."""
    cases = []
    for seed in seeds:
        for index, architecture in enumerate(ARCHITECTURES):
            k = seed + index
            cases.append(make_case(1000 * seed + index, architecture, PLACEMENTS[k % 3], planted,
                                   boxes=1 + 2 * (k % 2), disjuncts=1 + k % 3, saturated=k % 4 == 3))
    return cases
