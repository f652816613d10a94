"""Quantized deployed models: QLinearConv, QLinearMatMul (onnxruntime's static quantizer, QOperator format),
ConvInteger, MatMulInteger and DynamicQuantizeLinear (its dynamic quantizer), bounded as onnxruntime computes
them; and single-op graphs for what the quantizers do not write (weights fed as inputs, two perturbed
operands, accumulators beyond float32's exact integers)."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphcert import api
from graphcert.errors import UnsupportedOpError
from graphcert.interface import InputSet
from graphcert.runtime import Session
from harness import check_bounds_sound, graph_bound_fn

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")


class _Cnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, stride=2)
        self.fc = torch.nn.Linear(36, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class _MatMulMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(6, 8) * 0.5), torch.nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(8, 3) * 0.5)

    def forward(self, x):
        return torch.relu(x @ self.w1 + self.b1) @ self.w2


class _Residual(torch.nn.Module):
    """Residual sum, LeakyReLU, sigmoid gating, concatenation and global pooling: every com.microsoft QOperator
    op of onnxruntime's static quantizer (QLinearAdd, QLinearLeakyRelu, QLinearSigmoid, QLinearMul,
    QLinearConcat, QLinearGlobalAveragePool, QGemm)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.c1, self.c2 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.c3, self.fc = torch.nn.Conv2d(4, 4, 1), torch.nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        r = torch.nn.functional.leaky_relu(self.c2(h) + h, 0.1)
        z = torch.cat([r * torch.sigmoid(self.c3(r)), r], dim=1)
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(z, 1).flatten(1))


class _Pooled(torch.nn.Module):
    """A convolution, average pooling (QLinearAveragePool once quantized) and a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv, self.fc = torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Linear(27, 4)

    def forward(self, x):
        return self.fc(torch.nn.functional.avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


# name -> (torch model, input shape, quantizer, options)
QUANTIZED = {
    "cnn-qlinearconv": (_Cnn, (1, 7, 7), "static", {"op_types_to_quantize": ["Conv"]}),
    "cnn-qlinearconv-per-channel": (_Cnn, (1, 7, 7), "static", {"op_types_to_quantize": ["Conv"], "per_channel": True}),
    "mlp-qlinearmatmul": (_MatMulMlp, (6,), "static", {"op_types_to_quantize": ["MatMul"]}),
    "cnn-qoperator": (_Cnn, (1, 7, 7), "static", {}),
    "residual-qoperator": (_Residual, (1, 6, 6), "static", {"per_channel": True}),
    "pooled-qoperator": (_Pooled, (1, 6, 6), "static", {}),
    "cnn-convinteger": (_Cnn, (1, 7, 7), "dynamic", {}),
    "mlp-matmulinteger": (_MatMulMlp, (6,), "dynamic", {}),
}
EXPECTED_OPS = {"cnn-qlinearconv": "QLinearConv", "cnn-qlinearconv-per-channel": "QLinearConv",
                "mlp-qlinearmatmul": "QLinearMatMul", "cnn-convinteger": "ConvInteger",
                "mlp-matmulinteger": "MatMulInteger", "cnn-qoperator": "QGemm", "residual-qoperator": "QLinearAdd",
                "pooled-qoperator": "QLinearAveragePool"}


@functools.lru_cache(maxsize=None)
def quantized(name: str, folder: str) -> str:
    """The float model exported by torch and quantized by onnxruntime (calibrated on a few random inputs)."""
    import os
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static
    factory, shape, kind, options = QUANTIZED[name]
    source = os.path.join(folder, f"{name}-float.onnx")
    torch.onnx.export(factory(), (torch.zeros(1, *shape),), source, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17, dynamo=False)
    out = os.path.join(folder, f"{name}.onnx")
    if kind == "dynamic":
        quantize_dynamic(source, out, weight_type=QuantType.QInt8)
    else:
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter([{"x": _sample(shape, seed)} for seed in range(8)])

            def get_next(self):
                return next(self.feeds, None)
        quantize_static(source, out, Reader(), quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, **options)
    return out


def _sample(shape, seed: int, n: int = 1, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).uniform(-1, 1, (n, *shape))).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("quantized"))


def _bound(proto, method="ibp"):
    return api.to_proto(api.bound_graph(api.load(proto), method, InputSet("linf")))


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_quantized_models_convert_and_bounds_are_sound(name, method, folder):
    proto = onnx.load(quantized(name, folder))
    assert EXPECTED_OPS[name] in {n.op_type for n in proto.graph.node}
    bound = _bound(proto, method)
    shape = QUANTIZED[name][1]
    for eps, scale in ((0.01, 1.0), (0.3, 1.0), (2.0, 30.0)):  # small, large and at large magnitudes
        x0 = _sample(shape, 3, scale=scale)
        report = check_bounds_sound(proto, graph_bound_fn(bound, "x", "y"), x0, eps, n_random=16, corners=16,
                                    pgd_steps=4, attack_targets=4)
        report.assert_sound()
        assert report.gradients == "torch"


@pytest.mark.parametrize("name", ["cnn-qlinearconv", "cnn-qlinearconv-per-channel", "mlp-qlinearmatmul",
                                  "cnn-qoperator", "residual-qoperator", "pooled-qoperator"])
def test_static_quantized_bounds_are_exact_at_zero_radius(name, folder):
    """The accumulator is exact and the requantization a function of it: bounds at eps = 0 are the output."""
    proto = onnx.load(quantized(name, folder))
    x = _sample(QUANTIZED[name][1], 4, n=3)
    want = Session(proto).run({"x": x})["y"]
    got = Session(_bound(proto)).run({"x": x, "epsilon": np.float32(0.0)})
    np.testing.assert_array_equal(got["y_lower"], want)
    np.testing.assert_array_equal(got["y_upper"], want)


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_torch_executor_runs_quantized_models_as_onnxruntime(name, folder):
    from graphcert.torch_exec import TorchGraph
    proto = onnx.load(quantized(name, folder))
    x = _sample(QUANTIZED[name][1], 6, n=4)
    want = Session(proto).run({"x": x})["y"]
    graph = TorchGraph(api.load(proto), trainable=False)
    tensor = torch.tensor(x, requires_grad=True)
    got = graph({"x": tensor})["y"]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    assert float(tensor.grad.abs().sum()) > 0  # straight-through: attacks are not blind


# ---- single-op graphs --------------------------------------------------------------------------------------

U8, I8, I32, F = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, TensorProto.FLOAT


def _model(nodes, inputs, inits, out_shape):
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info("y", F, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scalar(name, value, dtype):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _qlinear_conv_model(weight_input: bool, per_channel: bool):
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (3, 2, 3, 3)).astype(np.int8)
    w_scale = np.float32([0.01, 0.02, 0.005]) if per_channel else np.float32(0.01)
    w_zp = np.int8([0, 3, -2]) if per_channel else np.int8(1)
    inits = [_scalar("xs", 0.02, np.float32), _scalar("xzp", 128, np.uint8), _scalar("ws", w_scale, np.float32),
             _scalar("wzp", w_zp, np.int8), _scalar("ys", 0.05, np.float32), _scalar("yzp", 100, np.uint8),
             _scalar("B", rng.integers(-500, 500, 3), np.int32), _scalar("s", 0.05, np.float32),
             _scalar("z", 10, np.uint8)]
    inputs = [("x", F, ["N", 2, 6, 6])]
    if weight_input:
        inputs.append(("w", I8, [3, 2, 3, 3]))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["q"]),
             helper.make_node("QLinearConv", ["q", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp", "B"], ["c"],
                              pads=[1, 0, 1, 2], strides=[1, 2]),
             helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y"])]
    return _model(nodes, inputs, inits, ["N", 3, 6, 3]), w


def _contained(proto, bound, feeds, perturbed, eps, rng, points=200):
    """Every sampled or corner point of the ball around feeds[perturbed] lands inside the bounds."""
    got = Session(bound).run({**feeds, "epsilon": np.float32(eps)})
    lower, upper = got["y_lower"], got["y_upper"]
    session = Session(proto)
    for k in range(points):
        offset = rng.uniform(-eps, eps, feeds[perturbed].shape) if k % 2 else \
            rng.choice([-eps, eps], feeds[perturbed].shape)
        y = session.run({**feeds, perturbed: (feeds[perturbed] + offset).astype(np.float32)})["y"]
        assert np.all(lower <= y) and np.all(y <= upper), (np.min(y - lower), np.min(upper - y))
    return lower, upper


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("weight_input", [False, True])
def test_qlinear_conv_with_bias_strides_and_weights_as_inputs(weight_input, per_channel):
    proto, w = _qlinear_conv_model(weight_input, per_channel)
    bound = _bound(proto)
    feeds = {"x": _sample((2, 6, 6), 1, n=2, scale=3.0)}
    if weight_input:
        feeds["w"] = w
    want = Session(proto).run(feeds)["y"]
    at_zero = Session(bound).run({**feeds, "epsilon": np.float32(0.0)})
    np.testing.assert_array_equal(at_zero["y_lower"], want)
    np.testing.assert_array_equal(at_zero["y_upper"], want)
    for eps in (0.02, 0.5):
        _contained(proto, bound, feeds, "x", eps, np.random.default_rng(2))


def test_accumulators_beyond_float32_integers_are_bounded():
    """K = 2048 products of 255 x 127: partial sums pass 2^24, where float32 sums of whole numbers round; the
    run-time magnitude check adds the summation error there."""
    k = 2048
    w = np.where(np.random.default_rng(0).random((k, 4)) < 0.9, 127, -128).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zero"], ["q"]),
             helper.make_node("MatMulInteger", ["q", "w", "zero"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["y"], to=F)]
    inits = [_scalar("s", 1.0, np.float32), _scalar("zero", 0, np.uint8), numpy_helper.from_array(w, "w")]
    proto = _model(nodes, [("x", F, ["N", k])], inits, ["N", 4])
    bound = _bound(proto)
    rng = np.random.default_rng(1)
    x = rng.uniform(240, 255, (3, k)).astype(np.float32)
    want = Session(proto).run({"x": x})["y"]
    assert np.max(np.abs(want)) > 2 ** 24
    lower, upper = _contained(proto, bound, {"x": x}, "x", 0.0, rng, points=1)
    assert np.all(upper - lower <= 1e-3 * np.abs(want))  # the slack is small next to the sum
    _contained(proto, bound, {"x": x}, "x", 3.0, rng, points=50)


def test_matmul_integer_of_two_perturbed_operands():
    """Both operands quantized from the perturbed input (dynamic quantization of an activation product)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["a"]),
             helper.make_node("Neg", ["x"], ["nx"]),
             helper.make_node("Transpose", ["nx"], ["t"], perm=[0, 2, 1]),
             helper.make_node("QuantizeLinear", ["t", "s", "zp"], ["b"]),
             helper.make_node("MatMulInteger", ["a", "b", "zp", "zp"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["y"], to=F)]
    inits = [_scalar("s", 0.01, np.float32), _scalar("zp", 120, np.uint8)]
    proto = _model(nodes, [("x", F, ["N", 4, 5])], inits, ["N", 4, 4])
    bound = _bound(proto)
    x = _sample((4, 5), 7, n=2)
    want = Session(proto).run({"x": x})["y"]
    at_zero = Session(bound).run({"x": x, "epsilon": np.float32(0.0)})
    np.testing.assert_array_equal(at_zero["y_lower"], want)
    np.testing.assert_array_equal(at_zero["y_upper"], want)
    report = check_bounds_sound(proto, graph_bound_fn(bound, "x", "y"), x[:1], 0.05, n_random=32, corners=32,
                                pgd_steps=6, attack_targets=8)
    report.assert_sound()


def test_qlinear_matmul_per_column_weights_and_int8_activations():
    rng = np.random.default_rng(3)
    b = rng.integers(-128, 128, (5, 3)).astype(np.int8)
    inits = [_scalar("xs", 0.03, np.float32), _scalar("xzp", -5, np.int8), numpy_helper.from_array(b, "b"),
             _scalar("bs", [0.01, 0.03, 0.002], np.float32), _scalar("bzp", [0, -4, 9], np.int8),
             _scalar("ys", 0.02, np.float32), _scalar("yzp", 3, np.int8), _scalar("s", 0.02, np.float32)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["q"]),
             helper.make_node("QLinearMatMul", ["q", "xs", "xzp", "b", "bs", "bzp", "ys", "yzp"], ["m"]),
             helper.make_node("DequantizeLinear", ["m", "s", "yzp"], ["y"])]
    proto = _model(nodes, [("x", F, ["N", 5])], inits, ["N", 3])
    bound = _bound(proto)
    x = _sample((5,), 8, n=4, scale=2.0)
    want = Session(proto).run({"x": x})["y"]
    at_zero = Session(bound).run({"x": x, "epsilon": np.float32(0.0)})
    np.testing.assert_array_equal(at_zero["y_lower"], want)
    np.testing.assert_array_equal(at_zero["y_upper"], want)
    for eps in (0.01, 1.0):
        report = check_bounds_sound(proto, graph_bound_fn(bound, "x", "y"), x[:1], eps, n_random=32, corners=32,
                                    pgd_steps=6, attack_targets=6)
        report.assert_sound()


EPS_CERTIFY = 0.002  # about half a quantization step of the input


@pytest.mark.parametrize("name", ["cnn-qlinearconv", "mlp-qlinearmatmul", "mlp-matmulinteger", "residual-qoperator"])
def test_quantized_models_certify_and_verify(name, folder, tmp_path):
    """Through `certify` (no method of auto skipped) and `verify` with a generated robustness property, in
    real arithmetic: the float32 rounding analysis has no rules for quantized ops (it refuses them)."""
    from graphcert.certify import certify
    from graphcert.data import Dataset
    from test_real_architectures import assert_verify_answers_robustness
    path = quantized(name, folder)
    shape = QUANTIZED[name][1]
    x = _sample(shape, 5, n=4)
    session = Session(onnx.load(path))
    logits = session.run({"x": x})["y"]
    labels = logits.argmax(axis=1)
    result = certify(path, Dataset("quantized", x, labels, None), eps=EPS_CERTIFY, method="auto", rounding="real")
    assert result.clean == 4 and result.certified >= 1
    assert all(stage["status"] in ("ran", "not needed") for stage in result.stages.values()), result.stages
    assert_verify_answers_robustness(path, session, x[0], int(labels[0]), logits.shape[1], EPS_CERTIFY, tmp_path)


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("name", ["residual-qoperator", "cnn-convinteger", "mlp-qlinearmatmul"])
def test_torch_executor_runs_the_bound_graphs(name, method, folder):
    """Attacks and alpha-CROWN run bound graphs in torch: the quantized rules' graphs (float64 requantization,
    run-time ranks) give onnxruntime's bounds there."""
    from graphcert.torch_exec import TorchGraph
    proto = onnx.load(quantized(name, folder))
    bound = api.bound_graph(api.load(proto), method, InputSet("linf"))
    x = _sample(QUANTIZED[name][1], 7, n=2)
    want = Session(api.to_proto(bound)).run({"x": x, "epsilon": np.float32(0.05)})
    got = TorchGraph(bound, trainable=False)({"x": torch.tensor(x), "epsilon": torch.tensor(np.float32(0.05))})
    for key, value in want.items():
        np.testing.assert_allclose(got[key].detach().numpy(), value, rtol=1e-6, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["residual-qoperator", "mlp-matmulinteger", "cnn-qlinearconv"])
def test_l2_bounds_are_sound(name, folder):
    """CROWN on an L2 ball (the quantized ops bounded through IBP on the ball's box): sampled points on and inside
    the sphere and points moved along the L2-normalised torch gradient of each output stay inside."""
    from graphcert.torch_exec import TorchGraph
    proto = onnx.load(quantized(name, folder))
    bound = api.to_proto(api.bound_graph(api.load(proto), "crown", InputSet("linf"), norm="l2"))
    shape = QUANTIZED[name][1]
    x0, radius = _sample(shape, 8), 0.3
    got = Session(bound).run({"x": x0, "epsilon": np.float32(radius)})
    lower, upper = got["y_lower"], got["y_upper"]
    rng = np.random.default_rng(9)
    directions = rng.standard_normal((64, *shape)).astype(np.float32)
    graph = TorchGraph(api.load(proto), trainable=False)
    for k in range(lower.size):
        for sign in (-1.0, 1.0):
            point = torch.tensor(x0, requires_grad=True)
            (sign * graph({"x": point})["y"].reshape(-1)[k]).backward()
            directions = np.concatenate([directions, point.grad.numpy()[None, 0]])
    norms = np.linalg.norm(directions.reshape(len(directions), -1), axis=1).reshape((-1,) + (1,) * len(shape))
    unit = directions / np.maximum(norms, 1e-12)
    points = np.concatenate([x0 + radius * unit, x0 + radius * rng.random((len(unit),) + (1,) * len(shape)) * unit])
    y = Session(proto).run({"x": points.astype(np.float32)})["y"]
    assert np.all(lower - 1e-5 <= y) and np.all(y <= upper + 1e-5)


def test_ceil_mode_average_pool_is_refused(folder, tmp_path):
    """onnxruntime's QLinearAveragePool averages ceil-mode windows that run past the input its own way (not as
    its AveragePool does): refused in one line rather than bounded as the other op."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Ceil(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(torch.relu(x), 2, ceil_mode=True).flatten(1)
    source, out = tmp_path / "ceil.onnx", tmp_path / "ceil-q.onnx"
    torch.onnx.export(Ceil(), (torch.zeros(1, 1, 5, 5),), str(source), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": _sample((1, 5, 5), seed)} for seed in range(4)])

        def get_next(self):
            return next(self.feeds, None)
    quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QOperator)
    assert "QLinearAveragePool" in {n.op_type for n in onnx.load(out).graph.node}
    with pytest.raises(UnsupportedOpError, match="QLinearAveragePool.*ceil mode"):
        api.bound_graph(api.load(str(out)), "ibp")


@pytest.mark.parametrize("seven_bit", [False, True])
def test_int8_weights_that_may_saturate_are_refused_without_vnni(seven_bit, monkeypatch):
    """onnxruntime's uint8 x int8 kernels on x86 without VNNI sum pairs of products in int16 with saturation:
    full-range int8 weights are refused there (one line); weights within 7 bits cannot saturate and convert."""
    from graphcert.errors import UnsupportedOpError
    from graphcert.passes import ibp_rules_qlinear
    monkeypatch.setattr(ibp_rules_qlinear, "_exact_int8_products", lambda: False)
    proto, _ = _qlinear_conv_model(weight_input=False, per_channel=False)
    if seven_bit:
        weights = next(i for i in proto.graph.initializer if i.name == "w")
        clipped = np.clip(numpy_helper.to_array(weights), -64, 64).astype(np.int8)
        weights.CopyFrom(numpy_helper.from_array(clipped, "w"))
        _bound(proto)
    else:
        with pytest.raises(UnsupportedOpError, match="without VNNI"):
            _bound(proto)
