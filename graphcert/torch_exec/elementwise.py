"""Torch kernels: element-wise maths, activations, comparisons."""
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


@kernel("Swish")
def _swish(node, setup):
    alpha = float(attr(node, "alpha", 1.0))
    return lambda x: x * torch.sigmoid(alpha * x)
