"""The robust training loss as ONNX nodes appended to a bound graph, so every backend runs the same loss.

For margins m = z_label - z_j (j != label), cross-entropy of the logits is logsumexp([0, -m]): the clean
loss takes the margins of the unperturbed input, the robust loss takes their certified lower bounds (the
worst-case logit vector has z_label = 0 and z_j = -lower(m_j)). The training graph computes, per sample,

    sample_losses = kappa * CE(margins) + (1 - kappa) * CE(margins_lower)

and loss = sum_i sample_weights_i * sample_losses_i, with `kappa`, `epsilon` and `sample_weights` as run-time
inputs, so schedules change them without rebuilding the graph. Weights 1/N give the mean; holistic robust
training feeds its worst-case weights (`graphcert.training.hr`). clean_loss and robust_loss are batch means.
"""
from __future__ import annotations

import onnx_ir as ir

from graphcert import api
from graphcert.builder import Builder
from graphcert.interface import FLOAT, InputSet

KAPPA = "kappa"
SAMPLE_WEIGHTS = "sample_weights"
SAMPLE_LOSSES = "sample_losses"
LOSS = "loss"
CLEAN_LOSS = "clean_loss"
ROBUST_LOSS = "robust_loss"
CLEAN_MARGINS = "margins"
CERTIFIED_MARGINS = "margins_lower"


def training_norm(method: str) -> str:
    """The ball a method trains for: L-inf where it bounds those (ibp, crown-ibp), else its own (gloro: L2)."""
    norms = api.NORMS.get(method, ("linf",))
    return "linf" if "linf" in norms else norms[0]


def training_graph(model: ir.Model, method: str, domain: tuple[float, float] | None) -> ir.Model:
    """The trainable bound graph of `model` with inputs x, objective, epsilon, kappa, sample_weights and outputs
    loss, clean_loss, robust_loss, margins, margins_lower, sample_losses. Weights keep the model's initializer
    names."""
    bound = api.bound_graph(model, method, InputSet("linf", domain), spec="runtime", keep_original=True,
                            trainable=True, norm=training_norm(method))
    graph = bound.graph
    outputs = {o.name: o for o in graph.outputs}
    b = Builder(graph, prefix="loss")
    kappa = ir.Value(name=KAPPA, type=FLOAT, shape=ir.Shape([]))
    weights = ir.Value(name=SAMPLE_WEIGHTS, type=FLOAT, shape=ir.Shape(["batch"]))
    graph.inputs.extend([kappa, weights])
    clean = _margin_cross_entropy(b, outputs[CLEAN_MARGINS])
    robust = _margin_cross_entropy(b, outputs[CERTIFIED_MARGINS])
    per_sample = b.op("Add", b.op("Mul", kappa, clean), b.op("Mul", b.op("Sub", b.const(1.0), kappa), robust))
    weighted = b.reduce("ReduceSum", b.op("Mul", weights, per_sample), [0], keepdims=0)
    graph.outputs[:] = [_named(b, weighted, LOSS), _named(b, _mean(b, clean), CLEAN_LOSS),
                        _named(b, _mean(b, robust), ROBUST_LOSS), outputs[CLEAN_MARGINS], outputs[CERTIFIED_MARGINS],
                        _named(b, per_sample, SAMPLE_LOSSES, ir.Shape(["batch"]))]
    return bound


def _named(b: Builder, value: ir.Value, name: str, shape: ir.Shape | None = None) -> ir.Value:
    out = b.op("Identity", value)
    out.name, out.type, out.shape = name, FLOAT, shape or ir.Shape([])
    return out


def _mean(b: Builder, per_sample: ir.Value) -> ir.Value:
    return b.reduce("ReduceMean", per_sample, [0], keepdims=0)


def _margin_cross_entropy(b: Builder, margins: ir.Value) -> ir.Value:
    """logsumexp([0, -m]) per sample [batch], as a LogSoftmax so large margins do not overflow."""
    batch = b.op("Slice", b.op("Shape", margins), b.ints([0]), b.ints([1]))
    zeros = b.op("ConstantOfShape", b.op("Concat", batch, b.ints([1]), axis=0),
                 value=ir.tensor([0.0], dtype=ir.DataType.FLOAT))
    logits = b.op("Concat", zeros, b.op("Neg", margins), axis=1)
    own_class = b.op("Slice", b.op("LogSoftmax", logits, axis=1), b.ints([0]), b.ints([1]), b.ints([1]))
    return b.op("Neg", b.op("Squeeze", own_class, b.ints([1])))
