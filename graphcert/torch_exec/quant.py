"""Torch kernels of QuantizeLinear and DequantizeLinear (per tensor, per axis, blocked), as ONNX defines them:
q = saturate(round_half_even(x / scale) + zero_point), x = (q - zero_point) · scale. Quantized tensors are kept
as floats holding the quantized values, with a straight-through gradient (see `_straight_through`)."""
from __future__ import annotations

import onnx_ir as ir
import torch

from graphcert.interpret import attr
from graphcert.torch_exec.core import _Unsupported, kernel
from graphcert.torch_exec.shapes import FLOAT8, _cast_to_float8

INTEGERS = {ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8, ir.DataType.INT16: torch.int16,
            ir.DataType.UINT16: torch.uint16, ir.DataType.INT32: torch.int32}


def _broadcast(node, x: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A scale or zero point shaped to broadcast against x (per tensor, along `axis`, or blocked)."""
    if parameter.dim() == 0 or parameter.numel() == 1 and not attr(node, "block_size", 0):
        return parameter.reshape(())
    axis = attr(node, "axis", 1) % x.dim()
    block = attr(node, "block_size", 0) or 0
    if block:
        return parameter.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    return parameter.reshape([-1] + [1] * (x.dim() - 1 - axis))


@kernel("QuantizeLinear")
def _quantize(node, setup):
    zero_type = node.inputs[2].dtype if len(node.inputs) > 2 and node.inputs[2] is not None else None
    target = zero_type or (ir.DataType(attr(node, "output_dtype", 0)) if attr(node, "output_dtype", 0) else
                           ir.DataType.UINT8)
    if target in FLOAT8:
        to_float8 = _cast_to_float8(FLOAT8[target], target, attr(node, "saturate", 1))
    elif target not in INTEGERS:
        raise _Unsupported(f"QuantizeLinear to {target.name}")

    def quantize(x, scale, zero_point=None):
        scaled = x / _broadcast(node, x, scale.to(x.dtype))
        shift = 0.0 if zero_point is None else _broadcast(node, x, zero_point.to(x.dtype))
        if target in FLOAT8:
            value = scaled + shift
            return _straight_through(value, to_float8(value).to(value.dtype))
        info = torch.iinfo(INTEGERS[target])
        return (_straight_through(scaled, torch.round(scaled)) + shift).clamp(info.min, info.max)
    return quantize


def _straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """The rounded values with the gradient of the identity (a straight-through estimator): rounding's own
    gradient is zero almost everywhere, which would leave attacks and training blind. Quantized values stay in
    the float type (they are whole numbers or 8-bit floats, all exact there); DequantizeLinear reads them so."""
    return x + (rounded - x).detach()


@kernel("DequantizeLinear")
def _dequantize(node, setup):
    out_type = node.outputs[0].dtype or ir.DataType.FLOAT
    dtype = setup.torch_dtype(out_type)

    def dequantize(q, scale, zero_point=None):
        q = q.to(torch.float32)
        if zero_point is not None:
            q = q - _broadcast(node, q, zero_point.to(torch.float32))
        return (q * _broadcast(node, q, scale.to(torch.float32))).to(dtype)
    return dequantize
