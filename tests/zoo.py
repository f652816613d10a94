"""A zoo of small ONNX models shaped like real exporters' output, for import and soundness tests.

Every entry builds an `onnx.ModelProto` deterministically (fixed seeds) in well under a second and is cached
in-process: PyTorch's TorchScript exporter at opsets 11..20, and hand-built graphs in the style of tf2onnx
(NHWC input, Transpose, `unk__17` batch), MATLAB (opset 8, IR 3, initializers listed as inputs) and skl2onnx
(1-D input), plus opset variants and small graphs around ops that exporters write in unusual ways.

`ZOO[name]()` returns a fresh copy of the model; `ZOO[name].domain` is the box inputs are sampled from and
`ZOO[name].batched` says whether the leading input dimension is a batch dimension. `ATTENTION_ZOO` holds
models that multiply two perturbed tensors (self-attention), kept apart so that passes without rules for
such products can iterate over `ZOO`.
"""
from __future__ import annotations

import contextlib
import functools
import io
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], onnx.ModelProto]
    domain: tuple[float, float] = (0.0, 1.0)
    batched: bool = True

    def __call__(self) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(self.build())
        return copy


ZOO: dict[str, ZooModel] = {}
ATTENTION_ZOO: dict[str, ZooModel] = {}


def _register(domain=(0.0, 1.0), batched=True, registry=ZOO):
    def wrap(fn):
        name = fn.__name__.lstrip("_")
        registry[name] = ZooModel(name, functools.lru_cache(maxsize=None)(fn), domain, batched)
        return fn
    return wrap


def input_shape(proto: onnx.ModelProto, batch: int = 1) -> list[int]:
    """The shape of the model's single data input, with symbolic dimensions set to `batch`."""
    initializers = {init.name for init in proto.graph.initializer}
    (value,) = [v for v in proto.graph.input if v.name not in initializers]
    return [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]


def input_name(proto: onnx.ModelProto) -> str:
    initializers = {init.name for init in proto.graph.initializer}
    return next(v.name for v in proto.graph.input if v.name not in initializers)


def sample_input(model: ZooModel, proto: onnx.ModelProto | None = None, batch: int = 1, seed: int = 0) -> np.ndarray:
    """Uniform points of the model's domain; for batched models the leading dimension becomes `batch`."""
    proto = proto or model()
    shape = input_shape(proto)
    if model.batched:
        shape[0] = batch
    lo, hi = model.domain
    return np.random.default_rng(seed).uniform(lo, hi, size=shape).astype(np.float32)


# ---- PyTorch exports ------------------------------------------------------------------------------------

def _torch_export(make_module: Callable, shape: list[int], opset: int, seed: int, dynamic_batch: bool = False,
                  **options) -> onnx.ModelProto:
    import torch

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        module = make_module(torch.nn).eval()
        buffer = io.BytesIO()
        dynamic = {"x": {0: "N"}, "y": {0: "N"}} if dynamic_batch else None
        torch.onnx.export(module, (torch.rand(*shape),), buffer, dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], dynamic_axes=dynamic, **options)
    return onnx.load_from_string(buffer.getvalue())


def _randomise_batchnorm(bn) -> None:
    """Non-trivial running statistics and affine parameters, so BatchNormalization is not the identity."""
    import torch

    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


@_register()
def _torch_mlp():
    return _torch_export(lambda nn: nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8),
                                                  nn.ReLU(), nn.Linear(8, 4)), [1, 1, 4, 4], opset=11, seed=1)


@_register()
def _torch_cnn():
    return _torch_export(lambda nn: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                                  nn.Conv2d(4, 6, 3, stride=1), nn.ReLU(), nn.Flatten(),
                                                  nn.Linear(24, 5)), [1, 1, 8, 8], opset=12, seed=2)


@_register()
def _torch_conv_bn():
    def make(nn):
        norms = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm1d(6)
        for bn in norms:
            _randomise_batchnorm(bn)
        return nn.Sequential(nn.Conv2d(2, 4, 3), norms[0], nn.ReLU(), norms[1], nn.Flatten(), nn.Linear(64, 6),
                             norms[2], nn.ReLU(), nn.Linear(6, 3))
    # Without constant folding the exporter keeps BatchNormalization instead of fusing it into the Conv.
    return _torch_export(make, [1, 2, 6, 6], opset=13, seed=3, do_constant_folding=False)


@_register()
def _torch_residual():
    def make(nn):
        class Residual(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Conv2d(1, 3, 3, padding=1)
                self.branch = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                                            nn.Conv2d(3, 3, 3, padding=1))
                self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(75, 4))

            def forward(self, x):
                h = self.stem(x)
                return self.head(h + self.branch(h))
        return Residual()
    return _torch_export(make, [1, 1, 5, 5], opset=14, seed=4)


@_register()
def _torch_pooling():
    return _torch_export(lambda nn: nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), nn.Conv2d(3, 4, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), [1, 1, 8, 8], opset=15, seed=5)


@_register()
def _torch_pad():
    return _torch_export(lambda nn: nn.Sequential(
        nn.ZeroPad2d(1), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.ConstantPad2d((1, 0, 2, 1), 0.5),
        nn.ReflectionPad2d(1), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(96, 3)),
        [1, 1, 5, 5], opset=16, seed=6)


@_register(domain=(-1.0, 1.0))
def _torch_activations():
    return _torch_export(lambda nn: nn.Sequential(
        nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.LeakyReLU(0.1),
        nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 3)), [1, 6], opset=17, seed=7)


@_register()
def _torch_normalised_input():
    def make(nn):
        import torch

        class Normalised(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("mean", torch.tensor([0.485, 0.456]).reshape(1, 2, 1, 1))
                self.register_buffer("std", torch.tensor([0.229, 0.224]).reshape(1, 2, 1, 1))
                self.body = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))

            def forward(self, x):
                return self.body((x - self.mean) / self.std)
        return Normalised()
    return _torch_export(make, [1, 2, 5, 5], opset=18, seed=8)


@_register(domain=(-1.0, 1.0))
def _torch_layernorm():
    def make(nn):
        import torch

        norm = nn.LayerNorm(8)
        with torch.no_grad():
            norm.weight.uniform_(-1.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        return nn.Sequential(nn.Linear(6, 8), norm, nn.ReLU(), nn.Linear(8, 3))
    return _torch_export(make, [1, 3, 6], opset=17, seed=9)


@_register(domain=(-1.0, 1.0))
def _torch_softmax():
    def make(nn):
        import torch

        net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Softmax(dim=-1))
        with torch.no_grad():
            net[2].weight.mul_(4.0)  # spread the logits so the softmax is far from uniform
        return net
    return _torch_export(make, [1, 5], opset=19, seed=10)


@_register()
def _torch_concat():
    def make(nn):
        import torch

        class TwoBranches(nn.Module):
            def __init__(self):
                super().__init__()
                self.left = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
                self.right = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Sigmoid())
                self.head = nn.Sequential(nn.Flatten(), nn.Linear(80, 4))

            def forward(self, x):
                return self.head(torch.cat([self.left(x), self.right(x)], dim=1))
        return TwoBranches()
    return _torch_export(make, [1, 1, 4, 4], opset=20, seed=11)


@_register()
def _torch_conv_transpose():
    return _torch_export(lambda nn: nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(3, 2, 2, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(72, 3)), [1, 1, 6, 6], opset=13, seed=12)


@_register()
def _torch_dynamic_batch():
    return _torch_export(lambda nn: nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)),
                         [1, 3, 4], opset=16, seed=13, dynamic_batch=True)


@_register(domain=(-1.0, 1.0), registry=ATTENTION_ZOO)
def _torch_attention():
    def make(nn):
        import torch

        class SelfAttention(nn.Module):
            """One head of self-attention over 4 tokens, then a GELU MLP: products of two perturbed tensors."""

            def __init__(self):
                super().__init__()
                self.query, self.key, self.value = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)
                self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))

            def forward(self, x):
                scores = self.query(x) @ self.key(x).transpose(1, 2) / 2.0
                return self.mlp(torch.softmax(scores, dim=-1) @ self.value(x))
        return SelfAttention()
    return _torch_export(make, [1, 4, 6], opset=14, seed=14)


# ---- hand-built graphs in other exporters' styles -------------------------------------------------------

def _weights(rng: np.random.Generator, shape, scale: float | None = None) -> np.ndarray:
    scale = scale if scale is not None else 1.0 / np.sqrt(shape[0] if len(shape) == 2 else np.prod(shape[1:]))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, initializers, opset: int, ir_version: int | None = None,
           producer: str = "") -> onnx.ModelProto:
    ir_version = ir_version if ir_version is not None else _ir_for_opset(opset)
    inits = [numpy_helper.from_array(array, name) for name, array in initializers.items()]
    if ir_version < 4:  # IR 3 requires every initializer to be listed among the graph inputs
        inputs = inputs + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "zoo", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _ir_for_opset(opset: int) -> int:
    """The IR version the exporters of that time wrote (the oldest one that knows the opset)."""
    for _release, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return max(ir_version, 3)
    return onnx.IR_VERSION


def _info(name, shape):
    return helper.make_tensor_value_info(name, FLOAT, shape)


@_register()
def _tf2onnx_nhwc():
    rng = np.random.default_rng(20)
    init = {"conv/kernel": _weights(rng, [4, 1, 3, 3]), "conv/bias": _weights(rng, [4], 0.1),
            "flat/shape": np.array([-1, 256], dtype=np.int64),
            "dense/kernel": _weights(rng, [256, 10]), "dense/bias": _weights(rng, [10], 0.1)}
    nodes = [
        helper.make_node("Transpose", ["input:0"], ["nchw"], perm=[0, 3, 1, 2], name="StatefulPartitionedCall/transpose"),
        helper.make_node("Conv", ["nchw", "conv/kernel", "conv/bias"], ["conv"], pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3], name="StatefulPartitionedCall/conv2d"),
        helper.make_node("Relu", ["conv"], ["relu"], name="StatefulPartitionedCall/relu"),
        helper.make_node("Reshape", ["relu", "flat/shape"], ["flat"], name="StatefulPartitionedCall/flatten"),
        helper.make_node("MatMul", ["flat", "dense/kernel"], ["dense"], name="StatefulPartitionedCall/dense/MatMul"),
        helper.make_node("Add", ["dense", "dense/bias"], ["dense:0"], name="StatefulPartitionedCall/dense/BiasAdd"),
    ]
    return _model(nodes, [_info("input:0", ["unk__17", 8, 8, 1])], [_info("dense:0", ["unk__18", 10])], init,
                  opset=13, producer="tf2onnx")


@_register(domain=(-1.0, 1.0))
def _matlab_like():
    rng = np.random.default_rng(21)
    init = {"input_AvgImg": _weights(rng, [1, 1, 1, 5], 0.3),
            "fc1_W": _weights(rng, [5, 8]), "fc1_B": _weights(rng, [8], 0.1),
            "fc2_W": _weights(rng, [8, 8]), "fc2_B": _weights(rng, [8], 0.1),
            "fc3_W": _weights(rng, [8, 5]), "fc3_B": _weights(rng, [5], 0.1)}
    nodes = [helper.make_node("Sub", ["input", "input_AvgImg"], ["input_Sub"], name="input_Sub"),
             helper.make_node("Flatten", ["input_Sub"], ["flat"], axis=1, name="Operation_1_Flatten")]
    previous = "flat"
    for layer in (1, 2, 3):
        nodes += [helper.make_node("MatMul", [previous, f"fc{layer}_W"], [f"mm{layer}"], name=f"fc{layer}_MatMul"),
                  helper.make_node("Add", [f"mm{layer}", f"fc{layer}_B"], [f"fc{layer}"], name=f"fc{layer}_Add")]
        previous = f"fc{layer}"
        if layer < 3:
            nodes.append(helper.make_node("Relu", [previous], [f"relu{layer}"], name=f"relu{layer}"))
            previous = f"relu{layer}"
    return _model(nodes, [_info("input", [1, 1, 1, 5])], [_info("fc3", [1, 5])], init, opset=8, ir_version=3,
                  producer="MATLAB Deep Learning Toolbox Converter for ONNX Model Format")


@_register(domain=(-1.0, 1.0), batched=False)
def _skl2onnx_1d():
    rng = np.random.default_rng(22)
    init = {"coef": _weights(rng, [4, 6]), "coef2": _weights(rng, [6, 3])}
    nodes = [helper.make_node("MatMul", ["model_in", "coef"], ["hidden"], name="Ma_MatMul"),
             helper.make_node("Relu", ["hidden"], ["hidden_relu"], name="Re_Relu"),
             helper.make_node("MatMul", ["hidden_relu", "coef2"], ["model_out"], name="Ma_MatMul1")]
    return _model(nodes, [_info("model_in", [4])], [_info("model_out", [3])], init, opset=14, ir_version=7,
                  producer="skl2onnx")


def _opset_variant(opset: int):
    """The same small network written in the op forms of `opset`: Clip bounds, Squeeze/Unsqueeze and
    ReduceMean axes moved from attributes to inputs over the versions."""
    rng = np.random.default_rng(30 + opset)
    init = {"w1": _weights(rng, [6, 8]), "b1": _weights(rng, [8], 0.1), "w2": _weights(rng, [8, 4]),
            "b2": _weights(rng, [4], 0.1)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1")]
    if opset < 11:
        nodes.append(helper.make_node("Clip", ["h1"], ["clip"], min=0.0, max=0.8, name="clip"))
    else:
        init.update(clip_min=np.array(0.0, np.float32), clip_max=np.array(0.8, np.float32))
        nodes.append(helper.make_node("Clip", ["h1", "clip_min", "clip_max"], ["clip"], name="clip"))
    if opset < 13:
        nodes += [helper.make_node("Unsqueeze", ["clip"], ["wide"], axes=[2], name="unsqueeze"),
                  helper.make_node("Squeeze", ["wide"], ["narrow"], axes=[2], name="squeeze")]
    else:
        init["axis2"] = np.array([2], np.int64)
        nodes += [helper.make_node("Unsqueeze", ["clip", "axis2"], ["wide"], name="unsqueeze"),
                  helper.make_node("Squeeze", ["wide", "axis2"], ["narrow"], name="squeeze")]
    if opset < 18:
        nodes.append(helper.make_node("ReduceMean", ["wide"], ["pooled"], axes=[2], keepdims=0, name="mean"))
    else:
        nodes.append(helper.make_node("ReduceMean", ["wide", "axis2"], ["pooled"], keepdims=0, name="mean"))
    nodes += [helper.make_node("Add", ["narrow", "pooled"], ["twice"], name="add"),
              helper.make_node("Gemm", ["twice", "w2", "b2"], ["y"], name="fc2")]
    return _model(nodes, [_info("x", [1, 6])], [_info("y", [1, 4])], init, opset=opset)


for _opset in (8, 9, 13, 17, 21):
    ZOO[f"opset{_opset}"] = ZooModel(f"opset{_opset}", functools.lru_cache(maxsize=None)(
        functools.partial(_opset_variant, _opset)), domain=(-1.0, 1.0))


@_register()
def _pad_nothing():
    rng = np.random.default_rng(40)
    init = {"pads": np.zeros(8, np.int64), "w": _weights(rng, [2, 1, 3, 3]), "fc": _weights(rng, [18, 3])}
    nodes = [helper.make_node("Pad", ["x", "pads"], ["padded"], mode="constant", name="pad_nothing"),
             helper.make_node("Conv", ["padded", "w"], ["conv"], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "fc"], ["y"], name="fc")]
    return _model(nodes, [_info("x", [1, 1, 5, 5])], [_info("y", [1, 3])], init, opset=13)


@_register(domain=(-1.0, 1.0))
def _clip_inputs():
    rng = np.random.default_rng(41)
    init = {"w": _weights(rng, [5, 6]), "lo": np.array(-0.2, np.float32), "hi": np.array(0.3, np.float32),
            "w2": _weights(rng, [6, 3])}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"),
             helper.make_node("Clip", ["h", "lo", "hi"], ["clipped"], name="clip_both"),
             helper.make_node("Clip", ["clipped", "", "hi"], ["capped"], name="clip_max_only"),
             helper.make_node("MatMul", ["capped", "w2"], ["y"], name="fc2")]
    return _model(nodes, [_info("x", [1, 5])], [_info("y", [1, 3])], init, opset=13)


@_register(domain=(-1.0, 1.0))
def _mul_div_constants():
    rng = np.random.default_rng(42)
    init = {"scale": np.array([2.0, -0.5, 1.5, -3.0], np.float32), "divisor": np.array([[-4.0], [0.5], [2.0]], np.float32),
            "w": _weights(rng, [4, 4]), "half": np.array(0.5, np.float32)}
    nodes = [helper.make_node("Mul", ["x", "scale"], ["scaled"], name="mul_vector"),
             helper.make_node("Div", ["scaled", "divisor"], ["divided"], name="div_column"),
             helper.make_node("MatMul", ["divided", "w"], ["h"], name="fc"),
             helper.make_node("Mul", ["half", "h"], ["halved"], name="mul_scalar_first"),
             helper.make_node("Div", ["halved", "half"], ["y"], name="div_scalar")]
    return _model(nodes, [_info("x", [1, 3, 4])], [_info("y", [1, 3, 4])], init, opset=13)


@_register()
def _reshape_baked_batch():
    rng = np.random.default_rng(43)
    init = {"shape": np.array([1, 18], np.int64), "w": _weights(rng, [18, 4]), "b": _weights(rng, [4], 0.1)}
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape_batch_1"),
             helper.make_node("Gemm", ["flat", "w", "b"], ["y"], name="fc")]
    return _model(nodes, [_info("x", [1, 2, 3, 3])], [_info("y", [1, 4])], init, opset=13)
