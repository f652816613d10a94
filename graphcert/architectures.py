"""Standard architectures for `graphcert train --arch`, built in torch and exported to ONNX.

`mlp` is the 784-100-100-100-10 ReLU network of the interval-training tutorial (input and output sizes
follow the data); `cnn` is a small convolutional network: two 4x4 stride-2 convolutions (16 and 32
channels) and two dense layers (100 units, then the classes). Both take input `image` [batch, ...sample
shape] and give `logits` [batch, classes], with torch's default initialisation drawn from `seed`.

`lipmlp` is the 1-Lipschitz candidate for `--method orthogonal`: 784-256-256-256-10 dense layers with
GroupSort2 activations and orthogonal weights (deel-lip's initialisation; the biases keep torch's default,
as equal zero biases would be merged by the exporter and then folded away). GroupSort2 exports as
Reshape [-1, 1, n] -> MaxPool (kernel 2, stride 2) and Neg -> MaxPool -> Neg -> Concat -> Reshape [-1, n]:
the pattern `passes/lipschitz.py` recognises as exactly 1-Lipschitz, and ops IBP and CROWN bound.
"""
from __future__ import annotations

import io
import math
import warnings

import onnx

from .errors import InputError

ARCHITECTURES = ("mlp", "cnn", "lipmlp")
LIPMLP_WIDTH = 256
INPUT_NAME, OUTPUT_NAME = "image", "logits"
OPSET = 17


def _conv_size(size: int) -> int:
    return (size + 2 * 1 - 4) // 2 + 1  # kernel 4, stride 2, padding 1


def build(arch: str, sample_shape: tuple[int, ...], n_classes: int, seed: int = 0) -> onnx.ModelProto:
    """The ONNX model of `arch` for samples of `sample_shape` (without the batch axis)."""
    import torch
    from torch import nn

    sample_shape = tuple(int(d) for d in sample_shape)
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown architecture '{arch}'; choose one of: {', '.join(ARCHITECTURES)}")
    if n_classes < 2:
        raise InputError(f"a classifier needs at least 2 classes; the data has {n_classes}")
    features = math.prod(sample_shape)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if arch == "mlp":
            net = nn.Sequential(nn.Flatten(), nn.Linear(features, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                                nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, n_classes))
        elif arch == "lipmlp":
            net = _lipmlp(features, n_classes)
        else:
            if len(sample_shape) != 3 or min(sample_shape[1:]) < 2:
                raise InputError(f"--arch cnn needs image samples [channels, height, width] of at least 2x2 "
                                 f"pixels; this data has samples of shape {list(sample_shape)}")
            channels, height, width = sample_shape
            flat = 32 * _conv_size(_conv_size(height)) * _conv_size(_conv_size(width))
            net = nn.Sequential(nn.Conv2d(channels, 16, 4, stride=2, padding=1), nn.ReLU(),
                                nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                nn.Linear(flat, 100), nn.ReLU(), nn.Linear(100, n_classes))
    finally:
        torch.random.set_rng_state(generator_state)
    return export(net.eval(), sample_shape)


def _lipmlp(features: int, n_classes: int):
    from torch import nn
    widths = [features] + [LIPMLP_WIDTH] * 3
    layers = [nn.Flatten()]
    for n_in, n_out in zip(widths, widths[1:]):
        layers += [nn.Linear(n_in, n_out), _group_sort2(n_out)]
    layers.append(nn.Linear(widths[-1], n_classes))
    net = nn.Sequential(*layers)
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight)
    return net


def _group_sort2(width: int):
    """A module sorting consecutive pairs of `width` features: all the pairs' minima, then all their maxima."""
    import torch
    from torch import nn
    from torch.nn import functional

    class GroupSort2(nn.Module):
        def forward(self, x):
            cells = x.reshape(-1, 1, width)
            high = functional.max_pool1d(cells, 2)
            low = -functional.max_pool1d(-cells, 2)
            return torch.cat([low, high], 1).reshape(-1, width)

    if width % 2:
        raise InputError(f"GroupSort2 sorts pairs: it needs an even width, got {width}")
    return GroupSort2()


def export(net, sample_shape: tuple[int, ...]) -> onnx.ModelProto:
    import torch
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exact for these layers and needs no extra packages.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros((1, *sample_shape)),), buffer, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    return proto
