"""Ops of ONNX's node suite that graphcert bounds through their function bodies or rules of their own (helper
ops3, issue 12): each model is compared with onnx's reference evaluator (or onnxruntime) and its IBP bounds are
checked against sampled, corner and attacked points, near the origin and at large magnitudes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper

from graphcert import api
from graphcert import model as model_lib
from graphcert.load_check import runner
from harness import check_bounds_sound, graph_bound_fn
from test_recurrent import _init
from test_recurrent import _make as make_checked_model


def _make(nodes, inputs, outputs, initializers=(), opset=17):
    return make_checked_model(nodes, inputs, outputs, initializers, opset, ir_version=10)


def _assert_sound(proto, x0, cases, output=None):
    loaded = model_lib.load(proto)
    reference = api.to_proto(loaded)
    output = output or proto.graph.output[0].name
    bound = api.to_proto(api.bound_graph(loaded, "ibp"))
    for eps, scale in cases:
        report = check_bounds_sound(reference, graph_bound_fn(bound, proto.graph.input[0].name, output),
                                    x0 * scale, eps, n_random=16, corners=16, pgd_steps=5, attack_targets=8)
        report.assert_sound()
    return loaded, reference


# ---- LinearAttention: its function body loops (a Scan over the sequence), unrolled after expansion -------

def linear_attention_model(seed=0, seq=4, hidden=32, heads=4):
    """x [1, seq, hidden] -> query/key/value/decay/beta projections -> LinearAttention (gated delta rule)."""
    rng = np.random.default_rng(seed)
    inits = [_init(f"W{k}", rng.normal(size=(hidden, hidden if k != "b" else heads)) / np.sqrt(hidden))
             for k in "qkvdb"]
    nodes = [helper.make_node("MatMul", ["x", f"W{k}"], [f"p{k}"]) for k in "qkvdb"]
    nodes += [helper.make_node("Sigmoid", ["pd"], ["decay"]), helper.make_node("Sigmoid", ["pb"], ["beta"]),
              helper.make_node("LinearAttention", ["pq", "pk", "pv", "", "decay", "beta"], ["y", "state"],
                               q_num_heads=heads, kv_num_heads=heads)]
    return _make(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, [1, seq, hidden])],
                 [helper.make_tensor_value_info("y", TP.FLOAT, [1, seq, hidden])], inits, opset=27)


def test_linear_attention_is_unrolled_and_bounded_soundly():
    proto = linear_attention_model()
    x0 = np.random.default_rng(1).uniform(-1, 1, (1, 4, 32)).astype(np.float32)
    loaded, reference = _assert_sound(proto, x0, [(0.05, 1.0), (0.02, 8.0)])
    assert not {n.op_type for n in reference.graph.node} & {"Scan", "Loop", "LinearAttention"}
    np.testing.assert_allclose(runner(reference)({"x": x0})["y"], runner(proto)({"x": x0})["y"], rtol=1e-4, atol=1e-5)


# ---- random ops: bounded by the set every draw lies in ---------------------------------------------------

def _random_model(kind):
    """x [1, 6] -> x·w plus a random draw (each run of the model draws again)."""
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 6])
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"])]
    if kind == "uniform":  # no input: the bound graph must not copy the draw as if it were a constant
        nodes.append(helper.make_node("RandomUniform", [], ["r"], shape=[1, 6], low=-3.0, high=5.0))
    elif kind == "uniform_like":
        nodes.append(helper.make_node("RandomUniformLike", ["x"], ["r"], low=2.0, high=2.5))
    elif kind == "bernoulli":
        nodes += [helper.make_node("Sigmoid", ["x"], ["p"]), helper.make_node("Bernoulli", ["p"], ["r"])]
    elif kind == "multinomial":
        nodes += [helper.make_node("Multinomial", ["x"], ["k"], sample_size=6, dtype=TP.INT32),
                  helper.make_node("Cast", ["k"], ["r"], to=TP.FLOAT)]
    nodes.append(helper.make_node("Add", ["xw", "r"], ["y"]))
    return _make(nodes, [x], [helper.make_tensor_value_info("y", TP.FLOAT, [1, 6])],
                 [_init("w", [1.0, -2.0, 0.5, 3.0, -1.0, 0.0])])


@pytest.mark.parametrize("kind", ["uniform", "uniform_like", "bernoulli", "multinomial"])
def test_random_draws_are_bounded_by_their_range(kind):
    """Every run of the original draws again: the bounds must hold whatever the draw, near 0 and at 1e4."""
    proto = _random_model(kind)
    x0 = np.random.default_rng(3).uniform(-1, 1, (1, 6)).astype(np.float32)
    loaded = model_lib.load(proto)
    bound = api.to_proto(api.bound_graph(loaded, "ibp"))
    for eps, scale in ((0.01, 1.0), (0.5, 1e4)):
        report = check_bounds_sound(proto, graph_bound_fn(bound, "x", "y"), x0 * scale, eps, n_random=64,
                                    corners=32, pgd_steps=3, attack_targets=6)
        report.assert_sound()


def test_a_normal_draw_is_unbounded():
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    proto = _make([helper.make_node("RandomNormalLike", ["x"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])],
                  [x], [helper.make_tensor_value_info("y", TP.FLOAT, [1, 4])])
    bound = api.to_proto(api.bound_graph(model_lib.load(proto), "ibp"))
    lower, upper = graph_bound_fn(bound, "x", "y")(np.zeros((1, 4), np.float32), 0.1)
    assert np.all(lower == -np.inf) and np.all(upper == np.inf)


# ---- ops of other domains with a function body: ai.onnx.preview's FlexAttention --------------------------

def flex_attention_model(seed=0, score_mod=True):
    """x [1, 2, 3, 4] -> Q, K, V projections -> FlexAttention (preview domain) with a score_mod subgraph that
    reads an initializer of its own."""
    rng = np.random.default_rng(seed)
    inits = [_init(f"W{k}", rng.normal(size=(4, 4)) / 2) for k in "qkv"]
    nodes = [helper.make_node("MatMul", ["x", f"W{k}"], [k]) for k in "qkv"]
    scores = helper.make_tensor_value_info("scores", TP.FLOAT, ["B", "H", "L", "S"])
    out = helper.make_tensor_value_info("scores_out", TP.FLOAT, ["B", "H", "L", "S"])
    mod = helper.make_graph([helper.make_node("Add", ["scores", "bias"], ["scores_out"])], "score_mod", [scores],
                            [out], [onnx.numpy_helper.from_array(np.float32(0.5), "bias")])
    nodes.append(helper.make_node("FlexAttention", ["q", "k", "v"], ["y"], domain="ai.onnx.preview",
                                  **({"score_mod": mod} if score_mod else {})))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [1, 2, 3, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26),
                                                    helper.make_opsetid("ai.onnx.preview", 1)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("score_mod", [False, True])
def test_preview_domain_ops_are_expanded_by_their_function_body(score_mod):
    proto = flex_attention_model(score_mod=score_mod)
    x0 = np.random.default_rng(2).uniform(-1, 1, (1, 2, 3, 4)).astype(np.float32)
    loaded, reference = _assert_sound(proto, x0, [(0.05, 1.0), (0.01, 20.0)])
    assert not [n for n in reference.graph.node if n.domain not in ("", "ai.onnx")]
    np.testing.assert_allclose(runner(reference)({"x": x0})["y"], runner(proto)({"x": x0})["y"], rtol=1e-4, atol=1e-5)


# ---- ceil-mode pools whose last window would start in the end padding ------------------------------------

def _pool_model(op, spatial, kernel, strides, pads, dilations, include_pad, opset):
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 2, *spatial])
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "ceil_mode": 1}
    if op == "AveragePool":
        attrs["count_include_pad"] = include_pad
    if dilations != [1] * len(kernel) and (op == "MaxPool" or opset >= 19):
        attrs["dilations"] = dilations
    return _make([helper.make_node(op, ["x"], ["y"], **attrs)], [x], [helper.make_tensor_value_info("y", TP.FLOAT, [None] * (2 + len(spatial)))],
                 opset=opset)


def _dropping_pools(count, seed=5):
    """Random ceil-mode pools (1-D and 2-D) where a last window would start in the end padding."""
    from graphcert.ops import WindowGeometry
    rng = np.random.default_rng(seed)
    found = []
    while len(found) < count:
        rank = int(rng.integers(1, 3))
        kernel = [int(k) for k in rng.integers(1, 4, rank)]
        pads_begin = [int(rng.integers(0, k)) for k in kernel]
        pads_end = [int(rng.integers(0, k)) for k in kernel]
        spatial, strides = [int(s) for s in rng.integers(1, 8, rank)], [int(s) for s in rng.integers(1, 4, rank)]
        dilations = [int(d) for d in rng.integers(1, 3, rank)]
        class Node:  # what WindowGeometry reads of a node
            attributes = {k: type("A", (), {"value": v}) for k, v in
                          {"kernel_shape": kernel, "strides": strides, "pads": pads_begin + pads_end,
                           "dilations": dilations, "ceil_mode": 1}.items()}
        geometry = WindowGeometry.of(Node, spatial)
        counted = WindowGeometry(geometry.spatial, geometry.kernel, geometry.strides, geometry.dilations,
                                 geometry.begin, geometry.end, True, count_padding_starts=True)
        if geometry.fits and min(geometry.out) > 0 and geometry.out != counted.out:
            found.append((spatial, kernel, strides, pads_begin + pads_end, dilations))
    return found


@pytest.mark.parametrize("op,include_pad", [("MaxPool", 0), ("AveragePool", 0), ("AveragePool", 1)])
def test_ceil_mode_pools_that_drop_a_window_are_bounded_as_onnxruntime_runs_them(op, include_pad):
    """Loading checks the rewritten pool against onnxruntime on the original; the bounds contain its outputs.
    Pools whose rewrite would count padding they do not read, or pad as much as the kernel, stay refused in one
    line."""
    from graphcert.errors import UnsupportedOpError
    bounded = 0
    for spatial, kernel, strides, pads, dilations in _dropping_pools(10):
        proto = _pool_model(op, spatial, kernel, strides, pads, dilations, include_pad, opset=17)
        try:
            loaded = model_lib.load(proto)
            bound = api.to_proto(api.bound_graph(loaded, "ibp"))
        except UnsupportedOpError as error:
            assert "ceil" in str(error) and "\n" not in str(error)
            continue
        bounded += 1
        x0 = np.random.default_rng(bounded).normal(size=(1, 2, *spatial)).astype(np.float32)
        for eps, scale in ((0.1, 1.0), (1.0, 1e3)):
            check_bounds_sound(proto, graph_bound_fn(bound, "x", "y"), x0 * scale, eps, n_random=16, corners=16,
                               pgd_steps=3, attack_targets=4).assert_sound()
    assert bounded >= (3 if include_pad else 6)


# ---- GridSample with cubic weights (some negative) on a bounded grid ------------------------------------

def _grid_sample_model(padding, align):
    inputs = [helper.make_tensor_value_info("X", TP.FLOAT, [1, 2, 4, 5]),
              helper.make_tensor_value_info("G", TP.FLOAT, [1, 3, 3, 2])]
    node = helper.make_node("GridSample", ["X", "G"], ["y"], mode="cubic", padding_mode=padding, align_corners=align)
    return _make([node], inputs, [helper.make_tensor_value_info("y", TP.FLOAT, [1, 2, 3, 3])], opset=20)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_cubic_grid_sample_bounds_contain_every_sampled_grid_and_image(padding):
    """Image and grid both perturbed (grid boxes up to a pixel wide, some reaching outside), near 0 and at 1e4:
    onnxruntime's output at random points and corners of the box lies inside the bounds, which stay finite."""
    from graphcert.runtime import Session
    rng = np.random.default_rng(7)
    for trial in range(8):
        align = trial % 2
        proto = _grid_sample_model(padding, align)
        bound = Session(api.to_proto(api.bound_graph(model_lib.load(proto), "ibp")))
        original = Session(proto)
        scale = 1e4 if trial >= 4 else 1.0
        x, g = rng.normal(size=(1, 2, 4, 5)).astype(np.float32) * scale, rng.uniform(-1.3, 1.3, (1, 3, 3, 2)).astype(np.float32)
        ex, eg = np.float32(0.2 * scale * rng.random()), np.float32(0.4 * rng.random())
        found = bound.run({"X": x, "G": g, "X_epsilon": np.full((1, 1, 1, 1), ex), "G_epsilon": np.full((1, 1, 1, 1), eg)})
        lower, upper = found["y_lower"].astype(np.float64), found["y_upper"].astype(np.float64)
        assert np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))
        for k in range(200):
            pick = (lambda shape: rng.choice([-1.0, 1.0], shape)) if k % 2 else (lambda shape: rng.uniform(-1, 1, shape))
            point = {"X": (x + ex * pick(x.shape)).astype(np.float32), "G": (g + eg * pick(g.shape)).astype(np.float32)}
            y = original.run(point)["y"].astype(np.float64)
            tolerance = 1e-5 + 1e-5 * np.abs(y)
            assert np.all(lower - tolerance <= y) and np.all(y <= upper + tolerance), (trial, k)


# ---- BatchNormalization in training mode: the batch's own statistics -----------------------------------

def _batch_norm_training_model():
    x = helper.make_tensor_value_info("x", TP.FLOAT, [4, 3, 2, 2])
    inits = [_init(n, v) for n, v in (("s", [1.0, 2.0, -1.5]), ("b", [0.0, 1.0, 2.0]), ("m", [0.0, 0.5, 1.0]),
                                      ("v", [1.0, 2.0, 3.0]), ("w", [[[[1.0]], [[-2.0]], [[0.5]]]]))]
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]),
             helper.make_node("BatchNormalization", ["xw", "s", "b", "m", "v"], ["y", "running_mean", "running_var"],
                              training_mode=1, momentum=0.8, epsilon=1e-3)]
    outputs = [helper.make_tensor_value_info(n, TP.FLOAT, shape)
               for n, shape in (("y", [4, 3, 2, 2]), ("running_mean", [3]), ("running_var", [3]))]
    return _make(nodes, [x], outputs, inits, opset=15)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_batch_norm_in_training_mode_is_bounded_by_interval_batch_statistics(method):
    """Every output (Y and both running statistics) at samples spread out, nearly constant per channel (a tiny
    variance: onnxruntime's E[x^2] - E[x]^2 rounds most there) and at large magnitudes."""
    proto = _batch_norm_training_model()
    loaded = model_lib.load(proto)
    bound = api.to_proto(api.bound_graph(loaded, method))
    rng = np.random.default_rng(4)
    spread = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    flat = (3.0 + 1e-3 * rng.normal(size=(4, 3, 2, 2))).astype(np.float32)
    for output in ("y", "running_mean", "running_var"):
        for x0, eps in ((spread, 0.05), (spread * 1e3, 5.0), (flat, 1e-4), (flat * 1e3, 1e-2)):
            check_bounds_sound(proto, graph_bound_fn(bound, "x", output), x0, eps, n_random=16, corners=16,
                               pgd_steps=4, attack_targets=6, output=output).assert_sound()


def test_float32_rounding_analysis_refuses_batch_statistics():
    """Its BatchNormalization rule is the inference-mode affine map: training mode is refused, not analysed."""
    from graphcert.errors import UnsupportedOpError
    from graphcert.rounding import error_graph
    with pytest.raises(UnsupportedOpError, match="training mode"):
        error_graph(model_lib.load(_batch_norm_training_model()))


# ---- DeformConv: bilinear samples at perturbed offsets, then a (grouped) convolution ----------------------

def _assert_box_sound(proto, centres: dict, radii: dict, samples=120, seed=0):
    """IBP bounds of a model with several perturbed inputs (each its own radius) hold onnxruntime's outputs at
    random points and corners of the box; the bounds are finite."""
    from graphcert.runtime import Session
    rng = np.random.default_rng(seed)
    bound = Session(api.to_proto(api.bound_graph(model_lib.load(proto), "ibp")))
    names = list(centres)
    eps = {("epsilon" if len(names) == 1 else f"{n}_epsilon"): np.full((1,) * centres[n].ndim, radii[n], np.float32)
           for n in names}
    found = bound.run({**centres, **eps})
    original = Session(proto)
    for out in proto.graph.output:
        lower, upper = found[f"{out.name}_lower"].astype(np.float64), found[f"{out.name}_upper"].astype(np.float64)
        assert np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))
        for k in range(samples):
            draw = (lambda s: rng.choice([-1.0, 1.0], s)) if k % 2 else (lambda s: rng.uniform(-1, 1, s))
            point = {n: (centres[n] + radii[n] * draw(centres[n].shape)).astype(np.float32) for n in names}
            y = original.run(point)[out.name].astype(np.float64)
            tolerance = 1e-5 + 1e-5 * np.abs(y)
            assert np.all(lower - tolerance <= y) and np.all(y <= upper + tolerance), (out.name, k)


def _deform_model(rng, weights_perturbed, with_mask, with_bias, batch=1):
    groups, offset_groups = int(rng.choice([1, 2])), int(rng.choice([1, 2]))
    channels, out_channels = 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 3))
    kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    height, width = int(rng.integers(3, 6)), int(rng.integers(3, 6))
    strides, dilations = [int(v) for v in rng.integers(1, 3, 2)], [int(v) for v in rng.integers(1, 3, 2)]
    pads = [int(v) for v in rng.integers(0, 2, 4)]
    out_h = (height + pads[0] + pads[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    out_w = (width + pads[1] + pads[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    if min(out_h, out_w) < 1:  # the kernel does not fit: draw again
        return _deform_model(rng, weights_perturbed, with_mask, with_bias, batch)
    shapes = {"X": [batch, channels, height, width], "offset": [batch, offset_groups * kh * kw * 2, out_h, out_w]}
    inputs, inits = ["X", "W", "offset", "", ""], []
    w = rng.normal(size=(out_channels, channels // groups, kh, kw)).astype(np.float32)
    if weights_perturbed:
        shapes["W"] = list(w.shape)
    else:
        inits.append(onnx.numpy_helper.from_array(w, "W"))
    if with_bias:
        inputs[3] = "B"
        shapes["B"] = [out_channels]
    if with_mask:
        inputs[4] = "mask"
        shapes["mask"] = [batch, offset_groups * kh * kw, out_h, out_w]
    node = helper.make_node("DeformConv", inputs, ["y"], group=groups, offset_group=offset_groups, kernel_shape=[kh, kw],
                            strides=strides, dilations=dilations, pads=pads)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TP.FLOAT, s) for n, s in shapes.items()],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [batch, out_channels, out_h, out_w])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model, shapes


@pytest.mark.parametrize("weights_perturbed,with_mask,with_bias", [(False, False, False), (True, True, True),
                                                                   (False, True, False), (True, False, True)])
def test_deform_conv_bounds_contain_runtime_outputs(weights_perturbed, with_mask, with_bias):
    """Random groups, offset groups, kernels, strides, dilations and pads; offsets boxes up to 2 pixels wide and
    reaching past the input; near 0 and at 1e3; batches of 1 and 3."""
    rng = np.random.default_rng(11 + 2 * weights_perturbed + with_mask)
    for trial in range(6):
        proto, shapes = _deform_model(rng, weights_perturbed, with_mask, with_bias, batch=3 if trial >= 4 else 1)
        scale = 1e3 if trial % 2 else 1.0
        centres = {n: (rng.normal(size=s) * (2.0 if n == "offset" else scale if n == "X" else 1.0)).astype(np.float32)
                   for n, s in shapes.items()}
        radii = {n: float(rng.uniform(0.01, 1.0)) * (scale if n == "X" else 1.0) for n in shapes}
        _assert_box_sound(proto, centres, radii, samples=60, seed=trial)


# ---- refusals in one line rather than a load error --------------------------------------------------------

def test_a_model_of_ai_onnx_ml_ops_alone_is_refused_by_op_not_by_the_opset_converter():
    """No default-domain import: nothing to convert (the converter used to fail on opset 1)."""
    from graphcert.errors import UnsupportedOpError
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.5)], "g",
                              [x], [helper.make_tensor_value_info("y", TP.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    with pytest.raises(UnsupportedOpError) as info:
        api.bound_graph(model_lib.load(model), "ibp")
    assert "Binarizer" in str(info.value) and "ai.onnx.ml" in str(info.value) and "\n" not in str(info.value)


def test_bitcast_of_a_float64_model_is_refused_in_one_line():
    from graphcert.errors import ModelLoadError
    x = helper.make_tensor_value_info("x", TP.DOUBLE, [1, 3])
    model = _make([helper.make_node("BitCast", ["x"], ["y"], to=TP.INT64)], [x],
                  [helper.make_tensor_value_info("y", TP.INT64, [1, 3])], opset=26)
    with pytest.raises(ModelLoadError, match="BitCast.*bits") as info:
        model_lib.load(model)
    assert "\n" not in str(info.value)


# ---- L2 balls: the same rules under the other norm ---------------------------------------------------------

@pytest.mark.parametrize("build,shape,output,scale", [
    (linear_attention_model, (1, 4, 32), "y", 4.0), (_batch_norm_training_model, (4, 3, 2, 2), "y", 1e3),
    (lambda: _random_model("uniform_like"), (1, 6), "y", 1e3), (flex_attention_model, (1, 2, 3, 4), "y", 10.0)])
def test_l2_bounds_contain_points_of_the_ball(build, shape, output, scale):
    """IBP takes L-inf balls only: CROWN bounds these ops through their IBP rules (its fallback) on an L2 ball.
    Points on the sphere and inside it."""
    from graphcert.runtime import Session
    proto = build()
    loaded = model_lib.load(proto)
    bound = Session(api.to_proto(api.bound_graph(loaded, "crown", norm="l2")))  # the IBP rules as its fallback
    original = Session(api.to_proto(loaded) if proto.opset_import[0].version > 22 or len(proto.opset_import) > 1
                       else proto)
    rng = np.random.default_rng(6)
    x0 = (rng.uniform(-1, 1, shape) * scale).astype(np.float32)
    radius = np.float32(0.05 * scale)
    found = bound.run({"x": x0, "epsilon": radius})
    lower, upper = found[f"{output}_lower"], found[f"{output}_upper"]
    for k in range(60):
        step = rng.normal(size=shape)
        step *= radius / np.linalg.norm(step) * (1.0 if k % 2 else rng.random())
        y = original.run({"x": (x0 + step).astype(np.float32)})[output]
        tolerance = 1e-5 + 1e-5 * np.abs(y)
        assert np.all(lower - tolerance <= y) and np.all(y <= upper + tolerance), k


@pytest.mark.parametrize("node,words", [
    (helper.make_node("Unique", ["x"], ["y"]), "distinct"),
    (helper.make_node("SplitToSequence", ["x"], ["y"], keepdims=0), "sequence"),
    (helper.make_node("Swish", ["x"], ["y"], alpha=0.5), "kernel"),
])
def test_ops_no_method_bounds_are_refused_with_why(node, words):
    from graphcert.errors import UnsupportedOpError
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    out = helper.make_tensor_value_info("y", TP.FLOAT, None) if node.op_type == "SplitToSequence" else \
        helper.make_tensor_value_info("y", TP.FLOAT, [None] * 2)
    if node.op_type == "SplitToSequence":
        out = helper.make_tensor_sequence_value_info("y", TP.FLOAT, None)
    model = _make([node], [x], [out], opset=24)
    for method in ("ibp", "crown"):
        with pytest.raises(UnsupportedOpError) as info:
            api.bound_graph(model_lib.load(model), method)
        assert node.op_type in str(info.value) and words in str(info.value) and "\n" not in str(info.value)


def test_a_range_of_perturbed_length_is_refused_with_why():
    from graphcert.errors import UnsupportedOpError
    scalar = helper.make_tensor_value_info("x", TP.FLOAT, [])
    model = _make([helper.make_node("Range", ["zero", "x", "one"], ["y"])], [scalar],
                  [helper.make_tensor_value_info("y", TP.FLOAT, [None])], [_init("zero", 0.0), _init("one", 1.0)])
    with pytest.raises(UnsupportedOpError, match="Range.*length would vary"):
        api.bound_graph(model_lib.load(model), "ibp")


# ---- far tails: element-wise rules at centres up to the float32 maximum -------------------------------------

@pytest.mark.parametrize("centre", [-1e8, -3e38, 1e8, 3e38])
def test_log_softmax_bounds_hold_where_log_n_is_below_an_ulp(centre):
    """Eight nearly equal scores at 1e8 and 3e38: logsumexp of the others is the top plus log 7, which rounds away
    next to the top; the rule subtracts the scores first (it used to give -log 2 where the truth is -log 8)."""
    from graphcert.runtime import Session
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 8])
    proto = _make([helper.make_node("LogSoftmax", ["x"], ["y"])], [x], [helper.make_tensor_value_info("y", TP.FLOAT, [1, 8])])
    bound = Session(api.to_proto(api.bound_graph(model_lib.load(proto), "ibp")))
    original = Session(proto)
    rng = np.random.default_rng(8)
    x0 = np.full((1, 8), centre, np.float32)
    for eps in (0.0, 0.7, abs(centre) * 1e-6):
        found = bound.run({"x": x0, "epsilon": np.full((1, 1), eps, np.float32)})
        for _ in range(20):
            y = original.run({"x": (x0 + rng.uniform(-eps, eps, (1, 8))).astype(np.float32)})["y"]
            assert np.all(found["y_lower"] - 1e-5 <= y) and np.all(y <= found["y_upper"] + 1e-5), (eps, y)


@pytest.mark.parametrize("centre", [1e13, 3e38, -1e13, -3e38])
def test_tanh_gelu_bounds_hold_where_its_cube_overflows(centre):
    """Gelu(approximate=tanh) is expanded into its body, whose x^3 overflows to inf past ~7e12: the interval [inf, inf]
    in centre form has a NaN radius, and a product with a NaN bound used to count as 0 (bounds [0, 0] where
    onnxruntime gives x). A NaN bound now makes the product unbounded."""
    from graphcert.runtime import Session
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    proto = _make([helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")], [x],
                  [helper.make_tensor_value_info("y", TP.FLOAT, [1, 4])], opset=20)
    bound = Session(api.to_proto(api.bound_graph(model_lib.load(proto), "ibp")))
    x0 = np.full((1, 4), centre, np.float32)
    for eps in (0.0, abs(centre) * 1e-3):
        found = bound.run({"x": x0, "epsilon": np.full((1, 1), eps, np.float32)})
        y = Session(proto).run({"x": x0})["y"]
        assert np.all(found["y_lower"] <= y) and np.all(y <= found["y_upper"])
