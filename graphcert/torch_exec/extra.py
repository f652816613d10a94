"""Torch kernels of the ops IBP bounds beyond the classic layers (passes/ibp_rules_*.py) and of the ops their
bound graphs emit: trigonometry, Mod, Round, Xor, Mean, Hardmax, OneHot, Lp pools and norms, Resize,
GridSample, ReduceL1/ReduceL2."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from graphcert.interpret import attr
from graphcert.torch_exec.core import KERNELS, _Unsupported, _ints, kernel
from graphcert.torch_exec.layers import _Window, _torch_pads
from graphcert.torch_exec.pooling import _REDUCTIONS, _reduce

for _op, _function in {
    "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
    "Atanh": torch.atanh, "Acosh": torch.acosh, "Cosh": torch.cosh, "Round": torch.round,  # half to even, as ONNX
    "Xor": torch.logical_xor,
    "Mean": lambda *xs: functools.reduce(torch.add, xs) / len(xs),
}.items():
    KERNELS[_op] = lambda node, setup, function=_function: function

_REDUCTIONS["ReduceL1"] = lambda x, dim, keepdim: torch.sum(x.abs(), dim=dim, keepdim=keepdim)
_REDUCTIONS["ReduceL2"] = lambda x, dim, keepdim: torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))
KERNELS["ReduceL1"] = KERNELS["ReduceL2"] = _reduce


@kernel("Mod")
def _mod(node, setup):
    return torch.fmod if attr(node, "fmod", 0) else torch.remainder  # C's fmod, or the divisor's sign


@kernel("Hardmax")
def _hardmax(node, setup):
    axis = attr(node, "axis", -1)

    def hardmax(x):
        index = torch.argmax(x, dim=axis, keepdim=True)  # the first of tied maxima, as ONNX
        return torch.zeros_like(x).scatter(axis % x.dim(), index, 1.0)
    return hardmax


@kernel("OneHot")
def _one_hot(node, setup):
    axis = attr(node, "axis", -1)

    def one_hot(indices, depth, values):
        n = int(depth.reshape(-1)[0].item())
        index = indices.to(torch.int64)
        index = torch.where(index < 0, index + n, index)
        where = axis % (index.dim() + 1)
        shape = [1] * (index.dim() + 1)
        shape[where] = n
        hit = index.unsqueeze(where) == torch.arange(n, device=index.device).reshape(shape)
        return torch.where(hit, values[1], values[0])
    return one_hot


@kernel("LpPool")
def _lp_pool(node, setup):
    kernel_shape, p = list(attr(node, "kernel_shape")), attr(node, "p", 2)
    window = _Window(node)

    def lp_pool(x):
        strides, dilations, begin, end, _ = window.geometry(list(x.shape[2:]), kernel_shape)
        if any(d != 1 for d in dilations):
            raise _Unsupported("LpPool with dilations")
        powered = F.pad(x.abs() ** p, _torch_pads(begin, end))
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel_shape)]
        total = pool(powered, kernel_shape, strides) * math.prod(kernel_shape)
        return total ** (1.0 / p)
    return lp_pool


@kernel("GlobalLpPool")
def _global_lp_pool(node, setup):
    p = attr(node, "p", 2)
    return lambda x: torch.sum(x.abs() ** p, dim=tuple(range(2, x.dim())), keepdim=True) ** (1.0 / p)


@kernel("LpNormalization")
def _lp_normalization(node, setup):
    axis, p = attr(node, "axis", -1), attr(node, "p", 2)
    return lambda x: x / torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)


@kernel("GridSample")
def _grid_sample(node, setup):
    mode = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest"}.get(attr(node, "mode", "linear"))
    if mode is None:
        raise _Unsupported(f"GridSample mode {attr(node, 'mode')}")
    padding = attr(node, "padding_mode", "zeros")
    align = bool(attr(node, "align_corners", 0))
    return lambda x, grid: F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding, align_corners=align)


# ---- Resize: separable 1-D resampling with ONNX's coordinate maps -----------------------------------------

def _source_coordinates(mode: str, out_size: int, in_size: int, scale: float) -> np.ndarray:
    x = np.arange(out_size, dtype=np.float64)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros_like(x)
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_size > 1 else np.zeros_like(x)
    if mode == "half_pixel_symmetric":
        adjustment = out_size / (scale * in_size)
        offset = in_size / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    raise _Unsupported(f"Resize coordinate_transformation_mode {mode}")


def _nearest(mode: str, coordinates: np.ndarray) -> np.ndarray:
    if mode == "floor":
        return np.floor(coordinates)
    if mode == "ceil":
        return np.ceil(coordinates)
    if mode == "round_prefer_ceil":
        return np.floor(coordinates + 0.5)
    return np.ceil(coordinates - 0.5)  # round_prefer_floor (the default)


@kernel("Resize", "Upsample")
def _resize(node, setup):
    mode = attr(node, "mode", "nearest")
    transform = attr(node, "coordinate_transformation_mode", "half_pixel" if node.op_type == "Resize" else "asymmetric")
    nearest_mode = attr(node, "nearest_mode", "round_prefer_floor")
    if mode == "cubic" or attr(node, "exclude_outside", 0) or attr(node, "antialias", 0):
        return _resize_by_matrices(node)
    if mode not in ("nearest", "linear", "bilinear") or attr(node, "antialias", 0) or attr(node, "axes") is not None \
            or attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch" or node.op_type == "Upsample" \
            and setup.opset > 9:
        raise _Unsupported(f"{node.op_type} with these attributes")

    def resize(x, *rest):
        scales, sizes = (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
        if node.op_type == "Upsample":
            scales = rest[0]
        if sizes is not None and sizes.numel():
            out_sizes = _ints(sizes)
            factors = [o / i for o, i in zip(out_sizes, x.shape)]
        else:
            factors = [float(s) for s in scales.reshape(-1).tolist()]
            out_sizes = [int(math.floor(i * f)) for i, f in zip(x.shape, factors)]
        for axis, (n_in, n_out, factor) in enumerate(zip(x.shape, out_sizes, factors)):
            if n_in == n_out and factor == 1.0:
                continue
            source = _source_coordinates("asymmetric" if mode == "nearest" and node.op_type == "Upsample" else
                                         transform, n_out, n_in, factor)
            if mode == "nearest":
                index = np.clip(_nearest("floor" if node.op_type == "Upsample" else nearest_mode, source), 0, n_in - 1)
                x = torch.index_select(x, axis, torch.as_tensor(index.astype(np.int64), device=x.device))
                continue
            source = np.clip(source, 0, n_in - 1)
            low = np.floor(source).astype(np.int64)
            high = np.minimum(low + 1, n_in - 1)
            weight = torch.as_tensor(source - low, dtype=x.dtype, device=x.device)
            shape = [1] * x.dim()
            shape[axis] = n_out
            weight = weight.reshape(shape)
            below = torch.index_select(x, axis, torch.as_tensor(low, device=x.device))
            above = torch.index_select(x, axis, torch.as_tensor(high, device=x.device))
            x = below * (1 - weight) + above * weight
        return x
    return resize


def _resize_by_matrices(node):
    """Cubic, antialiased or exclude_outside resizing as the runtime's per-axis weight matrices
    (graphcert.ops.resize_matrix), built once per input shape."""
    from graphcert import ops
    if attr(node, "axes") is not None or attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch" or \
            attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        raise _Unsupported("Resize with axes, an aspect-ratio policy or cropping")
    cache = {}

    def resize(x, *rest):
        scales, sizes = (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
        sizes = _ints(sizes) if sizes is not None and sizes.numel() else None
        scales = [float(v) for v in scales.reshape(-1).tolist()] if sizes is None else None
        key = (tuple(x.shape), tuple(sizes or ()), tuple(scales or ()))
        if key not in cache:
            cache[key] = {}
            for axis, extent in enumerate(x.shape):
                size = sizes[axis] if sizes is not None else None
                if (size is not None and size != extent) or (scales is not None and scales[axis] != 1.0):
                    try:
                        matrix = ops.resize_matrix(node, int(extent), size, None if size is not None else scales[axis])
                    except RuntimeError as exc:
                        raise _Unsupported(f"Resize: {exc}") from None
                    cache[key][axis] = torch.as_tensor(matrix.T, dtype=x.dtype)
        for axis, matrix in cache[key].items():
            x = torch.movedim(torch.movedim(x, axis, -1) @ matrix.to(x.device), -1, axis)
        return x
    return resize


@kernel("DFT")
def _dft(node, setup):
    """ONNX's DFT: real ([..., 1]) or complex ([..., 2]) signals along `axis` (an attribute before opset 20, an
    input after), zero-padded or cut to dft_length, inverse scaled by 1/n, onesided keeping n // 2 + 1 bins."""
    inverse, onesided = bool(attr(node, "inverse", 0)), bool(attr(node, "onesided", 0))

    def dft(x, dft_length=None, axis_input=None):
        axis = int(axis_input.reshape(-1)[0]) if axis_input is not None else int(attr(node, "axis", 1))
        axis %= x.dim()
        signal = torch.complex(x[..., 0], x[..., 1] if x.shape[-1] == 2 else torch.zeros_like(x[..., 0]))
        n = int(dft_length.reshape(-1)[0]) if dft_length is not None else signal.shape[axis]
        y = (torch.fft.ifft if inverse else torch.fft.fft)(signal.to(torch.complex128), n=n, dim=axis)
        if onesided:
            y = y.narrow(axis, 0, n // 2 + 1)
        return torch.stack([y.real, y.imag], dim=-1).to(x.dtype)
    return dft


def _product(x, dim, keepdim):
    for axis in sorted((d % x.dim() for d in dim), reverse=True):
        x = torch.prod(x, dim=axis, keepdim=keepdim)
    return x


_REDUCTIONS["ReduceProd"] = _product
KERNELS["ReduceProd"] = _reduce


KERNELS["Det"] = lambda node, setup: torch.linalg.det


@kernel("LRN")
def _lrn(node, setup):
    """x / (bias + alpha/size · sum of squares over a window of channels)^beta, ONNX's window (see
    passes/ibp_rules_reduce._lrn_band)."""
    from graphcert.passes.ibp_rules_reduce import _lrn_band
    size = int(attr(node, "size"))
    alpha, beta, bias = (float(attr(node, k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))

    def lrn(x):
        band = torch.as_tensor(_lrn_band(node, x.shape[1]).T, dtype=x.dtype, device=x.device)
        window = torch.movedim(torch.movedim(x * x, 1, -1) @ band, -1, 1)
        return x * torch.pow(bias + alpha / size * window, -beta)
    return lrn


@kernel("BitCast")
def _bitcast(node, setup):
    import onnx_ir as ir
    target = setup.torch_dtype(ir.DataType(attr(node, "to")))
    return lambda x: x.view(target)
