"""Property tests for every IBP rule: tiny graphs around one op type, with random shapes, weights, attributes,
centres and radii (hypothesis), whose bounds must contain the op's output at sampled points of the input box.

The rules are tested on the graph as written (shape inference only, no normalisation), so the optimizer
cannot fold the op under test away, and each perturbed input reaches them in either of the two forms an
`Interval` takes (lower/upper or centre/radius).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphcert.errors import UnsupportedOpError
from graphcert.interpret import registrar
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.passes.ibp import RULES, IntervalPass
from graphcert.runtime import Session

OPSET = 17
SAMPLES = 48
RTOL, ATOL = 1e-5, 1e-5


class Tiny:
    """A graph under construction: perturbed float inputs (centre and radius drawn here), constants, nodes."""

    def __init__(self, draw, opset: int = OPSET):
        self.draw, self.opset = draw, opset
        self.rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        self.scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
        self.spread = draw(st.sampled_from([0.0, 0.01, 0.3, 2.0]))
        self.nodes, self.inputs, self.initializers = [], [], []
        self.centers, self.radii = {}, {}
        self._ids = iter(range(10**6))

    def name(self, hint: str) -> str:
        return f"{hint}{next(self._ids)}"

    def shape(self, min_rank=1, max_rank=4, max_dim=4) -> list[int]:
        rank = self.draw(st.integers(min_rank, max_rank))
        return [self.draw(st.integers(1, max_dim)) for _ in range(rank)]

    def perturbed(self, shape, positive: bool = False) -> str:
        name = self.name("x")
        if positive:
            center = self.rng.uniform(0.5, 3.0, shape) * self.scale
            radius = center * self.rng.uniform(0.0, 0.9, shape) * min(self.spread, 1.0)
        else:
            center = self.rng.standard_normal(shape) * self.scale
            radius = self.rng.uniform(0.0, 1.0, shape) * self.spread * max(self.scale, 1.0)
            radius *= self.rng.random(shape) < 0.8  # some elements exact
        self.centers[name] = center.astype(np.float32)
        self.radii[name] = radius.astype(np.float32)
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        if self.draw(st.booleans()):
            # The input box arrives as lower/upper; a product with 1 hands the rule under test centre/radius.
            return self.op("Mul", name, self.const(np.float32(1.0)))
        return name

    def const(self, array, dtype=np.float32) -> str:
        name = self.name("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def weights(self, shape) -> str:
        return self.const(self.rng.standard_normal(shape))

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64), dtype=np.int64)

    def node(self, op_type: str, inputs, outputs: int = 1, **attrs) -> list[str]:
        names = [self.name("y") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names

    def op(self, op_type: str, *inputs, **attrs) -> str:
        return self.node(op_type, inputs, **attrs)[0]

    def model(self, *outputs: str) -> onnx.ModelProto:
        infos = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "rule", self.inputs, infos, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)

    def pick(self, options):
        return self.draw(st.sampled_from(options))


def bound_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    return to_proto(IntervalPass(InputSet("linf"))(ir.from_proto(proto)).model)


def assert_contains_samples(t: Tiny, proto: onnx.ModelProto) -> None:
    """Bounds from the bound graph contain the original outputs at the centre, random points and corners."""
    names = list(t.centers)
    eps_name = (lambda n: "epsilon") if len(names) == 1 else (lambda n: f"{n}_epsilon")
    feeds = dict(t.centers)
    feeds.update({eps_name(n): t.radii[n] for n in names})
    bounds = Session(bound_graph(proto)).run(feeds)
    original = Session(proto)
    outputs = [o.name for o in proto.graph.output]
    for k in range(SAMPLES + 1):
        point = {}
        for n in names:
            c, r = t.centers[n], t.radii[n]
            u = np.zeros_like(c) if k == 0 else t.rng.uniform(-1.0, 1.0, c.shape).astype(np.float32)
            exact = c.astype(np.float64) + r.astype(np.float64) * (np.sign(u) if k % 2 else u)
            near = exact.astype(np.float32)
            # Rounded to float32 a corner may leave the ball by half an ulp of c (amplified x1e5 by a Mul, that
            # is 1e-3 outside): step back inside, towards the centre.
            outside = np.abs(near.astype(np.float64) - c) > r
            point[n] = np.where(outside, np.nextafter(near, c), near).astype(np.float32)
        values = original.run(point)
        for out in outputs:
            value = values[out].astype(np.float64)
            lower, upper = bounds[f"{out}_lower"].astype(np.float64), bounds[f"{out}_upper"].astype(np.float64)
            # Bound graphs compute in float32 without outward rounding (certify and verify add their own
            # rounding to the float32 slack): allow RTOL of the magnitudes they work with, of which the bounds
            # are the visible ones (x·1e5 on [c - r, c + r] with c ~ r: c·k - r·k rounds by ulps of c·k).
            magnitude = np.maximum(np.abs(np.where(np.isfinite(value), value, 0.0)),
                                   np.maximum(np.abs(np.where(np.isfinite(lower), lower, 0.0)),
                                              np.abs(np.where(np.isfinite(upper), upper, 0.0))))
            tolerance = ATOL + RTOL * magnitude
            defined = ~np.isnan(value)
            inside = (lower - tolerance <= value) & (value <= upper + tolerance)
            assert np.all(inside | ~defined), (
                f"output {out} leaves its bounds at sample {k}: value {value[~inside & defined][:4]}, "
                f"lower {np.broadcast_to(lower, value.shape)[~inside & defined][:4]}, "
                f"upper {np.broadcast_to(upper, value.shape)[~inside & defined][:4]}")


# ---- one case builder per op type: draw a tiny graph, return its model --------------------------------

CASES = {}
case = registrar(CASES)


UNARY_ANY = ["Abs", "Asinh", "Atan", "Ceil", "Floor", "Erf", "Exp", "Neg", "Reciprocal", "Relu", "Sigmoid", "Sign",
             "Sinh", "Softplus", "Softsign", "Tanh", "Identity"]


@case(*UNARY_ANY)
def _unary(t: Tiny, op_type):
    return t.model(t.op(op_type, t.perturbed(t.shape())))


@case("Log", "Sqrt")
def _unary_positive(t: Tiny, op_type):
    return t.model(t.op(op_type, t.perturbed(t.shape(), positive=True)))


@case("Dropout")
def _dropout(t: Tiny, op_type):
    x = t.perturbed(t.shape())
    if t.draw(st.booleans()):
        return t.model(t.op("Dropout", x, t.const(np.float32(0.3))))
    return t.model(t.op("Dropout", x))


@case("Elu", "LeakyRelu", "Selu", "HardSigmoid", "ThresholdedRelu")
def _parametric_activation(t: Tiny, op_type):
    attrs = {"alpha": t.draw(st.floats(0.0, 3.0))}
    if op_type == "Selu":
        attrs["gamma"] = t.draw(st.floats(0.0, 3.0))
    if op_type == "HardSigmoid":
        attrs["beta"] = t.draw(st.floats(-1.0, 1.0))
    return t.model(t.op(op_type, t.perturbed(t.shape()), **attrs))


@case("Celu")
def _celu(t: Tiny, op_type):
    return t.model(t.op("Celu", t.perturbed(t.shape()), alpha=t.draw(st.floats(0.05, 3.0))))


@case("Clip")
def _clip(t: Tiny, op_type):
    lo = t.draw(st.floats(-2.0, 1.0))
    hi = lo + t.draw(st.floats(0.0, 3.0))
    which = t.pick(["both", "min", "max", "none"])
    inputs = [t.perturbed(t.shape()), t.const(np.float32(lo)) if which in ("both", "min") else "",
              t.const(np.float32(hi)) if which in ("both", "max") else ""]
    while inputs[-1] == "":
        inputs.pop()
    return t.model(t.op("Clip", *inputs))


@case("Softmax", "LogSoftmax")
def _softmax(t: Tiny, op_type):
    shape = t.shape(1, 3, max_dim=5)
    axis = t.draw(st.integers(-len(shape), len(shape) - 1))
    return t.model(t.op(op_type, t.perturbed(shape), axis=axis))


@case("LayerNormalization")
def _layer_norm(t: Tiny, op_type):
    shape = t.shape(1, 3, max_dim=5)
    axis = t.draw(st.integers(-len(shape), len(shape) - 1))
    normalised = shape[axis % len(shape):]
    inputs = [t.perturbed(shape), t.weights(normalised)]
    if t.draw(st.booleans()):
        inputs.append(t.weights(normalised))
    return t.model(t.op("LayerNormalization", *inputs, axis=axis, epsilon=t.pick([1e-5, 1e-2])))


@case("ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum")
def _reduce(t: Tiny, op_type):
    shape = t.shape(1, 4)
    axes = sorted(set(t.draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1, max_size=3))),
                  key=lambda a: a % len(shape))
    axes = list({a % len(shape): a for a in axes}.values())
    keepdims = int(t.draw(st.booleans()))
    if t.draw(st.booleans()):  # no axes: reduce over all of them
        return t.model(t.op(op_type, t.perturbed(shape), keepdims=keepdims))
    if op_type == "ReduceSum":
        return t.model(t.op(op_type, t.perturbed(shape), t.ints(axes), keepdims=keepdims))
    return t.model(t.op(op_type, t.perturbed(shape), axes=axes, keepdims=keepdims))


@case("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(t: Tiny, op_type):
    return t.model(t.op(op_type, t.perturbed(t.shape(3, 4))))


def _window(t: Tiny, spatial: list[int]):
    kernel = [t.draw(st.integers(1, d)) for d in spatial]
    strides = [t.draw(st.integers(1, 2)) for _ in spatial]
    pads = [t.draw(st.integers(0, k - 1)) for k in kernel] * 2
    return kernel, strides, pads


@case("AveragePool", "MaxPool")
def _pool(t: Tiny, op_type):
    shape = [t.draw(st.integers(1, 2)), t.draw(st.integers(1, 3))] + t.shape(1, 2, max_dim=5)
    kernel, strides, pads = _window(t, shape[2:])
    attrs = dict(kernel_shape=kernel, strides=strides, pads=pads)
    if op_type == "AveragePool":
        attrs["count_include_pad"] = int(t.draw(st.booleans()))
    return t.model(t.op(op_type, t.perturbed(shape), **attrs))


@case("Conv", "ConvTranspose")
def _conv(t: Tiny, op_type):
    group = t.draw(st.integers(1, 2))
    channels_in, channels_out = group * t.draw(st.integers(1, 2)), group * t.draw(st.integers(1, 2))
    shape = [t.draw(st.integers(1, 2)), channels_in] + t.shape(1, 2, max_dim=5)
    kernel, strides, pads = _window(t, shape[2:])
    if op_type == "Conv":
        weight = t.weights([channels_out, channels_in // group] + kernel)
    else:
        weight = t.weights([channels_in, channels_out // group] + kernel)
    inputs = [t.perturbed(shape), weight]
    if t.draw(st.booleans()):
        inputs.append(t.weights([channels_out]))
    return t.model(t.op(op_type, *inputs, kernel_shape=kernel, strides=strides, pads=pads, group=group))


@case("BatchNormalization")
def _batch_norm(t: Tiny, op_type):
    shape = [t.draw(st.integers(1, 2)), t.draw(st.integers(1, 3))] + t.shape(0, 2)
    channels = [shape[1]]
    var = t.const(t.rng.uniform(0.1, 2.0, channels))
    return t.model(t.op(op_type, t.perturbed(shape), t.weights(channels), t.weights(channels), t.weights(channels),
                        var, epsilon=t.pick([1e-5, 1e-3])))


@case("Gemm")
def _gemm(t: Tiny, op_type):
    m, k, n = (t.draw(st.integers(1, 4)) for _ in range(3))
    trans_a, trans_b = int(t.draw(st.booleans())), int(t.draw(st.booleans()))
    a_shape, b_shape = ([k, m] if trans_a else [m, k]), ([n, k] if trans_b else [k, n])
    which = t.pick(["a", "b", "both", "a+bias"])
    a = t.perturbed(a_shape) if which != "b" else t.weights(a_shape)
    b = t.perturbed(b_shape) if which in ("b", "both") else t.weights(b_shape)
    inputs = [a, b]
    bias_shape = t.pick([[n], [m, n], [1]])
    if which == "a+bias":
        inputs.append(t.perturbed(bias_shape))
    elif t.draw(st.booleans()):
        inputs.append(t.weights(bias_shape))
    alpha, beta = t.pick([1.0, -0.5, 2.0]), t.pick([1.0, -1.5, 0.25])
    return t.model(t.op("Gemm", *inputs, alpha=alpha, beta=beta, transA=trans_a, transB=trans_b))


@case("MatMul")
def _matmul(t: Tiny, op_type):
    m, k, n = (t.draw(st.integers(1, 4)) for _ in range(3))
    batch = t.shape(0, 2, max_dim=3)
    a_shape = t.pick([[k], batch + [m, k]])
    b_shape = t.pick([[k], [k, n], batch + [k, n]])
    which = t.pick(["a", "b", "both"])
    a = t.perturbed(a_shape) if which != "b" else t.weights(a_shape)
    b = t.perturbed(b_shape) if which != "a" else t.weights(b_shape)
    return t.model(t.op("MatMul", a, b))


def _broadcast_pair(t: Tiny):
    """Two shapes that broadcast together: the second drops leading dims and sets others to 1."""
    shape = t.shape(1, 3)
    other = [1 if t.draw(st.booleans()) else d for d in shape][t.draw(st.integers(0, len(shape))):]
    return (shape, other) if t.draw(st.booleans()) else (other, shape)


@case("Add", "Sub", "Mul", "Div")
def _binary(t: Tiny, op_type):
    left, right = _broadcast_pair(t)
    which = t.pick(["left", "right", "both", "same"])
    if which == "same":
        x = t.perturbed(left)
        return t.model(t.op(op_type, x, x))
    x = t.perturbed(left) if which != "right" else t.weights(left)
    if op_type == "Div" and which == "left":
        divisor = t.rng.uniform(0.2, 3.0, right) * t.rng.choice([-1.0, 1.0], right)
        y = t.const(divisor)
    else:
        y = t.perturbed(right) if which != "left" else t.weights(right)
    return t.model(t.op(op_type, x, y))


@case("Sum", "Max", "Min")
def _variadic(t: Tiny, op_type):
    left, right = _broadcast_pair(t)
    shapes = [left, right, t.pick([left, right])][:t.draw(st.integers(1, 3))]
    inputs = [t.perturbed(s) if i == 0 or t.draw(st.booleans()) else t.weights(s) for i, s in enumerate(shapes)]
    return t.model(t.op(op_type, *inputs))


@case("Concat")
def _concat(t: Tiny, op_type):
    shape = t.shape(1, 3)
    axis = t.draw(st.integers(-len(shape), len(shape) - 1))
    parts = []
    for i in range(t.draw(st.integers(1, 3))):
        part = list(shape)
        part[axis] = t.draw(st.integers(1, 3))
        parts.append(t.perturbed(part) if i == 0 or t.draw(st.booleans()) else t.weights(part))
    return t.model(t.op("Concat", *parts, axis=axis))


@case("Flatten")
def _flatten(t: Tiny, op_type):
    shape = t.shape(1, 4)
    return t.model(t.op("Flatten", t.perturbed(shape), axis=t.draw(st.integers(-len(shape), len(shape)))))


@case("Reshape")
def _reshape(t: Tiny, op_type):
    shape = t.shape(1, 4)
    target = list(t.rng.permutation(shape))
    target[t.draw(st.integers(0, len(target) - 1))] = -1
    return t.model(t.op("Reshape", t.perturbed(shape), t.ints(target)))


@case("Transpose")
def _transpose(t: Tiny, op_type):
    shape = t.shape(1, 4)
    return t.model(t.op("Transpose", t.perturbed(shape), perm=[int(p) for p in t.rng.permutation(len(shape))]))


@case("Squeeze", "Unsqueeze")
def _squeeze(t: Tiny, op_type):
    shape = t.shape(1, 3)
    if op_type == "Unsqueeze":
        return t.model(t.op("Unsqueeze", t.perturbed(shape), t.ints([t.draw(st.integers(0, len(shape)))])))
    wide = shape[:]
    position = t.draw(st.integers(0, len(shape)))
    wide.insert(position, 1)
    return t.model(t.op("Squeeze", t.perturbed(wide), t.ints([position])))


@case("Slice")
def _slice(t: Tiny, op_type):
    shape = t.shape(1, 3, max_dim=5)
    axis = t.draw(st.integers(0, len(shape) - 1))
    step = t.pick([1, 2, -1])
    start, end = (0, shape[axis]) if step > 0 else (shape[axis] - 1, -shape[axis] - 1)
    start += t.draw(st.integers(0, 1)) * (1 if step > 0 else -1)
    return t.model(t.op("Slice", t.perturbed(shape), t.ints([start]), t.ints([end]), t.ints([axis]), t.ints([step])))


@case("Gather")
def _gather(t: Tiny, op_type):
    shape = t.shape(1, 3)
    axis = t.draw(st.integers(0, len(shape) - 1))
    indices = t.rng.integers(-shape[axis], shape[axis], size=t.shape(0, 2))
    return t.model(t.op("Gather", t.perturbed(shape), t.ints(indices), axis=axis))


@case("Expand")
def _expand(t: Tiny, op_type):
    small, big = _broadcast_pair(t)
    if len(small) > len(big) or any(s not in (1, b) for s, b in zip(small[::-1], big[::-1])):
        small, big = big, small
    return t.model(t.op("Expand", t.perturbed(small), t.ints(big)))


@case("Tile")
def _tile(t: Tiny, op_type):
    shape = t.shape(1, 3)
    return t.model(t.op("Tile", t.perturbed(shape), t.ints([t.draw(st.integers(1, 3)) for _ in shape])))


@case("DepthToSpace", "SpaceToDepth")
def _depth_space(t: Tiny, op_type):
    block = t.draw(st.integers(1, 2))
    if op_type == "DepthToSpace":
        shape = [1, block * block * t.draw(st.integers(1, 2)), t.draw(st.integers(1, 3)), t.draw(st.integers(1, 3))]
        return t.model(t.op(op_type, t.perturbed(shape), blocksize=block, mode=t.pick(["DCR", "CRD"])))
    shape = [1, t.draw(st.integers(1, 2)), block * t.draw(st.integers(1, 3)), block * t.draw(st.integers(1, 3))]
    return t.model(t.op(op_type, t.perturbed(shape), blocksize=block))


@case("Split")
def _split(t: Tiny, op_type):
    shape = t.shape(1, 3, max_dim=5)
    axis = t.draw(st.integers(0, len(shape) - 1))
    cut = t.draw(st.integers(0, shape[axis]))
    outs = t.node("Split", [t.perturbed(shape), t.ints([cut, shape[axis] - cut])], outputs=2, axis=axis)
    return t.model(*outs)


@case("Pad")
def _pad(t: Tiny, op_type):
    shape = t.shape(1, 3)
    mode = t.pick(["constant", "reflect", "edge"])
    if mode == "reflect":  # reflect pads at most the extent minus one, and crops nothing
        pads = [t.draw(st.integers(0, d - 1)) for d in shape * 2]
    else:  # a negative begin pad crops one element
        pads = [t.draw(st.integers(-1 if d > 1 else 0, 2)) for d in shape] + [t.draw(st.integers(0, 2)) for _ in shape]
    inputs = [t.perturbed(shape), t.ints(pads)]
    if mode == "constant":
        inputs.append(t.const(np.float32(t.draw(st.floats(-2.0, 2.0)))))
    return t.model(t.op("Pad", *inputs, mode=mode))


from ibp_rule_cases import *  # noqa: E402,F401,F403  (cases of the rules in passes/ibp_rules_*.py)


@pytest.mark.parametrize("op_type", sorted(CASES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_rule_bounds_contain_sampled_outputs(op_type, data):
    t = Tiny(data.draw)
    assert_contains_samples(t, CASES[op_type](t, op_type))


@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax", "LayerNormalization"])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_rules_emitting_reductions_hold_at_opset_21(op_type, data):
    """From opset 18 reductions take their axes as an input: rules that emit them must follow the graph's opset."""
    t = Tiny(data.draw, opset=21)
    assert_contains_samples(t, CASES[op_type](t, op_type))


# Rules of ops no runtime computes, whose property test needs another reference than the op's own output.
TESTED_ELSEWHERE = {"RoundingError": "test_rounding_leaves.py: bounds contain onnxruntime's float32 outputs"}


def test_every_rule_has_a_property_test():
    assert sorted(set(RULES) - set(CASES) - set(TESTED_ELSEWHERE)) == []


# ---- regressions and rejections ---------------------------------------------------------------------------

def _fixed(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fixed", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _bounds_of(proto, centre, radius):
    out = Session(bound_graph(proto)).run({"x": centre, "epsilon": radius})
    return out["y_lower"], out["y_upper"]


def test_lrn_bounds_hold_where_onnxruntime_running_sum_cancels():
    """onnxruntime's LRN slides a float32 running sum over the channels: beside squares of 1e6 the base of a
    small channel comes out wrong by ~0.1 or below 0 (outputs 0.6 for 0.49, inf, NaN). The bounds contain each
    output it gives, or are unbounded where its base can reach 0 (without the running sum's error: 0.77824
    below a lower bound of 0.77826, found by hypothesis)."""
    proto = _fixed([helper.make_node("LRN", ["x"], ["y"], size=1, alpha=3.0, beta=0.5, bias=0.1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 1, 1])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 1, 1])])
    x = np.float32([1000, 0.01, 1000, 0.3, 1e-5, 2.0]).reshape(1, 6, 1, 1)
    value = Session(proto).run({"x": x})["y"]
    assert not np.isfinite(value).all()   # what this test is about: the runtime's own cancellation
    lower, upper = _bounds_of(proto, x, np.zeros_like(x))
    finite = np.isfinite(value)
    assert np.all((lower <= value) & (value <= upper) | ~finite)
    assert np.all(np.isinf(lower[~finite]) & np.isinf(upper[~finite]))


def test_softmax_lower_bound_survives_a_dominant_upper_bound():
    """x0 in [-23, 0] while x1 <= -18.4: e^{x1} vanishes next to e^{0} in float32, but not next to e^{x0}."""
    proto = _fixed([helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    lower, upper = _bounds_of(proto, np.float32([-11.5, -18.4]), np.float32([11.5, 0.0]))
    value = Session(proto).run({"x": np.float32([-23.0, -18.4])})["y"]
    assert lower[0] <= value[0] <= upper[0]


def test_cast_to_integer_bounds_every_rounding():
    """x in [0.4, 1.6] after a linear op (centre 1, radius 0.6): casting centre and radius apart gives [1, 1]."""
    proto = _fixed([helper.make_node("Mul", ["x", "one"], ["linear"]),
                    helper.make_node("Cast", ["linear"], ["i"], to=TensorProto.INT32),
                    helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                   [numpy_helper.from_array(np.float32(1.0), "one")])
    lower, upper = _bounds_of(proto, np.float32([1.0]), np.float32([0.6]))
    assert lower[0] <= 0.0 and upper[0] >= 1.0


def test_reciprocal_near_zero_survives_the_rounding_of_a_centre_radius_conversion():
    """[x - eps, x + eps] = [1.0e-4, 3.9] goes through centre/radius (a product with 1), whose lower end
    c - r keeps only the ulps of c: 1.00136e-4 instead of 1.00017e-4, a 0.1 % error that 1/x passes on."""
    proto = _fixed([helper.make_node("Mul", ["x", "one"], ["linear"]),
                    helper.make_node("Reciprocal", ["linear"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                   [numpy_helper.from_array(np.float32(1.0), "one")])
    x, eps = np.float32([1.9460809]), np.float32([1.9459809])
    lower, upper = _bounds_of(proto, x, eps)
    assert upper[0] >= Session(proto).run({"x": x - eps})["y"][0]


def test_division_of_a_constant_by_an_interval_through_zero_is_unbounded():
    proto = _fixed([helper.make_node("Div", ["one", "x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                   [numpy_helper.from_array(np.float32([1.0, 0.0]), "one")])
    lower, upper = _bounds_of(proto, np.float32([0.5, 0.5]), np.float32([1.0, 1.0]))
    assert lower[0] == -np.inf and upper[0] == np.inf
    assert not np.isnan(lower).any() and not np.isnan(upper).any()


@pytest.mark.parametrize("node", [
    helper.make_node("LeakyRelu", ["x"], ["y"], alpha=-0.5),
    helper.make_node("Elu", ["x"], ["y"], alpha=-1.0),
    helper.make_node("ThresholdedRelu", ["x"], ["y"], alpha=-1.0),
], ids=["LeakyRelu-negative-slope", "Elu-negative-alpha", "ThresholdedRelu-negative"])
def test_rules_refuse_settings_they_cannot_bound(node):
    out_type = next((a.i for a in node.attribute if a.name == "to"), TensorProto.FLOAT)
    proto = _fixed([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                   [helper.make_tensor_value_info("y", out_type, [3])],
                   [numpy_helper.from_array(np.float32(4.0), "four"),
                    numpy_helper.from_array(np.float32(-1.0), "minus_one")])
    with pytest.raises(UnsupportedOpError, match=node.op_type):
        bound_graph(proto)


@pytest.mark.parametrize("target", ["FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
                                    "BFLOAT16"])
@pytest.mark.parametrize("saturate", [1, 0])
def test_casts_to_narrow_floats_are_non_decreasing(target, saturate):
    """The Cast rule maps the ends of an interval through the cast: onnxruntime's cast (rounding, saturation,
    overflow to infinity) must never order two inputs the other way round. NaN results are undefined values."""
    xs = np.sort(np.concatenate([np.linspace(-1e5, 1e5, 20001), np.linspace(-3.0, 3.0, 60001),
                                 np.float32([0.0, 1e-30, -1e-30, 1e-42, 3.4e38, -3.4e38, np.inf, -np.inf])])
                 ).astype(np.float32)
    to = getattr(TensorProto, target)
    attrs = {} if target == "BFLOAT16" else {"saturate": saturate}
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["x"], ["narrow"], to=to, **attrs),
         helper.make_node("Cast", ["narrow"], ["y"], to=TensorProto.FLOAT)], "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])]),
        opset_imports=[helper.make_opsetid("", 24)])
    proto.ir_version = 11
    y = Session(proto).run({"x": xs})["y"].astype(np.float64)
    defined = y[~np.isnan(y)]
    assert defined.size > 0.3 * xs.size  # E8M0 without saturation: positive numbers only
    assert np.all(defined[1:] >= defined[:-1])


def test_casts_onnxruntime_cannot_run_are_refused_in_one_line():
    proto = _fixed([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT4E2M1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT4E2M1, [3])])
    with pytest.raises(UnsupportedOpError, match="Cast .onnxruntime has no kernel for casts to FLOAT4E2M1"):
        bound_graph(proto)


def test_resize_with_align_corners_and_a_fractional_output_size_is_refused():
    """onnxruntime floors 4 · 0.6 to 2 outputs and maps the second to element 3; onnx's reference maps it to
    2.14 (it keeps 2.4 in align_corners' ratio): the op is not defined well enough to bound."""
    proto = _fixed([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear",
                                     coordinate_transformation_mode="align_corners")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 2])],
                   [numpy_helper.from_array(np.float32([1.0, 1.0, 0.6, 0.6]), "scales")])
    with pytest.raises(UnsupportedOpError, match="align_corners with scales that give a fractional output size"):
        bound_graph(proto)
