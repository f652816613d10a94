"""The IBP initialisation of Shi et al. 2021 for the weights of a normalised ONNX model.

Standard initialisations make interval widths grow layer by layer, so certified bounds explode before
training starts. Drawing each weight from N(0, sigma^2) with sigma = sqrt(2*pi) / fan_in gives
E|w| = sigma*sqrt(2/pi) = 2 / fan_in: a row of |W| sums to 2 in expectation, and with about half of the
ReLUs active the interval width stays the same from layer to layer. The last affine layer keeps its
weights (it maps to the logits, whose scale cross-entropy sets), and biases are unchanged.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graphcert.interpret import attr


def affine_weights(model: ir.Model) -> list[tuple[ir.Value, int]]:
    """(weight initializer, fan-in) of every Gemm, MatMul and Conv with a constant weight, in graph order."""
    found = []
    for node in model.graph:
        if node.op_type not in ("Gemm", "MatMul", "Conv") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None or not weight.is_initializer():
            continue
        shape = weight.const_value.shape
        if node.op_type == "Conv":
            fan_in = math.prod(shape[1:])
        elif node.op_type == "Gemm":
            fan_in = shape[1] if attr(node, "transB", 0) else shape[0]
        else:
            fan_in = shape[-2] if len(shape) >= 2 else shape[0]
        found.append((weight, int(fan_in)))
    return found


def ibp_initialise(model: ir.Model, trainable: set[str], seed: int) -> list[str]:
    """Redraw the trainable weights of every affine layer but the last, in place; returns their names."""
    rng = np.random.default_rng(seed)
    layers = [(w, fan_in) for w, fan_in in affine_weights(model) if w.name in trainable]
    changed = []
    for weight, fan_in in layers[:-1]:
        array = weight.const_value.numpy()
        sigma = math.sqrt(2.0 * math.pi) / fan_in
        drawn = rng.normal(0.0, sigma, size=array.shape).astype(array.dtype)
        weight.const_value = ir.tensor(drawn, name=weight.name)
        changed.append(weight.name)
    return changed
