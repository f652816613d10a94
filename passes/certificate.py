"""A certified-prediction graph: a plain ONNX model that returns, for each input, its prediction and a radius
within which that prediction provably does not change.

Built from a bound graph with a run-time objective (`api.bound_graph(..., spec="runtime")`), whose inputs
`epsilon` and `objective` become computed values:

- the input x is tiled over R radii (rungs) into one batch of b·R samples, each with its own epsilon;
- the prediction p = argmax of the model's output (at x: the first copy) sets the objective rows e_p - e_j for
  every class j (the row j = p is ignored: its margin is 0 by construction);
- the bound graph gives margin lower bounds for every copy, [b, R, classes].

For a ladder of rungs (IBP, CROWN, ...) the radius is the largest rung whose margins are all certified (> 0,
as `certify` requires), and 0 when none is. For `lipschitz` the margin lower bound is affine in the radius
(margin - eps·K·||row·W|| - slack), so two rungs, 0 and 1, give each row's zero crossing lower(0) /
(lower(0) - lower(1)); the radius is the smallest over the rows, taken 2^-12 relatively inside (so float32
rounding of the extrapolation cannot put it past the crossing), and 0 when lower(0) is not positive.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import __version__
from graphcert.builder import Builder
from graphcert.errors import InputError
from graphcert.interface import FLOAT, OBJECTIVE, InputSet, epsilon_name, perturbed_inputs
from graphcert.model import static_shape

PREDICTION = "prediction"
RADIUS = "certified_radius"
# Affine methods: the radius in closed form from the rungs 0 and 1.
CLOSED_FORM = ("lipschitz",)
CLOSED_FORM_MARGIN = 2.0 ** -12
# A 1-2-5 series of radii, used when no ladder is given.
DEFAULT_LADDERS = {"linf": (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
                   "l2": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)}


def check_ladder(ladder) -> tuple[float, ...]:
    rungs = sorted({float(r) for r in ladder})
    if not rungs or any(not np.isfinite(r) or r <= 0 for r in rungs):
        raise InputError(f"a ladder needs radii > 0, got {list(ladder)}")
    if len(rungs) > 256:
        raise InputError(f"a ladder of {len(rungs)} rungs: at most 256 (the graph runs every rung on every input)")
    return tuple(rungs)


def certificate_graph(model: ir.Model, method: str = "ibp", domain=None, norm: str = "linf",
                      ladder=None, rounding: str = "float32") -> ir.Model:
    """The certified-prediction graph of a normalised batched classifier ([batch, ...] -> [batch, classes]).
    rounding "float32" (the default): radii hold for the model as it runs in float32 (margins must beat the
    slack of graphcert.rounding, computed in the graph; see passes/certificate_rounding.py); "real": in real
    arithmetic only."""
    if rounding not in ("float32", "real"):
        raise InputError(f"unknown rounding '{rounding}'; choose float32 or real")
    from graphcert import api
    inputs = perturbed_inputs(model)
    if len(inputs) != 1 or len(model.graph.outputs) != 1:
        raise InputError("a certificate graph needs a model with one input and one output")
    in_shape, out_shape = static_shape(inputs[0]), static_shape(model.graph.outputs[0])
    if len(in_shape) < 2 or isinstance(in_shape[0], int) or len(out_shape) != 2 or not isinstance(out_shape[1], int):
        raise InputError(f"a certificate graph needs a classifier with a batch axis (input [batch, ...], output "
                         f"[batch, classes]); this model maps {in_shape} to {out_shape}")
    rungs = (0.0, 1.0) if method in CLOSED_FORM else check_ladder(ladder or DEFAULT_LADDERS[norm])
    slack = None
    if rounding == "float32":
        from graphcert.passes.certificate_rounding import GraphSlack
        slack = GraphSlack(model, method, norm)   # refuses (one line) models the analysis cannot cover
    bound = api.bound_graph(model, method, InputSet("linf", domain), spec="runtime", norm=norm, keep_original=True)
    wired = _wire(bound, method, rungs, out_shape[1], norm, domain, inputs[0].name, epsilon_name(model, inputs[0]),
                  slack)
    if slack is not None:
        wired = slack.splice(wired)
        wired.metadata_props["graphcert.certificate.rounding"] = "float32"
    else:
        wired.metadata_props["graphcert.certificate.rounding"] = "real"
    return wired


def _wire(bound: ir.Model, method: str, rungs, n_classes: int, norm: str, domain, x_name: str,
          eps_name: str, slack=None) -> ir.Model:
    graph = bound.graph
    b = Builder(graph, prefix="certificate")
    x_old = next(v for v in graph.inputs if v.name == x_name)
    eps_old = next(v for v in graph.inputs if v.name == eps_name)
    objective_old = next(v for v in graph.inputs if v.name == OBJECTIVE)
    logits_old = graph.outputs[0]
    lower_old = next(v for v in graph.outputs if v.name == "margins_lower")
    count = len(rungs)
    rank = len(x_old.shape)

    # The new input, named as the model's; the old one becomes the tiled copy [b·R, ...].
    x = ir.Value(name=x_old.name, type=x_old.type, shape=x_old.shape)
    x_old.name = b.fresh("x_tiled_source")
    tiled = _tile(b, x, count, rank)
    ir.convenience.replace_all_uses_with(x_old, tiled)
    graph.inputs.clear()
    graph.inputs.append(x)

    # Prediction from the first copy of each input (the copies are the same input).
    per_copy = b.op("Reshape", logits_old, b.ints([-1, count, n_classes]))
    logits = b.op("Squeeze", b.op("Slice", per_copy, b.ints([0]), b.ints([1]), b.ints([1])), b.ints([1]))
    prediction = b.op("ArgMax", logits, axis=1, keepdims=0)                             # [b] int64
    is_predicted = b.op("OneHot", prediction, b.ints([n_classes]), b.const([0.0, 1.0]), axis=-1)   # [b, n]
    # objective rows e_p - e_j for every j: [b, n, n], then one copy per rung
    rows = b.op("Sub", b.op("Unsqueeze", is_predicted, b.ints([1])), b.const(np.eye(n_classes, dtype=np.float32)))
    rows_tiled = _tile(b, rows, count, 3)
    ir.convenience.replace_all_uses_with(objective_old, rows_tiled)
    radii = b.const(np.asarray(rungs, dtype=np.float32))
    eps = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", radii, b.ints([0])),
                               b.op("Concat", b.op("Slice", b.op("Shape", x), b.ints([0]), b.ints([1])),
                                    b.ints([count]), axis=0)),
               b.ints([-1] + [1] * (rank - 1)))                                          # [b·R, 1, ...]
    ir.convenience.replace_all_uses_with(eps_old, eps)

    # Margin lower bounds per input and rung, the predicted class's own row ignored (+inf).
    lower = b.op("Reshape", lower_old, b.ints([-1, count, n_classes]))
    own = b.op("Cast", b.op("Unsqueeze", is_predicted, b.ints([1])), to=ir.DataType.BOOL)
    if slack is not None and method not in CLOSED_FORM:   # every rung's margins minus its input set's slack
        per_copy_slack = slack.emit(b, graph, tiled, eps, rows_tiled, domain, n_classes)
        lower = b.op("Sub", lower, b.op("Reshape", per_copy_slack, b.ints([-1, count, n_classes])))
    lower = b.op("Where", own, b.const(np.float32(np.inf)), lower)
    if method in CLOSED_FORM:
        radius = _closed_form(b, lower)
        if slack is not None:
            # The slack grows with the radius: take it at the real-arithmetic radius r*, and stop where the margin
            # line meets it. That radius r' <= r* has margin lower(0) - r'·slope = slack(r*) >= slack(r').
            ball = b.op("Reshape", radius, b.ints([-1] + [1] * (rank - 1)))
            at_radius = slack.emit(b, graph, x, ball, rows, None, n_classes)
            radius = _closed_form(b, lower, at_radius)
    else:
        certified = b.op("Greater", b.reduce("ReduceMin", lower, [2], keepdims=0), b.const(np.float32(0.0)))
        radius = b.reduce("ReduceMax", b.op("Where", certified, b.op("Unsqueeze", radii, b.ints([0])),
                                            b.const(np.float32(0.0))), [1], keepdims=0)

    graph.outputs.clear()
    for name, value, kind, shape in ((logits_old.name, logits, FLOAT, ["batch", n_classes]),
                                     (PREDICTION, prediction, ir.TensorType(ir.DataType.INT64), ["batch"]),
                                     (RADIUS, radius, FLOAT, ["batch"])):
        named = b.op("Identity", value)
        if name == logits_old.name:
            logits_old.name = b.fresh("logits_tiled")
        named.name, named.type, named.shape = name, kind, ir.Shape(shape)
        graph.outputs.append(named)
    graph.sort()
    bound.metadata_props.update({
        "graphcert.certificate.method": method, "graphcert.certificate.norm": norm,
        "graphcert.certificate.rungs": ",".join(f"{r:g}" for r in rungs) if method not in CLOSED_FORM else "closed form",
        "graphcert.certificate.domain": "none" if domain is None else f"{domain[0]:g},{domain[1]:g}",
        "graphcert.version": __version__})
    return bound


def _tile(b: Builder, value: ir.Value, count: int, rank: int) -> ir.Value:
    """[b, ...] -> [b·count, ...]: each sample repeated count times, consecutively."""
    expanded = b.op("Unsqueeze", value, b.ints([1]))                                    # [b, 1, ...]
    repeats = b.ints([1, count] + [1] * (rank - 1))
    tiled = b.op("Tile", expanded, repeats)                                             # [b, count, ...]
    rest = b.op("Slice", b.op("Shape", value), b.ints([1]), b.ints([rank]))
    return b.op("Reshape", tiled, b.op("Concat", b.ints([-1]), rest, axis=0))


def _closed_form(b: Builder, lower: ir.Value, slack: ir.Value | None = None) -> ir.Value:
    """lower [b, 2, n] at radii 0 and 1 -> the smallest zero crossing over the rows, shrunk by 2^-12; 0 where
    the margins at radius 0 are not all positive. With `slack` [b, n], where each row's line meets its slack."""
    at_zero = b.op("Squeeze", b.op("Slice", lower, b.ints([0]), b.ints([1]), b.ints([1])), b.ints([1]))
    at_one = b.op("Squeeze", b.op("Slice", lower, b.ints([1]), b.ints([2]), b.ints([1])), b.ints([1]))
    slope = b.op("Sub", at_zero, at_one)          # NaN on the ignored row (inf - inf): never > 0
    if slack is not None:
        at_zero = b.op("Sub", at_zero, slack)     # inf on the ignored row stays inf
    falls = b.op("Greater", slope, b.const(np.float32(0.0)))
    safe_slope = b.op("Where", falls, slope, b.const(np.float32(1.0)))
    crossing = b.op("Where", falls, b.op("Div", at_zero, safe_slope), b.const(np.float32(np.inf)))
    radius = b.op("Mul", b.reduce("ReduceMin", crossing, [1], keepdims=0), b.const(np.float32(1 - CLOSED_FORM_MARGIN)))
    positive = b.op("Greater", b.reduce("ReduceMin", at_zero, [1], keepdims=0), b.const(np.float32(0.0)))
    return b.op("Where", positive, radius, b.const(np.float32(0.0)))
