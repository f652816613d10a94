"""Torch kernels: pooling and reductions."""
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
from graphcert.torch_exec.layers import _CONV, _MAX_POOL, _Window, _torch_pads  # noqa: F401


# ---- pooling and reductions ----------------------------------------------------------------------------

@kernel("AveragePool")
def _average_pool(node, setup):
    kernel_shape = _fixed(node, "kernel_shape")
    window, rank = _Window(node), len(kernel_shape)
    count_pads = bool(attr(node, "count_include_pad", 0))

    def average_pool(x):
        sizes = list(x.shape[2:])
        strides, dilations, begin, end, extra = window.geometry(sizes, kernel_shape)
        channels = x.shape[1]
        # Window sums over the padded input, divided by how many counted cells each window covers.
        ones = torch.ones((channels, 1, *kernel_shape), dtype=x.dtype, device=x.device)
        sums = _CONV[rank](F.pad(x, _torch_pads(begin, end)), ones, None, strides, 0, dilations, channels)
        mask = torch.ones((1, 1, *sizes), dtype=x.dtype, device=x.device)
        pads = [e - o for e, o in zip(end, extra)]
        mask = F.pad(mask, _torch_pads(begin, pads), value=1.0 if count_pads else 0.0)
        mask = F.pad(mask, _torch_pads([0] * rank, extra))
        counts = _CONV[rank](mask, ones[:1], None, strides, 0, dilations)
        return sums / counts
    return average_pool


@kernel("MaxPool")
def _max_pool(node, setup):
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        raise _Unsupported("Indices output")
    kernel_shape = _fixed(node, "kernel_shape")
    window, rank = _Window(node), len(kernel_shape)

    def max_pool(x):
        strides, dilations, begin, end, _ = window.geometry(list(x.shape[2:]), kernel_shape)
        padded = F.pad(x, _torch_pads(begin, end), value=-math.inf) if any(begin + end) else x
        return _MAX_POOL[rank](padded, kernel_shape, strides, 0, dilations)
    return max_pool


@kernel("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node, setup):
    if node.op_type == "GlobalAveragePool":
        return lambda x: x.mean(tuple(range(2, x.dim())), keepdim=True)
    return lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True)


_REDUCTIONS = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin}


@kernel(*_REDUCTIONS)
def _reduce(node, setup):
    function = _REDUCTIONS[node.op_type]
    keepdims = bool(attr(node, "keepdims", 1))
    skip_empty = bool(attr(node, "noop_with_empty_axes", 0))
    fixed_axes = _fixed(node, "axes")  # an attribute before opset 18 (ReduceSum: 13), an input after

    def reduce(x, axes=None):
        dims = _ints(axes) if axes is not None else fixed_axes
        if not dims:
            if skip_empty:
                return x
            dims = list(range(x.dim()))
        if x.dim() == 0:
            return x
        return function(x, dim=tuple(dims), keepdim=keepdims)
    return reduce


@kernel("ArgMax", "ArgMin")
def _arg_extreme(node, setup):
    function = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    axis, keepdims = attr(node, "axis", 0), bool(attr(node, "keepdims", 1))
    last = bool(attr(node, "select_last_index", 0))

    def arg_extreme(x):
        if not last:  # torch, like ONNX by default, picks the first of tied elements
            return function(x, axis, keepdims)
        size = x.shape[axis]
        return size - 1 - function(x.flip(axis), axis, keepdims)
    return arg_extreme


@kernel("CumSum")
def _cumsum(node, setup):
    exclusive, reverse = bool(attr(node, "exclusive", 0)), bool(attr(node, "reverse", 0))

    def cumsum(x, axis):
        dim = int(axis.item())
        if reverse:
            x = x.flip(dim)
        if exclusive and x.shape[dim] > 0:
            # Shift rather than subtract x from the inclusive sum: inf - inf would give nan.
            head = torch.zeros_like(x.narrow(dim, 0, 1))
            total = torch.cat([head, torch.cumsum(x.narrow(dim, 0, x.shape[dim] - 1), dim)], dim)
        else:
            total = torch.cumsum(x, dim)
        return total.flip(dim) if reverse else total
    return cumsum


@kernel("IsInf")
def _is_inf(node, setup):
    negative, positive = bool(attr(node, "detect_negative", 1)), bool(attr(node, "detect_positive", 1))
    if negative and positive:
        return torch.isinf
    if positive:
        return torch.isposinf
    if negative:
        return torch.isneginf
    return lambda x: torch.zeros_like(x, dtype=torch.bool)
