"""Standard architectures for `graphcert train --arch`, built in torch and exported to ONNX.

`mlp` is the 784-100-100-100-10 ReLU network of the interval-training tutorial (input and output sizes
follow the data); `cnn` is a small convolutional network: two 4x4 stride-2 convolutions (16 and 32
channels) and two dense layers (100 units, then the classes). Both take input `image` [batch, ...sample
shape] and give `logits` [batch, classes], with torch's default initialisation drawn from `seed`.
"""
from __future__ import annotations

import io
import math
import warnings

import onnx

from .errors import InputError

ARCHITECTURES = ("mlp", "cnn")
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
