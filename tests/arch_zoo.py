"""Small versions of real architectures with random weights, written by hand in torch (torchvision is not a
dependency), and their ONNX exports as users make them: the dynamo exporter (torch's default: batch fixed at 1,
weights in an external .onnx.data file) and the TorchScript exporter (fixed or dynamic batch), several opsets,
and float16 copies.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

torch = None
nn = None


def _torch():
    global torch, nn
    if torch is None:
        import torch as _t
        import torch.nn as _nn
        torch, nn = _t, _nn
    return torch


# ---- architectures -------------------------------------------------------------------------------------

def residual_cnn():
    """The issue's small residual CNN: stem conv, one BasicBlock with BatchNorm, flatten, linear."""
    _torch()

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block = nn.Conv2d(1, 4, 3, stride=2, padding=1), Block(4)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            x = self.block(torch.relu(self.stem(x)))
            return self.fc(x.reshape(x.shape[0], -1))

    return Net(), (1, 16, 16)


def resnet():
    """ResNet-18-style: BasicBlocks with BatchNorm, a strided block with a 1x1 projection, global pooling."""
    _torch()

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            skip = x if self.down is None else self.down(x)
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + skip)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.MaxPool2d(2))
            self.layers = nn.Sequential(Basic(8, 8, 1), Basic(8, 16, 2))
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return Net(), (3, 16, 16)


def _squeeze_excite(c, gate):
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.reduce, self.expand = nn.Conv2d(c, max(c // 4, 2), 1), nn.Conv2d(max(c // 4, 2), c, 1)

        def forward(self, x):
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            return x * gate(self.expand(torch.relu(self.reduce(s))))
    return SE()


def mobilenet_v2():
    """MobileNetV2: inverted residuals with ReLU6 and depthwise convolutions."""
    _torch()

    class Inverted(nn.Module):
        def __init__(self, c, expand):
            super().__init__()
            h = c * expand
            self.body = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                      nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                      nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return x + self.body(x)

    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(), Inverted(8, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return net, (3, 16, 16)


def mobilenet_v3():
    """MobileNetV3: HardSwish, squeeze-excitation gated by HardSigmoid, depthwise convolutions."""
    _torch()
    se = _squeeze_excite(16, nn.functional.hardsigmoid)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Hardswish(), nn.Conv2d(8, 16, 1), nn.Hardswish(),
                        nn.Conv2d(16, 16, 3, 1, 1, groups=16), se, nn.Hardswish(), nn.Conv2d(16, 8, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return net, (3, 16, 16)


def efficientnet():
    """EfficientNet-B0-style MBConv: SiLU, depthwise conv, squeeze-excitation gated by Sigmoid."""
    _torch()
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3, 1, 1, groups=8),
                        nn.SiLU(), _squeeze_excite(8, torch.sigmoid), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    return net, (3, 16, 16)


def densenet():
    """DenseNet: each layer's output concatenated to its input along the channels."""
    _torch()

    class Dense(nn.Module):
        def __init__(self, c, growth):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, 1, 1))

        def forward(self, x):
            return torch.cat([x, self.body(x)], dim=1)

    net = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), Dense(6, 4), Dense(10, 4), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(14 * 4 * 4, 10))
    return net, (3, 16, 16)


def convnext(approximate="none"):
    """ConvNeXt block: depthwise 7x7, LayerNorm over channels (channels-last), GELU, layer scale."""
    _torch()

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
            self.up, self.down = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
            self.gelu = nn.GELU(approximate=approximate)
            self.scale = nn.Parameter(torch.full((c,), 0.5))

        def forward(self, x):
            y = self.dw(x).permute(0, 2, 3, 1)
            y = self.down(self.gelu(self.up(self.norm(y)))) * self.scale
            return x + y.permute(0, 3, 1, 2)

    net = nn.Sequential(nn.Conv2d(3, 8, 4, 4), Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return net, (3, 16, 16)


def _encoder_layer(d, heads):
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            attn = torch.softmax(q @ k.transpose(-2, -1) / (d // heads) ** 0.5, dim=-1)
            x = x + self.out((attn @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.mlp(self.n2(x))
    return Layer()


def vit():
    """A small ViT: patch embedding, class token, positional embedding, one pre-norm encoder layer."""
    _torch()

    class Net(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.patch = nn.Conv2d(3, d, 4, 4)
            self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
            self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.1)
            self.layer, self.norm, self.head = _encoder_layer(d, 2), nn.LayerNorm(d), nn.Linear(d, 10)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            return self.head(self.norm(self.layer(x))[:, 0])

    return Net(), (3, 16, 16)


def bert():
    """A BERT-style encoder from its embeddings (token embeddings are the perturbed input): one layer, pooled."""
    _torch()

    class Net(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.1)
            self.norm = nn.LayerNorm(d)
            self.layer, self.head = _encoder_layer(d, 2), nn.Linear(d, 2)

        def forward(self, x):
            return self.head(self.layer(self.norm(x + self.pos)).mean(dim=1))

    return Net(), (8, 16)


def recurrent(kind):
    """An LSTM or GRU classifier over a sequence (batch first), reading the last hidden state."""
    _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, kind)(6, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    return Net(), (5, 6)


def unet():
    """A UNet: a strided encoder, ConvTranspose and nearest Resize up, a skip concatenation; per-pixel logits
    pooled to a classifier output."""
    _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU())
            self.down = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU())
            self.up = nn.ConvTranspose2d(8, 4, 2, 2)
            self.mid = nn.Conv2d(8, 4, 3, 1, 1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            e = self.enc(x)
            d = self.down(e)
            u = torch.relu(self.up(d)) + nn.functional.interpolate(d[:, :4], scale_factor=2.0, mode="nearest")
            y = self.head(torch.relu(self.mid(torch.cat([u, e], dim=1))))
            return y.mean(dim=(2, 3))

    return Net(), (3, 16, 16)


ARCHITECTURES = {
    "residual_cnn": residual_cnn, "resnet": resnet, "mobilenet_v2": mobilenet_v2, "mobilenet_v3": mobilenet_v3,
    "efficientnet": efficientnet, "densenet": densenet, "convnext": convnext,
    "convnext_tanh": lambda: convnext("tanh"), "vit": vit, "bert": bert, "lstm": lambda: recurrent("LSTM"),
    "gru": lambda: recurrent("GRU"), "unet": unet,
}


# ---- exports -------------------------------------------------------------------------------------------

def build(name: str, seed: int = 0):
    torch_ = _torch()
    torch_.manual_seed(seed)
    net, shape = ARCHITECTURES[name]()
    net.eval()
    # Random BatchNorm statistics, so folding them is exercised.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return net, shape


def export(name: str, folder: str, exporter: str = "dynamo", opset: int | None = None,
           dynamic: bool = False) -> str:
    """Export architecture `name` as a user would; returns the .onnx path. exporter "dynamo" is
    torch.onnx.export's default (batch fixed at 1, external data); "torchscript" is dynamo=False."""
    torch_ = _torch()
    net, shape = build(name)
    x = torch_.randn(1, *shape)
    tag = f"{name}-{exporter}-{opset or 'default'}{'-dyn' if dynamic else ''}"
    path = os.path.join(folder, f"{tag}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            kwargs = {} if opset is None else {"opset_version": opset}
            if dynamic:
                kwargs["dynamic_shapes"] = ({0: torch_.export.Dim("batch", min=1, max=1024)},)
            _quiet(lambda: torch_.onnx.export(net, (x,), path, **kwargs))
        else:
            kwargs = {"opset_version": opset or 17, "dynamo": False, "input_names": ["x"], "output_names": ["y"]}
            if dynamic:
                kwargs["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
            torch_.onnx.export(net, (x,), path, **kwargs)
    return path


def _quiet(call):
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return call()


def float16_copy(path: str, folder: str) -> str:
    """The model with float16 weights, inputs and outputs (what a half-precision deployment ships)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.FLOAT16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    out = os.path.join(folder, os.path.basename(path).replace(".onnx", "-fp16.onnx"))
    onnx.save(model, out)
    return out


def sample_input(shape, n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(np.float32)


def qdq_copy(path: str, folder: str, samples: int = 8) -> str:
    """The model quantized to int8 in QDQ form by onnxruntime's static quantizer (what an int8 deployment
    ships), calibrated on a few random inputs."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    model = onnx.load(path)
    source = model.graph.input[0]
    shape = [d.dim_value or 1 for d in source.type.tensor_type.shape.dim][1:]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{source.name: sample_input(shape, seed=s)} for s in range(samples)])

        def get_next(self):
            return next(self.feeds, None)

    out = os.path.join(folder, os.path.basename(path).replace(".onnx", "-qdq.onnx"))
    quantize_static(path, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return out
