"""Torch kernels: linear layers, convolutions and normalisations."""
from __future__ import annotations

import functools
import math
import re
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from graphcert import ops
from graphcert.interpret import attr
from graphcert.torch_exec.core import KERNELS, Setup, _FIXED_TYPES, _Unsupported, _fixed, _ints, kernel  # noqa: F401


# ---- linear layers -------------------------------------------------------------------------------------

@kernel("Gemm")
def _gemm(node, setup):
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)

    def gemm(a, b, c=None):
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if alpha != 1.0:
            y = alpha * y
        if c is not None:
            y = y + (c if beta == 1.0 else beta * c)
        return y
    return gemm


@kernel("Einsum")
def _einsum(node, setup):
    equation = attr(node, "equation").replace(" ", "")
    return lambda *xs: torch.einsum(equation, *xs)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) lists in axis order to F.pad's order: last axis first."""
    pairs = []
    for b, e in zip(reversed(begin), reversed(end)):
        pairs += [b, e]
    return pairs


class _Window:
    """The sliding-window attributes of Conv, ConvTranspose and the pools, parsed once."""

    def __init__(self, node: ir.Node):
        self.auto_pad = attr(node, "auto_pad", "NOTSET")
        self.strides, self.dilations = _fixed(node, "strides"), _fixed(node, "dilations")
        self.pads = _fixed(node, "pads")
        self.ceil_mode = bool(attr(node, "ceil_mode", 0))

    def geometry(self, sizes: list[int], kernel_shape: list[int]):
        """Strides, dilations and the begin/end padding of each spatial axis such that a floor-mode slide
        gives the ONNX output size; the end padding includes the overhang of ceil-mode windows (`extra`)."""
        rank = len(sizes)
        strides, dilations = self.strides or [1] * rank, self.dilations or [1] * rank
        pads = self.pads or [0] * (2 * rank)
        begin, end, extra = [], [], []
        for i, size in enumerate(sizes):
            reach = (kernel_shape[i] - 1) * dilations[i] + 1
            if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                total = max(0, (-(-size // strides[i]) - 1) * strides[i] + reach - size)
                low = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
                b, e = low, total - low
            elif self.auto_pad == "VALID":
                b, e = 0, 0
            else:
                b, e = pads[i], pads[i + rank]
            span = size + b + e - reach
            count = (-(-span // strides[i]) if self.ceil_mode else span // strides[i]) + 1
            if self.ceil_mode and (count - 1) * strides[i] >= size + b:
                count -= 1  # a window may not start in the end padding
            overhang = max(0, (count - 1) * strides[i] + reach - (size + b + e))
            begin.append(b)
            end.append(e + overhang)
            extra.append(overhang)
        return strides, dilations, begin, end, extra


@kernel("Conv")
def _conv(node, setup):
    group, window = attr(node, "group", 1), _Window(node)

    def conv(x, w, bias=None):
        rank = w.dim() - 2
        strides, dilations, begin, end, _ = window.geometry(list(x.shape[2:]), list(w.shape[2:]))
        if begin == end:
            return _CONV[rank](x, w, bias, strides, begin, dilations, group)
        return _CONV[rank](F.pad(x, _torch_pads(begin, end)), w, bias, strides, 0, dilations, group)
    return conv


@kernel("ConvTranspose")
def _conv_transpose(node, setup):
    group, auto_pad = attr(node, "group", 1), attr(node, "auto_pad", "NOTSET")
    fixed_strides, fixed_dilations = _fixed(node, "strides"), _fixed(node, "dilations")
    output_padding, output_shape = _fixed(node, "output_padding"), _fixed(node, "output_shape")
    fixed_pads = _fixed(node, "pads")

    def conv_transpose(x, w, bias=None):
        rank = w.dim() - 2
        strides, dilations = fixed_strides or [1] * rank, fixed_dilations or [1] * rank
        extra = output_padding or [0] * rank
        sizes = list(x.shape[2:])
        # The full transposed convolution, then per axis the output padding added and the pads cropped.
        full = _CONV_TRANSPOSE[rank](x, w, None, strides, 0, 0, group, dilations)
        natural = [strides[i] * (sizes[i] - 1) + extra[i] + (w.shape[2 + i] - 1) * dilations[i] + 1
                   for i in range(rank)]
        wanted = output_shape[-rank:] if output_shape else None
        if wanted is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            wanted = [sizes[i] * strides[i] for i in range(rank)]
        if wanted is not None:
            totals = [natural[i] - wanted[i] for i in range(rank)]
            small = [t // 2 for t in totals]
            begin = small if auto_pad == "SAME_UPPER" else [t - s for t, s in zip(totals, small)]
            end = [t - b for t, b in zip(totals, begin)]
        else:
            pads = fixed_pads or [0] * (2 * rank)
            begin, end = pads[:rank], pads[rank:]
        y = F.pad(full, _torch_pads([-b for b in begin], [e - p for e, p in zip(extra, end)]))
        if bias is not None:
            y = y + bias.reshape((-1,) + (1,) * rank)
        return y
    return conv_transpose


@kernel("BatchNormalization")
def _batch_norm(node, setup):
    if attr(node, "training_mode", 0):
        raise _Unsupported("training_mode=1")
    eps = attr(node, "epsilon", 1e-5)

    def batch_norm(x, scale, bias, mean, var):
        shape = (-1,) + (1,) * (x.dim() - 2)
        gain = (scale * torch.rsqrt(var + eps)).reshape(shape)
        return (x - mean.reshape(shape)) * gain + bias.reshape(shape)
    return batch_norm


@kernel("LayerNormalization")
def _layer_norm(node, setup):
    axis, eps = attr(node, "axis", -1), attr(node, "epsilon", 1e-5)

    def layer_norm(x, scale, bias=None):
        dims = tuple(range(axis % x.dim(), x.dim()))
        mean = x.mean(dims, keepdim=True)
        centered = x - mean
        inv_std = torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
        y = centered * inv_std * scale
        return (y if bias is None else y + bias), mean, inv_std
    return layer_norm


@kernel("InstanceNormalization")
def _instance_norm(node, setup):
    eps = float(attr(node, "epsilon", 1e-5))

    def instance_norm(x, scale, bias):
        axes = list(range(2, x.dim()))
        mean = x.mean(dim=axes, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
        shape = [-1] + [1] * len(axes)
        return (x - mean) / torch.sqrt(var + eps) * scale.reshape(shape) + bias.reshape(shape)
    return instance_norm
