"""Running ONNX graphs with torch ops, so gradients flow through models and bound graphs alike.

`TorchGraph` turns an `onnx_ir.Model` (a normalised model or a bound graph) into an `nn.Module`. Float
initializers become parameters (or buffers), every node becomes a kernel from one table keyed by op type
(`KERNELS`, op type -> factory that parses the node's attributes once and returns the function to call),
and `forward` walks a precomputed plan. PGD attacks, alpha-CROWN and certified training run on it.
"""
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

from .errors import GraphcertError, InputError, UnsupportedOpError
from . import ops
from .interpret import attr, registrar

KERNELS: dict[str, Callable] = {}


class Setup:
    """What kernel factories may read besides the node: the opset and the executor's float type."""

    def __init__(self, opset: int, float_dtype: torch.dtype):
        self.opset = opset
        self.float_dtype = float_dtype

    def torch_dtype(self, onnx_type: ir.DataType) -> torch.dtype:
        if onnx_type == ir.DataType.FLOAT:
            return self.float_dtype
        if onnx_type not in _FIXED_TYPES:
            raise _Unsupported(f"element type {onnx_type.name}")
        return _FIXED_TYPES[onnx_type]


_FIXED_TYPES = {
    ir.DataType.DOUBLE: torch.float64, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32, ir.DataType.INT16: torch.int16,
    ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8, ir.DataType.BOOL: torch.bool,
}


class _Unsupported(Exception):
    """A factory met an attribute setting it cannot run; reported with the node, never raised to users."""


kernel = registrar(KERNELS)


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _fixed(node: ir.Node, name: str) -> list | None:
    """A list attribute, copied so kernels do not keep the graph alive."""
    found = attr(node, name)
    return None if found is None else list(found)


# ---- element-wise maths ------------------------------------------------------------------------------

def _simple(op_types_and_functions: dict[str, Callable]) -> None:
    for op_type, function in op_types_and_functions.items():
        KERNELS[op_type] = lambda node, setup, function=function: function


def _divide(x, y):
    if x.is_floating_point() or y.is_floating_point():
        return x / y
    return torch.div(x, y, rounding_mode="trunc")  # ONNX integer division truncates, as in C


def _pow(x, y):
    return torch.pow(x, y).to(x.dtype)  # the result has the base's type


_simple({
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _divide, "Pow": _pow,
    "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Sqrt": torch.sqrt, "Exp": torch.exp,
    "Log": torch.log, "Erf": torch.erf, "Atan": torch.atan, "Asinh": torch.asinh, "Sinh": torch.sinh,
    "Floor": torch.floor, "Ceil": torch.ceil, "Sign": torch.sign,
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Sum": lambda *xs: functools.reduce(torch.add, xs),
    "Max": lambda *xs: functools.reduce(torch.maximum, xs),
    "Min": lambda *xs: functools.reduce(torch.minimum, xs),
    "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
    "Equal": torch.eq, "Or": torch.logical_or, "And": torch.logical_and, "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Where": lambda condition, x, y: torch.where(condition.bool(), x, y),
    "Identity": lambda x: x,
    "MatMul": torch.matmul,
    "Size": lambda x: torch.tensor(x.numel(), dtype=torch.int64),
    "NonZero": lambda x: torch.nonzero(x).T,
})


def _elementwise_family(spec: ops.Elementwise) -> None:
    """Element-wise ops stated in graphcert.ops run their own torch function (unless a kernel here exists)."""
    KERNELS.setdefault(spec.op_type, lambda node, setup: spec.torch(node))


ops.on_elementwise(_elementwise_family)


@kernel("LeakyRelu")
def _leaky_relu(node, setup):
    alpha = attr(node, "alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


@kernel("Elu")
def _elu(node, setup):
    alpha = attr(node, "alpha", 1.0)
    return lambda x: torch.where(x > 0, x, alpha * torch.expm1(x))


@kernel("Selu")
def _selu(node, setup):
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    gamma = attr(node, "gamma", 1.05070102214813232421875)
    return lambda x: gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@kernel("HardSigmoid")
def _hard_sigmoid(node, setup):
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)


@kernel("ThresholdedRelu")
def _thresholded_relu(node, setup):
    alpha = attr(node, "alpha", 1.0)
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@kernel("Clip")
def _clip(node, setup):
    fixed_low, fixed_high = attr(node, "min"), attr(node, "max")  # attributes before opset 11, inputs after

    def clip(x, low=fixed_low, high=fixed_high):
        return x if low is None and high is None else torch.clamp(x, low, high)
    return clip


@kernel("Softmax", "LogSoftmax")
def _softmax(node, setup):
    function = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    if setup.opset >= 13:
        axis = attr(node, "axis", -1)
        return lambda x: function(x, axis)
    axis = attr(node, "axis", 1)  # before opset 13: over the 2-D flattening at `axis`

    def flattened(x):
        cut = axis % x.dim()
        return function(x.reshape(math.prod(x.shape[:cut]), -1), 1).reshape(x.shape)
    return flattened


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


# ---- moving, copying and selecting elements ------------------------------------------------------------

@kernel("Flatten")
def _flatten(node, setup):
    axis = attr(node, "axis", 1)

    def flatten(x):
        cut = axis % x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:cut]), math.prod(x.shape[cut:]))
    return flatten


@kernel("Reshape")
def _reshape(node, setup):
    allow_zero = bool(attr(node, "allowzero", 0))

    def reshape(x, shape):
        target = _ints(shape)
        if not allow_zero:
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return x.reshape(target)
    return reshape


@kernel("Transpose")
def _transpose(node, setup):
    perm = _fixed(node, "perm")
    return lambda x: x.permute(perm if perm is not None else list(range(x.dim() - 1, -1, -1)))


@kernel("Squeeze")
def _squeeze(node, setup):
    fixed_axes = _fixed(node, "axes")  # an attribute before opset 13, an input after

    def squeeze(x, axes=None):
        dims = _ints(axes) if axes is not None else fixed_axes
        if dims is None:
            return x.squeeze()
        return x.squeeze(tuple(dims)) if dims else x
    return squeeze


@kernel("Unsqueeze")
def _unsqueeze(node, setup):
    fixed_axes = _fixed(node, "axes")

    def unsqueeze(x, axes=None):
        dims = _ints(axes) if axes is not None else fixed_axes
        rank = x.dim() + len(dims)
        for dim in sorted(d % rank for d in dims):
            x = x.unsqueeze(dim)
        return x
    return unsqueeze


@kernel("Dropout")
def _dropout(node, setup):
    return lambda x, *rest: (x, torch.ones_like(x, dtype=torch.bool))


@kernel("Concat")
def _concat(node, setup):
    axis = attr(node, "axis")
    return lambda *xs: torch.cat(xs, axis)


def _gather_along(x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    return torch.index_select(x, axis, index.to(torch.int64))


@kernel("Gather")
def _gather(node, setup):
    axis = attr(node, "axis", 0)

    def gather(x, indices):
        dim = axis % x.dim()
        size = x.shape[dim]
        flat = torch.where(indices < 0, indices + size, indices).reshape(-1)
        out = _gather_along(x, dim, flat)
        return out.reshape(x.shape[:dim] + indices.shape + x.shape[dim + 1:])
    return gather


@kernel("Slice")
def _slice(node, setup):
    fixed = [_fixed(node, name) for name in ("starts", "ends", "axes")]  # attributes before opset 10

    def slice_(x, starts=None, ends=None, axes=None, steps=None):
        starts = _ints(starts) if starts is not None else fixed[0]
        ends = _ints(ends) if ends is not None else fixed[1]
        axes = (_ints(axes) if axes is not None else fixed[2]) or list(range(len(starts)))
        steps = _ints(steps) or [1] * len(starts)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            x = _slice_axis(x, axis % x.dim(), start, end, step)
        return x
    return slice_


def _slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    """One axis of ONNX Slice: negative positions count from the end, then clamp to the valid range."""
    size = x.shape[axis]
    start, end = start + size if start < 0 else start, end + size if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
        return x.narrow(axis, start, 0) if end <= start else x[(slice(None),) * axis + (slice(start, end, step),)]
    start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    if end >= start:
        return x.narrow(axis, 0, 0)
    return _gather_along(x, axis, torch.arange(start, end, step, device=x.device))


@kernel("Split")
def _split(node, setup):
    axis = attr(node, "axis", 0)
    parts, fixed_sizes = len(node.outputs), _fixed(node, "split")  # an attribute before opset 13

    def split(x, sizes=None):
        chosen = _ints(sizes) or fixed_sizes
        if not chosen:
            size = x.shape[axis]
            chunk = -(-size // parts)  # the last part is smaller when the axis does not divide evenly
            chosen = [min(chunk, size - i * chunk) for i in range(parts)]
        return torch.split(x, list(chosen), axis)
    return split


@kernel("Expand")
def _expand(node, setup):
    return lambda x, shape: x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


@kernel("Tile")
def _tile(node, setup):
    return lambda x, repeats: x.repeat(_ints(repeats))


@kernel("Pad")
def _pad(node, setup):
    mode = attr(node, "mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise _Unsupported(f"mode {mode}")
    fixed_pads, fixed_value = _fixed(node, "pads"), attr(node, "value", 0.0)  # attributes before opset 11

    def pad(x, pads=None, value=None, axes=None):
        amounts = _ints(pads) if pads is not None else fixed_pads
        dims = [a % x.dim() for a in _ints(axes)] if axes is not None else list(range(x.dim()))
        count = len(dims)
        begin, end = [0] * x.dim(), [0] * x.dim()
        for i, dim in enumerate(dims):
            begin[dim], end[dim] = amounts[i], amounts[i + count]
        if mode == "constant":
            fill = fixed_value if value is None else value.item()
            return F.pad(x, _torch_pads(begin, end), value=fill) if any(begin + end) else x
        for dim in range(x.dim()):
            if begin[dim] or end[dim]:
                x = _gather_along(x, dim, _pad_indices(mode, x.shape[dim], begin[dim], end[dim], x.device))
        return x
    return pad


def _pad_indices(mode: str, size: int, begin: int, end: int, device) -> torch.Tensor:
    """Source index of every output position along one axis for edge, reflect and wrap padding."""
    positions = torch.arange(-begin, size + end, device=device)
    if mode == "edge":
        return positions.clamp(0, size - 1)
    if mode == "wrap":
        return positions.remainder(size)
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = positions.remainder(period)
    return torch.where(folded < size, folded, period - folded)


@kernel("DepthToSpace")
def _depth_to_space(node, setup):
    block = attr(node, "blocksize")
    column_major = attr(node, "mode", "DCR") == "CRD"

    def depth_to_space(x):
        n, c, h, w = x.shape
        depth = c // (block * block)
        if column_major:
            y = x.reshape(n, depth, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            y = x.reshape(n, block, block, depth, h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, depth, h * block, w * block)
    return depth_to_space


@kernel("SpaceToDepth")
def _space_to_depth(node, setup):
    block = attr(node, "blocksize")

    def space_to_depth(x):
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * block * block, h // block, w // block)
    return space_to_depth


# ---- types, shapes and generated tensors ---------------------------------------------------------------

@kernel("Cast")
def _cast(node, setup):
    target = setup.torch_dtype(ir.DataType(attr(node, "to")))
    return lambda x: x.to(target)


@kernel("CastLike")
def _cast_like(node, setup):
    return lambda x, like: x.to(like.dtype)


@kernel("Shape")
def _shape(node, setup):
    start, end = attr(node, "start", 0), attr(node, "end")
    return lambda x: torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


@kernel("ConstantOfShape")
def _constant_of_shape(node, setup):
    found = attr(node, "value")
    array = found.numpy() if found is not None else np.zeros(1, np.float32)
    value = array.reshape(-1)[0].item()
    dtype = setup.torch_dtype(ir.DataType.from_numpy(array.dtype))
    return lambda shape: torch.full(_ints(shape), value, dtype=dtype)


@kernel("Range")
def _range(node, setup):
    def range_(start, limit, delta):
        if not start.is_floating_point():
            return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)
        count = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
        return start + delta * torch.arange(count, dtype=start.dtype)
    return range_


def constant_array(node: ir.Node) -> np.ndarray:
    """The value of a Constant node, whichever attribute holds it."""
    for name, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        found = attr(node, name)
        if found is not None:
            return found.numpy() if dtype is None else np.asarray(found, dtype=dtype)
    raise _Unsupported("sparse or string value")


# Checked like a kernel, but its output becomes a buffer when the graph is built.
KERNELS["Constant"] = lambda node, setup: constant_array(node)


# ---- the module -----------------------------------------------------------------------------------------

class _Plan:
    """The steps computing some outputs: (kernel, input slots, output slots, slots to free, node label)."""

    def __init__(self, steps, needed_inputs):
        self.steps = steps
        self.needed_inputs = needed_inputs


class TorchGraph(nn.Module):
    """An ONNX graph as an nn.Module: `tg(feeds) -> {output name: tensor}`, differentiable throughout.

    ONNX FLOAT tensors (inputs, initializers, casts) become `dtype`, chosen here once: convert with a new
    TorchGraph rather than `.to(dtype)`. Feeds may be tensors (their autograd history is kept), arrays or
    numbers; one of a smaller rank than declared gains leading ones (a scalar epsilon broadcasts).
    """

    def __init__(self, model: ir.Model, trainable: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        graph = model.graph
        setup = Setup(model.opset_imports.get("", 17), dtype)
        nodes = _topological(graph)
        factories = _kernels(nodes, setup)
        self._slots: dict[int, int] = {}  # id(ir.Value) -> slot
        self._names: list[str] = []
        self._torch_names: dict[str, str] = {}   # ONNX initializer name -> attribute name
        self._onnx_types: dict[str, np.dtype] = {}
        self._parameter_names: list[str] = []
        self._constants: list[tuple[int, str]] = []
        initializers = [v for v in graph.initializers.values() if v.const_value is not None]
        for value in initializers:
            self._add_constant(value, value.const_value.numpy(), setup, trainable)
        self._inputs = []
        for value in graph.inputs:
            if value.is_initializer():
                continue
            rank = len(value.shape) if value.shape is not None else None
            onnx_type = value.dtype or ir.DataType.FLOAT
            self._inputs.append((value.name, self._slot(value), rank, _feed_dtype(setup, onnx_type, value.name)))
        self._steps = []
        for node in nodes:
            if node.op_type == "Constant":
                self._add_constant(node.outputs[0], factories[id(node)], setup, trainable=False)
                continue
            ins = [self._input_slot(v, setup) if v is not None else -1 for v in node.inputs]
            while ins and ins[-1] == -1:
                ins.pop()
            outs = tuple(self._slot(v) for v in node.outputs)
            label = f"{node.name or '(unnamed)'} ({node.op_type})"
            self._steps.append((factories[id(node)], tuple(ins), outs, label))
        self._outputs = {v.name: self._slot(v) for v in graph.outputs}
        self._producer = {out: i for i, step in enumerate(self._steps) for out in step[2]}
        self._plans: dict[tuple[str, ...], _Plan] = {}
        del self._slots  # keyed by object ids of the model, which the module does not keep

    # -- construction --

    def _slot(self, value: ir.Value) -> int:
        if id(value) not in self._slots:
            self._slots[id(value)] = len(self._names)
            self._names.append(value.name or f"(value {len(self._names)})")
        return self._slots[id(value)]

    def _input_slot(self, value: ir.Value, setup: Setup) -> int:
        if id(value) not in self._slots:
            if value.const_value is None:
                raise GraphcertError(f"value {value.name!r} has no producer and is not an input or initializer")
            self._add_constant(value, value.const_value.numpy(), setup, trainable=False)
        return self._slots[id(value)]

    def _add_constant(self, value: ir.Value, array: np.ndarray, setup: Setup, trainable: bool) -> None:
        try:
            tensor = torch.tensor(np.asarray(array), dtype=setup.torch_dtype(ir.DataType.from_numpy(array.dtype)))
        except (_Unsupported, TypeError) as exc:
            raise GraphcertError(f"constant {value.name!r} of type {array.dtype} cannot become a torch tensor") from exc
        torch_name = self._fresh_name(value.name)
        if trainable and tensor.is_floating_point() and tensor.dim() >= 1:
            self.register_parameter(torch_name, nn.Parameter(tensor))
            self._parameter_names.append(value.name)
        else:
            self.register_buffer(torch_name, tensor)
        if tensor.is_floating_point() and value.is_initializer():
            self._torch_names[value.name] = torch_name
            self._onnx_types[value.name] = array.dtype
        self._constants.append((self._slot(value), torch_name))

    def _fresh_name(self, onnx_name: str) -> str:
        base = "init_" + re.sub(r"\W", "_", onnx_name or "unnamed")
        name, n = base, 1
        while hasattr(self, name):
            name, n = f"{base}_{n}", n + 1
        return name

    def _plan(self, outputs: tuple[str, ...]) -> _Plan:
        if outputs in self._plans:
            return self._plans[outputs]
        unknown = [name for name in outputs if name not in self._outputs]
        if unknown:
            raise InputError(f"unknown output(s) {unknown}; the graph outputs are {list(self._outputs)}")
        wanted = {self._outputs[name] for name in outputs}
        needed, stack = set(), list(wanted)
        chosen = set()
        while stack:
            slot = stack.pop()
            if slot in needed:
                continue
            needed.add(slot)
            if slot in self._producer:
                chosen.add(self._producer[slot])
                stack.extend(s for s in self._steps[self._producer[slot]][1] if s >= 0)
        order = sorted(chosen)
        last_use = {}
        for position, index in enumerate(order):
            for slot in self._steps[index][1]:
                last_use[slot] = position
        steps = []
        for position, index in enumerate(order):
            kernel_, ins, outs, label = self._steps[index]
            frees = tuple(s for s in set(ins) if s >= 0 and last_use.get(s) == position and s not in wanted)
            steps.append((kernel_, ins, outs, frees, label))
        plan = _Plan(steps, [entry for entry in self._inputs if entry[1] in needed])
        self._plans[outputs] = plan
        return plan

    # -- running --

    def forward(self, feeds: dict, outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        names = tuple(outputs) if outputs is not None else tuple(self._outputs)
        plan = self._plan(names)
        env: list = [None] * len(self._names)
        for slot, torch_name in self._constants:
            env[slot] = getattr(self, torch_name)
        missing = [name for name, *_ in plan.needed_inputs if name not in feeds]
        if missing:
            raise InputError(f"missing input(s) {missing}; the graph needs {[e[0] for e in plan.needed_inputs]}")
        for name, slot, rank, dtype in plan.needed_inputs:
            env[slot] = _prepare_feed(feeds[name], rank, dtype)
        for kernel_, ins, outs, frees, label in plan.steps:
            try:
                result = kernel_(*[env[i] if i >= 0 else None for i in ins])
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise GraphcertError(f"torch executor failed at node {label}: {str(exc).splitlines()[0]}") from exc
            if isinstance(result, torch.Tensor):
                env[outs[0]] = result
            else:
                for slot, tensor in zip(outs, result):
                    env[slot] = tensor
            for slot in frees:
                env[slot] = None
        return {name: env[self._outputs[name]] for name in names}

    # -- initializers --

    @property
    def parameter_names(self) -> list[str]:
        return list(self._parameter_names)

    def parameter(self, name: str) -> nn.Parameter:
        if name not in self._parameter_names:
            raise InputError(f"{name!r} is not a trainable initializer; parameters: {self._parameter_names[:10]}")
        return getattr(self, self._torch_names[name])

    def initializer_arrays(self) -> dict[str, np.ndarray]:
        """Current values of the float initializers, in their ONNX element type."""
        return {name: getattr(self, torch_name).detach().cpu().numpy().astype(self._onnx_types[name])
                for name, torch_name in self._torch_names.items()}

    def load_initializers(self, arrays: dict[str, np.ndarray]) -> None:
        unknown = [name for name in arrays if name not in self._torch_names]
        if unknown:
            raise InputError(f"no float initializer named {unknown}")
        with torch.no_grad():
            for name, array in arrays.items():
                target = getattr(self, self._torch_names[name])
                source = torch.as_tensor(np.asarray(array))
                if tuple(source.shape) != tuple(target.shape):
                    raise InputError(f"initializer {name!r} has shape {tuple(target.shape)}, "
                                     f"got an array of shape {tuple(source.shape)}")
                target.copy_(source.to(target.dtype))


def _feed_dtype(setup: Setup, onnx_type: ir.DataType, name: str) -> torch.dtype:
    try:
        return setup.torch_dtype(onnx_type)
    except _Unsupported:
        raise GraphcertError(f"input {name!r} has element type {onnx_type.name}, which the torch executor "
                             f"cannot feed") from None


def _prepare_feed(value, rank: int | None, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of the declared type; a smaller rank (a scalar epsilon) gains leading ones to broadcast."""
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if rank is not None and tensor.dim() < rank:
        tensor = tensor.reshape((1,) * (rank - tensor.dim()) + tuple(tensor.shape))
    return tensor


def _topological(graph: ir.Graph) -> list[ir.Node]:
    """The nodes in an order where every producer comes before its consumers (graph order when it already is)."""
    nodes = list(graph)
    produced_by = {id(out): node for node in nodes for out in node.outputs}
    state: dict[int, int] = {}   # 1 visiting, 2 done
    order: list[ir.Node] = []
    for root in nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                state[id(node)] = 2
                order.append(node)
                continue
            if state.get(id(node)) == 2:
                continue
            if state.get(id(node)) == 1:
                raise GraphcertError(f"the graph has a cycle through node {node.name!r}")
            state[id(node)] = 1
            stack.append((node, True))
            for value in reversed([v for v in node.inputs if v is not None]):
                producer = produced_by.get(id(value))
                if producer is not None and state.get(id(producer)) != 2:
                    stack.append((producer, False))
    return order


def _kernels(nodes: list[ir.Node], setup: Setup) -> dict[int, Callable]:
    """The kernel of every node, or UnsupportedOpError listing every node that has none."""
    found, missing = {}, {}
    for node in nodes:
        label = node.name or "(unnamed)"
        if node.domain not in ("", "ai.onnx") or node.op_type not in KERNELS:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            missing.setdefault(op, []).append(label)
            continue
        try:
            found[id(node)] = KERNELS[node.op_type](node, setup)
        except _Unsupported as reason:
            missing.setdefault(node.op_type, []).append(f"{label}: {reason}")
    if missing:
        raise UnsupportedOpError("torch", missing)
    return found
