"""Torch kernels of the integer ops of quantized models (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger,
DynamicQuantizeLinear), as onnxruntime computes them: the integer accumulator exactly (in float64), the
requantization rounded half to even and saturated. Quantized values stay floats holding whole numbers, with a
straight-through gradient through the rounding (see `graphcert.torch_exec.quant`)."""
from __future__ import annotations

import torch

from graphcert.torch_exec.core import _Unsupported, kernel
from graphcert.torch_exec.layers import _conv
from graphcert.torch_exec.quant import INTEGERS, _straight_through

EIGHT_BIT = {k: v for k, v in INTEGERS.items() if v in (torch.int8, torch.uint8)}


def _shifted(x: torch.Tensor, zero_point: torch.Tensor | None, shape=None) -> torch.Tensor:
    x = x.to(torch.float64)
    if zero_point is None:
        return x
    zp = zero_point.to(torch.float64)
    return x - (zp.reshape(shape) if shape is not None and zp.numel() > 1 else zp.reshape(-1)[0] if zp.numel() == 1
                else zp)


def _saturated(node, value: torch.Tensor, zero_point: torch.Tensor | None, setup) -> torch.Tensor:
    """round, add the zero point, saturate to the output's type: the node's, or its zero point's where shape
    inference does not know the op (onnxruntime's com.microsoft ones)."""
    target = EIGHT_BIT.get(node.outputs[0].dtype)
    if target is None and zero_point is not None and zero_point.dtype in (torch.int8, torch.uint8):
        target = zero_point.dtype
    if target is None:
        raise _Unsupported(f"{node.op_type} to {node.outputs[0].dtype}")
    info = torch.iinfo(target)
    rounded = _straight_through(value, torch.round(value))
    if zero_point is not None:
        rounded = rounded + zero_point.to(torch.float64)
    return rounded.clamp(info.min, info.max).to(setup.float_dtype)


def _per_channel(v: torch.Tensor, rank: int) -> torch.Tensor:
    return v.reshape([-1] + [1] * (rank - 2)) if v.numel() > 1 else v.reshape(())


@kernel("ConvInteger", "QLinearConv")
def _qlinear_conv(node, setup):
    conv = _conv(node, setup)
    requantize = node.op_type == "QLinearConv"

    def accumulate(x, x_zp, w, w_zp, bias=None):
        rank = w.dim()
        acc = conv(_shifted(x, x_zp), _shifted(w, w_zp, [-1] + [1] * (rank - 1)))
        if bias is not None:
            acc = acc + _per_channel(bias.to(torch.float64), rank)
        return acc

    def qlinear_conv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp=None, bias=None):
        acc = accumulate(x, x_zp, w, w_zp, bias)
        multiplier = (x_scale.to(torch.float64).reshape(()) * _per_channel(w_scale.to(torch.float64), w.dim())
                      / y_scale.to(torch.float64).reshape(()))
        return _saturated(node, acc * multiplier, y_zp, setup)

    def conv_integer(x, w, x_zp=None, w_zp=None):
        return accumulate(x, x_zp, w, w_zp).to(setup.float_dtype)
    return qlinear_conv if requantize else conv_integer


@kernel("MatMulInteger", "QLinearMatMul")
def _qlinear_matmul(node, setup):
    def accumulate(a, a_zp, b, b_zp):
        rows = [-1, 1] if a_zp is not None and a_zp.dim() == 1 and a_zp.numel() > 1 else None
        return _shifted(a, a_zp, rows) @ _shifted(b, b_zp)

    def qlinear_matmul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp=None):
        multiplier = a_scale.to(torch.float64) * b_scale.to(torch.float64) / y_scale.to(torch.float64)
        return _saturated(node, accumulate(a, a_zp, b, b_zp) * multiplier, y_zp, setup)

    def matmul_integer(a, b, a_zp=None, b_zp=None):
        return accumulate(a, a_zp, b, b_zp).to(setup.float_dtype)
    return qlinear_matmul if node.op_type == "QLinearMatMul" else matmul_integer


@kernel("DynamicQuantizeLinear")
def _dynamic_quantize(node, setup):
    def dynamic_quantize(x):
        low = torch.clamp(x.min().detach(), max=0.0)
        high = torch.clamp(x.max().detach(), min=0.0)
        scale = torch.where(high == low, torch.ones_like(high), (high - low) / 255.0)
        zero_point = torch.round(torch.clamp(0.0 - low / scale, 0.0, 255.0))
        scaled = x / scale
        y = (_straight_through(scaled, torch.round(scaled)) + zero_point).clamp(0.0, 255.0)
        return y, scale, zero_point
    return dynamic_quantize
