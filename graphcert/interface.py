"""The contract of every bound graph: how the input set comes in and how bounds go out.

Input sets: `linf` adds an `epsilon` input per model input (L-inf radius, broadcastable) around the
original input, optionally clipped to a data domain; `box` replaces each input by `<name>_lower` and
`<name>_upper` and feeds the box center to the original nodes. Outputs: the original outputs (unless
dropped) plus `<name>_lower` and `<name>_upper`.
"""
from __future__ import annotations

import json

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from . import __version__
from .builder import Builder
from .errors import GraphcertError
from .interpret import perturbed_nodes
from .interval import Interval
from .model import model_inputs

FLOAT = ir.TensorType(ir.DataType.FLOAT)
# Inputs that are known exactly at run time and never perturbed (the certify margin matrix).
OBJECTIVE = "objective"


# Metadata naming the model inputs fed as given (never perturbed), set by `fix_inputs`.
FIXED_INPUTS = "graphcert.fixed_inputs"
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def perturbed_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs bound graphs put an input set around: every floating-point input except the objective and
    those `fix_inputs` marked as fed as given (indices, masks and other non-float inputs are never perturbed)."""
    fixed = set(filter(None, model.metadata_props.get(FIXED_INPUTS, "").split(",")))
    return [v for v in model_inputs(model) if v.name != OBJECTIVE and v.name not in fixed
            and (v.type is None or v.type.dtype in FLOAT_TYPES)]


def fix_inputs(model: ir.Model, perturb: list[str] | None) -> ir.Model:
    """Perturb only the inputs named in `perturb` (None: the first floating-point input); the model's other
    inputs are fed as given. Marks `model` (normalised) in place and returns it."""
    from .errors import InputError
    floats = perturbed_inputs(model)
    names = [v.name for v in floats]
    if perturb is None:
        chosen = names[:1]
    else:
        unknown = [n for n in perturb if n not in names]
        if unknown or not perturb:
            raise InputError(f"--perturb names {', '.join(unknown) or 'no input'}; the model's floating-point "
                             f"inputs are: {', '.join(names) or 'none'}")
        chosen = list(dict.fromkeys(perturb))
    others = [v.name for v in model_inputs(model) if v.name not in chosen]
    model.metadata_props[FIXED_INPUTS] = ",".join(others)
    return model


@dataclass
class InputSet:
    kind: str = "linf"               # "linf" or "box"
    domain: tuple[float, float] | None = None

    def __post_init__(self):
        if self.kind not in ("linf", "box"):
            raise ValueError(f"unknown input set {self.kind!r}")


def epsilon_name(model: ir.Model, value: ir.Value) -> str:
    return "epsilon" if len(perturbed_inputs(model)) == 1 else f"{value.name}_epsilon"


def l2_radius(b: Builder, eps: ir.Value, batched: bool, keepdims: int = 0) -> ir.Value:
    """The L2 radius of each sample: the largest entry of its `epsilon` (which broadcasts like the input),
    [batch] (or [batch, 1] with keepdims), [1] for an unbatched input. Every L2 pass reads the radius here."""
    return b.reduce("ReduceMax", b.op("Reshape", eps, b.ints([0, -1] if batched else [1, -1])), [1],
                    keepdims=keepdims)


def clone(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def open_inputs(model: ir.Model, b: Builder, input_set: InputSet,
                share_radius: bool = False) -> dict[ir.Value, Interval]:
    """Add the input-set inputs to `model` (a clone) and return the interval of each original input.

    With `share_radius`, an unclipped L-inf ball is returned as center x and radius epsilon expanded to one
    sample's shape only (see `Interval.shared`), for passes whose rules handle a batch-shared radius."""
    graph = model.graph
    boxes = {}
    for x in perturbed_inputs(model):
        if input_set.kind == "linf":
            # Same rank as the input, every dimension free: pass 1 where epsilon is shared (scalar, per channel).
            rank = len(x.shape) if x.shape is not None else 0
            eps = ir.Value(name=epsilon_name(model, x), type=FLOAT,
                           shape=ir.Shape([f"{x.name}_eps_d{i}" for i in range(rank)]))
            graph.inputs.append(eps)
            if share_radius and input_set.domain is None and _batched(x):
                dims = list(x.shape)[1:]
                sample = b.ints([1, *dims]) if all(isinstance(d, int) for d in dims) else \
                    b.op("Concat", b.ints([1]), b.op("Shape", x, start=1), axis=0)
                boxes[x] = Interval(b, center=x, radius=b.op("Expand", eps, sample), shared=True)
                continue
            lower, upper = b.op("Sub", x, eps), b.op("Add", x, eps)
            if input_set.domain is not None:
                # Clip with one bound, not Max/Min: onnxruntime's broadcasting Max/Min is many times slower.
                lower = b.op("Clip", lower, b.const(input_set.domain[0]))
                upper = b.op("Clip", upper, None, b.const(input_set.domain[1]))
            boxes[x] = Interval.from_bounds(b, lower, upper)
        else:
            lower = ir.Value(name=f"{x.name}_lower", type=x.type, shape=x.shape)
            upper = ir.Value(name=f"{x.name}_upper", type=x.type, shape=x.shape)
            center = b.op("Mul", b.op("Add", lower, upper), b.const(0.5))
            center.shape, center.type = x.shape, x.type   # it stands in for x: rules read its shape
            position = graph.inputs.index(x)
            x.replace_all_uses_with(center)
            graph.inputs.pop(position)
            graph.inputs.insert(position, upper)
            graph.inputs.insert(position, lower)
            boxes[center] = Interval.from_bounds(b, lower, upper)
    # Emitted before the original nodes consume them: keep the graph in topological order.
    graph.sort()
    return boxes


def _batched(x: ir.Value) -> bool:
    """A leading symbolic dimension: the batch axis of a normalised model."""
    return x.shape is not None and len(x.shape) >= 2 and not isinstance(x.shape[0], int)


def close_outputs(model: ir.Model, b: Builder, bounds: dict[str, tuple[ir.Value, ir.Value]],
                  keep_original: bool, method: str) -> None:
    """Expose bounds as `<name>_lower`/`<name>_upper` and stamp the graph's provenance."""
    graph = model.graph
    originals = list(graph.outputs)
    if not keep_original:
        graph.outputs.clear()
    # Outputs that do not depend on the perturbed inputs (a Shape, a Size) get no bounds: say so, so that a graph
    # with nothing to bound is told apart from a pass that lost its bounds.
    unbounded = [out.name for out in originals if out.name not in bounds]
    model.metadata_props["graphcert.unbounded_outputs"] = json.dumps(unbounded)
    for out in originals:
        if out.name not in bounds:
            continue
        lower, upper = bounds[out.name]
        # (bfloat16 and float8 outputs stay as they are: onnxruntime has no CPU kernels for the bound ops there)
        if out.type is not None and out.type.dtype in (ir.DataType.DOUBLE, ir.DataType.FLOAT16):
            lower, upper = _as_float32_outward(b, lower, upper, out.type.dtype)
        # inf - inf after an overflow is NaN, which says nothing; the sound answer there is the whole line.
        lower = b.op("Where", b.op("IsNaN", lower), b.const(-np.inf), lower)
        upper = b.op("Where", b.op("IsNaN", upper), b.const(np.inf), upper)
        for suffix, value in (("lower", lower), ("upper", upper)):
            named = b.op("Identity", value)
            named.name = f"{out.name}_{suffix}"
            named.type = FLOAT
            named.shape = out.shape
            graph.outputs.append(named)
    model.metadata_props["graphcert.method"] = method
    model.metadata_props["graphcert.version"] = __version__
    from .rounding_leaves import DOMAIN, zero_in_model   # (imports this module)
    if DOMAIN in model.opset_imports:
        zero_in_model(graph)
        del model.opset_imports[DOMAIN]


def _as_float32_outward(b: Builder, lower: ir.Value, upper: ir.Value, dtype: ir.DataType):
    """Bounds of an output of another float type (a float32 model ending in a Cast to double or float16) as
    float32 bounds: float16 casts exactly; double moves out by more than half a float32 ulp (2^-23
    relative, 2^-149 absolute) and is clipped to float32's range before the cast rounds to nearest."""
    if dtype != ir.DataType.DOUBLE:
        return b.op("Cast", lower, to=ir.DataType.FLOAT), b.op("Cast", upper, to=ir.DataType.FLOAT)
    largest = float(np.finfo(np.float32).max)

    def moved(value, sign):
        step = b.op("Add", b.op("Mul", b.op("Abs", value), b.const(2.0 ** -23, np.float64)),
                    b.const(2.0 ** -149, np.float64))
        shifted = b.op("Add" if sign > 0 else "Sub", value, step)
        clipped = (b.op("Max", shifted, b.const(-largest, np.float64)) if sign > 0
                   else b.op("Min", shifted, b.const(largest, np.float64)))
        return b.op("Cast", clipped, to=ir.DataType.FLOAT)
    return moved(lower, -1), moved(upper, +1)


class BoundPass(ir.passes.FunctionalPass):
    """The skeleton bound passes share (onnx_ir's pass framework runs requires, call, ensures in that order).

    `requires` is the support check: every perturbed node through the pass's rule table (`rules`, a
    graphcert.interpret.RuleTable), one error naming every refused node and why, before anything is built.
    `ensures` is this module's contract for the graph `call` returns: the input set comes in as an epsilon
    input or `<x>_lower/_upper` inputs, bounds go out as `<name>_lower` outputs (each `_upper` with its
    `_lower`), and the method is stamped in the metadata. A pass whose preconditions read more than the node
    overrides `support_context`.
    """

    rules = None  # the pass's RuleTable

    def support_context(self, model: ir.Model) -> tuple[list[ir.Node], object]:
        """(the nodes the pass rewrites, what their preconditions read besides the node)."""
        return perturbed_nodes(model.graph, set(perturbed_inputs(model))), None

    def requires(self, model: ir.Model) -> None:
        nodes, context = self.support_context(model)
        self.rules.check(nodes, context)

    def ensures(self, model: ir.Model) -> None:
        method = self.rules.method
        if model.metadata_props.get("graphcert.method") != method:
            raise ValueError(f"the {method} graph is not stamped graphcert.method={method}")
        outputs = {v.name for v in model.graph.outputs}
        lowers = {name[:-len("_lower")] for name in outputs if name.endswith("_lower")}
        uppers = {name[:-len("_upper")] for name in outputs if name.endswith("_upper")}
        unbounded = json.loads(model.metadata_props.get("graphcert.unbounded_outputs", "[]"))
        if (not lowers and not unbounded) or not uppers <= lowers:
            raise ValueError(f"the {method} graph's outputs are not <name>_lower (and _upper): {sorted(outputs)}")
        inputs = {v.name for v in model.graph.inputs}
        if not any(name == "epsilon" or name.endswith("_epsilon") or name.endswith("_lower") for name in inputs):
            raise ValueError(f"the {method} graph has no input-set input (epsilon or <x>_lower/_upper)")

    def __call__(self, model_or_result):
        # onnx_ir wraps what `requires` raises; a refusal is the user's one-line error, so it goes out as it is.
        try:
            return super().__call__(model_or_result)
        except ir.passes.PreconditionError as error:
            if isinstance(error.__cause__, GraphcertError):
                raise error.__cause__ from None
            raise
