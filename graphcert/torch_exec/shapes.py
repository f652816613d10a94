"""Torch kernels: moving, copying and selecting elements; types, shapes and generated tensors."""
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
from graphcert.torch_exec.layers import _torch_pads


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


# ScatterElements' reductions as torch's scatter_reduce names them (ONNX keeps the existing element too).
_SCATTER_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@kernel("ScatterElements")
def _scatter_elements(node, setup):
    axis = attr(node, "axis", 0)
    reduction = attr(node, "reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction != "none" and reduction not in _SCATTER_REDUCTIONS:
        raise _Unsupported(f"ScatterElements reduction {reduction}")

    def scatter(data, indices, updates):
        dim = axis % data.dim()
        index = torch.where(indices < 0, indices + data.shape[dim], indices).long()
        if reduction == "none":
            return data.scatter(dim, index, updates)
        return data.scatter_reduce(dim, index, updates, _SCATTER_REDUCTIONS[reduction], include_self=True)
    return scatter


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
    # numpy's broadcasting is ONNX's; torch.broadcast_shapes would import torch.fx and sympy (0.4 s) on first use.
    return lambda x, shape: x.expand(np.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


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
    to = ir.DataType(attr(node, "to"))
    if to in FLOAT8:
        return _cast_to_float8(FLOAT8[to], to, attr(node, "saturate", 1))
    target = setup.torch_dtype(to)
    return lambda x: x.to(target)


# 8-bit floats ONNX defines saturation for: torch type, mantissa bits, and whether a tie at the largest finite
# value plus half an ulp rounds to overflow (the largest value's last mantissa bit is odd).
FLOAT8 = {ir.DataType.FLOAT8E4M3FN: (torch.float8_e4m3fn, 3, False),
          ir.DataType.FLOAT8E4M3FNUZ: (torch.float8_e4m3fnuz, 3, True),
          ir.DataType.FLOAT8E5M2: (torch.float8_e5m2, 2, True), ir.DataType.FLOAT8E5M2FNUZ: (torch.float8_e5m2fnuz, 2, True)}


def _cast_to_float8(spec, to: ir.DataType, saturate: int):
    """ONNX's cast to an 8-bit float: round to nearest even; out of range, the largest value (saturate) or
    infinity (E5M2) / NaN (types without infinities). torch's own conversion neither saturates nor overflows
    alike for every type, so the range is handled here and only in-range values go through torch."""
    dtype, mantissa_bits, odd_top = spec
    top = float(torch.finfo(dtype).max)
    overflow_at = top + 2.0 ** (math.floor(math.log2(top)) - mantissa_bits - 1)  # top + half an ulp
    beyond = math.inf if to == ir.DataType.FLOAT8E5M2 else math.nan

    def cast(x):
        inside = x.clamp(-top, top)
        if not saturate:
            magnitude = x.abs()
            over = (magnitude >= overflow_at) if odd_top else (magnitude > overflow_at)
            inside = torch.where(over, torch.full_like(x, beyond).copysign(x), inside)
        return inside.to(dtype)
    return cast


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
