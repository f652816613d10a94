"""Torch kernels of the ops IBP bounds by the set their values lie in or by sampling geometry: the random ops
(RandomUniform(Like), RandomNormal(Like), Bernoulli, Multinomial: fresh draws each run, as onnxruntime's),
OptionalGetElement of a tensor, and 2-D DeformConv (bilinear samples at learned offsets, zero outside)."""
from __future__ import annotations

import torch

from graphcert.interpret import attr
from graphcert.torch_exec.core import _Unsupported, kernel

_FLOAT = 1   # TensorProto.FLOAT, the default dtype of the random ops


def _dtype(node, setup, default: int = _FLOAT):
    import onnx_ir as ir
    return setup.torch_dtype(ir.DataType(int(attr(node, "dtype", default))))


@kernel("RandomUniform", "RandomUniformLike")
def _random_uniform(node, setup):
    low, high = float(attr(node, "low", 0.0)), float(attr(node, "high", 1.0))
    if node.op_type == "RandomUniform":
        shape = [int(v) for v in attr(node, "shape")]
        return lambda: torch.rand(shape, dtype=_dtype(node, setup)) * (high - low) + low
    return lambda like: (torch.rand(like.shape, dtype=_dtype(node, setup, _onnx_type(like))) * (high - low) + low)


@kernel("RandomNormal", "RandomNormalLike")
def _random_normal(node, setup):
    mean, scale = float(attr(node, "mean", 0.0)), float(attr(node, "scale", 1.0))
    if node.op_type == "RandomNormal":
        shape = [int(v) for v in attr(node, "shape")]
        return lambda: torch.randn(shape, dtype=_dtype(node, setup)) * scale + mean
    return lambda like: torch.randn(like.shape, dtype=_dtype(node, setup, _onnx_type(like))) * scale + mean


@kernel("Bernoulli")
def _bernoulli(node, setup):
    return lambda p: torch.bernoulli(p.detach().to(torch.float64).clamp(0, 1)).to(
        _dtype(node, setup, _onnx_type(p)))


@kernel("Multinomial")
def _multinomial(node, setup):
    """Input: unnormalised log-probabilities [batch, classes]; `sample_size` draws per row, with replacement."""
    count = int(attr(node, "sample_size", 1))
    return lambda logits: torch.multinomial(torch.softmax(logits.detach().to(torch.float64), dim=-1), count,
                                            replacement=True).to(_dtype(node, setup, 6))   # int32 by default


@kernel("OptionalGetElement")
def _optional_get_element(node, setup):
    return lambda x: x   # IBP takes only an optional holding a tensor (or a plain tensor): that tensor


def _onnx_type(tensor: torch.Tensor) -> int:
    return {torch.float32: 1, torch.float64: 11, torch.float16: 10, torch.bfloat16: 16}.get(tensor.dtype, 1)


@kernel("DeformConv")
def _deform_conv(node, setup):
    group, offset_group = int(attr(node, "group", 1)), int(attr(node, "offset_group", 1))

    def deform_conv(x, w, offset, bias=None, mask=None):
        if x.dim() != 4:
            raise _Unsupported("DeformConv beyond 2-D")
        n, channels, height, width = x.shape
        out_channels, group_channels, kh, kw = w.shape
        oh, ow = offset.shape[-2:]
        strides = [int(v) for v in (attr(node, "strides") or [1, 1])]
        dilations = [int(v) for v in (attr(node, "dilations") or [1, 1])]
        pads = [int(v) for v in (attr(node, "pads") or [0, 0, 0, 0])]
        taps = kh * kw
        offset = offset.reshape(n, offset_group, kh, kw, 2, oh, ow)
        mask = torch.ones(n, offset_group, kh, kw, oh, ow, dtype=x.dtype) if mask is None else \
            mask.reshape(n, offset_group, kh, kw, oh, ow)
        rows = (torch.arange(oh, dtype=x.dtype) * strides[0] - pads[0]).reshape(1, 1, oh, 1)
        cols = (torch.arange(ow, dtype=x.dtype) * strides[1] - pads[1]).reshape(1, 1, 1, ow)
        tap_rows = (torch.arange(kh, dtype=x.dtype) * dilations[0]).reshape(kh, 1, 1, 1)
        tap_cols = (torch.arange(kw, dtype=x.dtype) * dilations[1]).reshape(1, kw, 1, 1)
        per_group = channels // offset_group
        sampled = []
        for g in range(offset_group):
            y = (rows + tap_rows).unsqueeze(0) + offset[:, g, :, :, 0]            # [n, kh, kw, oh, ow]
            z = (cols + tap_cols).unsqueeze(0) + offset[:, g, :, :, 1]
            values = _bilinear_zero(x[:, g * per_group:(g + 1) * per_group], y.reshape(n, taps, oh, ow),
                                    z.reshape(n, taps, oh, ow))                   # [n, c, taps, oh, ow]
            sampled.append(values * mask[:, g].reshape(n, 1, taps, oh, ow))
        columns = torch.cat(sampled, dim=1)                                       # [n, C, taps, oh, ow]
        per_out = out_channels // group
        outputs = []
        for g in range(group):
            weights = w[g * per_out:(g + 1) * per_out].reshape(per_out, group_channels, taps)
            outputs.append(torch.einsum("ock,nckhw->nohw", weights,
                                        columns[:, g * group_channels:(g + 1) * group_channels]))
        result = torch.cat(outputs, dim=1)
        return result if bias is None else result + bias.reshape(1, -1, 1, 1)
    return deform_conv


def _bilinear_zero(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x [n, c, H, W] sampled at pixel coordinates (y, z) [n, k, oh, ow], bilinearly, each of the four neighbours
    outside the image counting as 0 -> [n, c, k, oh, ow]."""
    n, c, height, width = x.shape
    y0, z0 = torch.floor(y), torch.floor(z)
    flat = x.reshape(n, c, height * width)
    found = 0
    for dy in (0, 1):
        for dz in (0, 1):
            row, col = y0 + dy, z0 + dz
            weight = (1 - (y - row).abs()) * (1 - (z - col).abs())
            inside = (row >= 0) & (row <= height - 1) & (col >= 0) & (col <= width - 1)
            index = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1)).long()
            picked = torch.gather(flat, 2, index.reshape(n, 1, -1).expand(n, c, -1)).reshape(n, c, *index.shape[1:])
            found = found + picked * (weight * inside).unsqueeze(1)
    return found
