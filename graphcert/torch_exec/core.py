"""What every kernel module of the torch executor shares: the kernel table, the setup and small helpers."""
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

from graphcert.interpret import attr, registrar

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
    ir.DataType.FLOAT8E4M3FN: torch.float8_e4m3fn, ir.DataType.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    ir.DataType.FLOAT8E5M2: torch.float8_e5m2, ir.DataType.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
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

