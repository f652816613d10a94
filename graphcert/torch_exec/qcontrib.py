"""Torch kernels of onnxruntime's com.microsoft quantized ops (QGemm, QLinearAdd, QLinearMul,
QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat, QLinearSigmoid, QLinearLeakyRelu): dequantize, the
float op, requantize with a straight-through rounding (see `graphcert.torch_exec.qlinear`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graphcert.interpret import attr
from graphcert.torch_exec.core import _Unsupported, kernel
from graphcert.torch_exec.pooling import _average_pool
from graphcert.torch_exec.qlinear import _saturated, _shifted

MS = "com.microsoft"
OTHER_DOMAINS = {(MS, op) for op in ("QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                                     "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu")}


def _real(q, scale, zero_point):
    return _shifted(q, zero_point) * scale.to(torch.float64)


def _requantized(node, setup, real, y_scale, y_zero_point):
    return _saturated(node, real / y_scale.to(torch.float64), y_zero_point, setup)


@kernel("QGemm")
def _qgemm(node, setup):
    alpha, trans_a, trans_b = attr(node, "alpha", 1.0), attr(node, "transA", 0), attr(node, "transB", 0)

    def qgemm(a, a_scale, a_zp, b, b_scale, b_zp, bias=None, y_scale=None, y_zp=None):
        a = _shifted(a, a_zp)
        b = b.to(torch.float64)
        b = (b.T if trans_b else b) - b_zp.to(torch.float64)
        acc = (a.T if trans_a else a) @ b
        if bias is not None:
            acc = acc + bias.to(torch.float64)
        real = acc * (alpha * a_scale.to(torch.float64) * b_scale.to(torch.float64))
        if y_scale is None:
            return real.to(setup.float_dtype)
        return _requantized(node, setup, real, y_scale, y_zp)
    return qgemm


@kernel("QLinearAdd", "QLinearMul")
def _qlinear_binary(node, setup):
    combine = torch.add if node.op_type == "QLinearAdd" else torch.mul

    def binary(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp=None):
        return _requantized(node, setup, combine(_real(a, a_scale, a_zp), _real(b, b_scale, b_zp)), y_scale, y_zp)
    return binary


@kernel("QLinearGlobalAveragePool")
def _qlinear_global_average_pool(node, setup):
    channels_last = attr(node, "channels_last", 0)

    def pool(x, x_scale, x_zp, y_scale, y_zp=None):
        axes = list(range(1, x.dim() - 1)) if channels_last else list(range(2, x.dim()))
        return _requantized(node, setup, _real(x, x_scale, x_zp).mean(dim=axes, keepdim=True), y_scale, y_zp)
    return pool


@kernel("QLinearAveragePool")
def _qlinear_average_pool(node, setup):
    if attr(node, "channels_last", 0) or attr(node, "ceil_mode", 0):
        raise _Unsupported("QLinearAveragePool with channels last or ceil mode (onnxruntime's own windows)")
    average = _average_pool(node, setup)

    def pool(x, x_scale, x_zp, y_scale, y_zp=None):
        return _requantized(node, setup, average(_real(x, x_scale, x_zp)), y_scale, y_zp)
    return pool


@kernel("QLinearConcat")
def _qlinear_concat(node, setup):
    axis = attr(node, "axis")

    def concat(y_scale, y_zp, *triples):
        parts = [_requantized(node, setup, _real(*triples[k:k + 3]), y_scale, y_zp) for k in range(0, len(triples), 3)]
        return torch.cat(parts, dim=axis)
    return concat


@kernel("QLinearSigmoid", "QLinearLeakyRelu")
def _qlinear_activation(node, setup):
    alpha = attr(node, "alpha", 0.01)
    apply = torch.sigmoid if node.op_type == "QLinearSigmoid" else (lambda v: F.leaky_relu(v, alpha))

    def activation(x, x_scale, x_zp, y_scale, y_zp=None):
        return _requantized(node, setup, apply(_real(x, x_scale, x_zp)), y_scale, y_zp)
    return activation
