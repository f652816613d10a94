"""The Lipschitz-margin pass: the constants of `passes/lipschitz.py` folded into a bound graph.

Margins are `objective·y - eps·K[h]·||objective·Wᵀ||_2 - slack` (see `passes/lipschitz.py` for K and why the
last affine layer is taken apart); without an objective, `<out>_lower/_upper = y ∓ eps·K_i` per element.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import __version__
from graphcert.builder import Builder
from graphcert.errors import InputError
from graphcert.interface import (FLOAT, OBJECTIVE, BoundPass, InputSet, clone, epsilon_name, l2_radius,
                                 perturbed_inputs)
from graphcert.model import static_shape
from graphcert.passes.lipschitz import RULES, lipschitz_constants, support_context
from graphcert.passes.spec import MARGINS, _affine_producer

# Margins are computed in float32 by the runtime: this fraction of their magnitude is subtracted as well.
FLOAT32_SLACK = 2.0 ** -16
ABSOLUTE_SLACK = 1e-6


def output_lipschitz(model: ir.Model, output: ir.Value, constants: dict) -> tuple[float, np.ndarray | None]:
    """(K_sub, W [k, n]) when output = h·W + c with K_sub = K[h]; else (K[output], None)."""
    affine = output
    while affine.producer() is not None and affine.producer().op_type == "Identity":
        affine = affine.producer().inputs[0]   # the spec pass names its margins with an Identity
    found = _affine_producer(affine)
    if found is not None and found[0] in constants and len(static_shape(output)) <= 2:
        h, weight = found[0], found[1]
        return constants[h], np.asarray(weight, dtype=np.float64)
    return constants.get(output, 0.0), None


class LipschitzPass(BoundPass):
    """Normalised model in, Lipschitz bound graph out; `objective=True` adds the certify margins interface.

    Inputs: the model input, `epsilon` (an L2 radius; the largest entry per sample counts) and, with an
    objective, `objective` [batch, m, n]. Outputs: the originals (optional) and either `margins`,
    `margins_lower`, `margins_upper` (objective·y ∓ eps·K_row) or `<out>_lower/_upper` per output.
    """

    rules = RULES

    def support_context(self, model: ir.Model):
        return support_context(model)

    def __init__(self, input_set: InputSet | None = None, keep_original: bool = True, objective: bool = False):
        super().__init__()
        self.input_set = input_set or InputSet()
        if self.input_set.kind != "linf":
            raise InputError("lipschitz bounds an L2 ball around x: give an epsilon input set, not a box")
        self.keep_original = keep_original
        self.objective = objective

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = clone(model)
        graph = result.graph
        constants, _ = lipschitz_constants(result)
        x = perturbed_inputs(result)[0]
        b = Builder(graph, prefix="lipschitz")
        rank = len(x.shape) if x.shape is not None else 0
        eps = ir.Value(name=epsilon_name(result, x), type=FLOAT,
                       shape=ir.Shape([f"{x.name}_eps_d{i}" for i in range(rank)]))
        graph.inputs.append(eps)
        batched = rank >= 2 and not isinstance(static_shape(x)[0], int)
        radius = l2_radius(b, eps, batched)                                   # [batch] or [1]
        originals = list(graph.outputs)
        if not self.keep_original:
            graph.outputs.clear()
        if self.objective:
            self._margins(result, b, originals[0], constants, radius)
        else:
            for y in originals:
                self._elementwise(result, b, y, constants, radius, batched)
        result.metadata_props["graphcert.method"] = "lipschitz"
        result.metadata_props["graphcert.version"] = __version__
        return ir.passes.PassResult(result, modified=True)

    def _margins(self, model, b: Builder, y: ir.Value, constants, radius) -> None:
        graph = model.graph
        objective = ir.Value(name=OBJECTIVE, type=FLOAT, shape=ir.Shape(["batch", "spec_rows", "spec_cols"]))
        graph.inputs.append(objective)
        k_sub, weight = output_lipschitz(model, y, constants)
        flat = y if len(static_shape(y)) == 2 else b.op("Flatten", y, axis=1)
        margins = b.op("Squeeze", b.op("MatMul", objective, b.op("Unsqueeze", flat, b.ints([-1]))), b.ints([-1]))
        rows = objective if weight is None else b.op("MatMul", objective, b.const(weight.T.astype(np.float32)))
        row_norms = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", rows, rows), [-1], keepdims=0))   # [batch, m]
        spread = b.op("Mul", b.op("Mul", row_norms, b.const(_up32(k_sub))), b.op("Unsqueeze", radius, b.ints([1])))
        size = b.op("Squeeze", b.op("MatMul", b.op("Abs", objective),
                                    b.op("Unsqueeze", b.op("Abs", flat), b.ints([-1]))), b.ints([-1]))
        width = _with_slack(b, spread, size)
        named = {MARGINS: margins, f"{MARGINS}_lower": b.op("Sub", margins, width),
                 f"{MARGINS}_upper": b.op("Add", margins, width)}
        if not self.keep_original:
            named.pop(MARGINS)
        for name, value in named.items():
            _expose(graph, b, name, value, ir.Shape([y.shape[0] if y.shape is not None else "batch", "spec_rows"]))

    def _elementwise(self, model, b: Builder, y: ir.Value, constants, radius, batched) -> None:
        k_sub, weight = output_lipschitz(model, y, constants)
        if weight is not None:
            per_element = k_sub * np.sqrt((weight ** 2).sum(axis=0))                       # [n]
        else:
            per_element = np.array(k_sub)
        rank = len(static_shape(y))
        # The radius per sample, shaped to broadcast against y ([batch, 1, ...], or y's rank of ones unbatched).
        scale = b.op("Reshape", radius, b.ints(([-1] + [1] * (rank - 1)) if batched else [1] * rank))
        spread = b.op("Mul", b.const(_up32(per_element)), scale)
        width = _with_slack(b, spread, b.op("Abs", y))
        for suffix, value in (("lower", b.op("Sub", y, width)), ("upper", b.op("Add", y, width))):
            _expose(model.graph, b, f"{y.name}_{suffix}", value, y.shape)


def _up32(value) -> np.ndarray:
    """float64 constants as float32, rounded towards +inf."""
    value = np.asarray(value, dtype=np.float64)
    rounded = value.astype(np.float32)
    return np.where(rounded.astype(np.float64) < value, np.nextafter(rounded, np.float32(np.inf)), rounded)


def _with_slack(b: Builder, spread: ir.Value, magnitude: ir.Value) -> ir.Value:
    """spread plus what float32 arithmetic may have lost on values of this magnitude (and on spread)."""
    relative = b.op("Mul", b.op("Add", spread, magnitude), b.const(FLOAT32_SLACK))
    return b.op("Add", b.op("Add", spread, relative), b.const(ABSOLUTE_SLACK))


def _expose(graph: ir.Graph, b: Builder, name: str, value: ir.Value, shape) -> None:
    named = b.op("Identity", value)
    named.name, named.type, named.shape = name, FLOAT, shape
    graph.outputs.append(named)
