"""The training loss as ONNX nodes appended to a bound graph, so every backend runs the same loss.

For margins m = z_label - z_j (j != label), cross-entropy of the logits is logsumexp([0, -m]): the clean
loss takes the margins of the unperturbed input, the robust loss takes their certified lower bounds (the
worst-case logit vector has z_label = 0 and z_j = -lower(m_j)). With the default loss `ce` the training graph
computes, per sample,

    sample_losses = kappa * CE(margins) + (1 - kappa) * CE(margins_lower)

and loss = sum_i sample_weights_i * sample_losses_i, with `kappa`, `epsilon` and `sample_weights` as run-time
inputs, so schedules change them without rebuilding the graph. Weights 1/N give the mean; holistic robust
training feeds its worst-case weights (`graphcert.training.hr`). clean_loss and robust_loss are batch means
of the two cross-entropies, whatever the loss.

Networks that are 1-Lipschitz by construction (`--method orthogonal`) are certified by their clean margins
alone, so two more losses act on the clean logits f (deel-lip's, spec section B.4):

    tau-ce:  CE(softmax(tau·f), label) / tau = logsumexp([0, -tau·m]) / tau
    hkr:     -KR + alpha·hinge, KR = mean over classes c of (mean f_c where c is the label - mean f_c elsewhere),
             hinge = (1/C)[(C-1)·relu(margin/2 - f_label) + sum_{c != label} relu(margin/2 + f_c)]

KR is written per sample with the class counts of the batch (weights B/n_c and -B/(B-n_c)), so the 1/N
weights give exactly -KR + alpha·mean(hinge); a class absent from the batch counts its empty mean as 0, as
deel-lip does. KR compares class means within a batch, so it does not take holistic robust weights
(`check_loss`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from graphcert import api, methods
from graphcert.builder import Builder
from graphcert.errors import InputError
from graphcert.interface import FLOAT, OBJECTIVE, InputSet

KAPPA = "kappa"
SAMPLE_WEIGHTS = "sample_weights"
SAMPLE_LOSSES = "sample_losses"
LOSS = "loss"
CLEAN_LOSS = "clean_loss"
ROBUST_LOSS = "robust_loss"
CLEAN_MARGINS = "margins"
CERTIFIED_MARGINS = "margins_lower"
LOSSES = ("ce", "tau-ce", "hkr")
# Losses on the clean logits only: they make sense for networks whose margins certify by construction.
LIPSCHITZ_LOSSES = {"tau-ce": ("orthogonal",), "hkr": ("orthogonal",)}


@dataclass(frozen=True)
class Loss:
    """Which loss to train and its settings (tau for tau-ce; alpha and margin for hkr)."""
    name: str = "ce"
    tau: float = 3.0
    hkr_alpha: float = 50.0
    hkr_margin: float = 1.0


def check_loss(loss: Loss, method: str, holistic: bool = False) -> None:
    """An InputError naming the first setting that does not fit (unknown loss, wrong method, bad number)."""
    if loss.name not in LOSSES:
        raise InputError(f"unknown loss '{loss.name}'; choose one of: {', '.join(LOSSES)}")
    methods = LIPSCHITZ_LOSSES.get(loss.name)
    if methods and method not in methods:
        raise InputError(f"--loss {loss.name} trains the clean margins of a network that is 1-Lipschitz by "
                         f"construction and ignores bounds: use it with --method {' or '.join(methods)} "
                         f"(--method {method} trains with --loss ce)")
    for name, value in (("tau", loss.tau), ("hkr-alpha", loss.hkr_alpha), ("hkr-margin", loss.hkr_margin)):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"--{name} must be a positive number, got {value}")
    if loss.name == "hkr" and holistic:
        raise InputError("--loss hkr compares class means within a batch, so it has no per-sample losses for "
                         "holistic robust training to reweight: use --loss tau-ce or ce with --hr-alpha/--hr-r")


def training_norm(method: str) -> str:
    """The ball a method trains for: L-inf where it bounds those (ibp, crown-ibp), else its own (gloro: L2)."""
    norms = methods.get(method).norms
    return "linf" if "linf" in norms else norms[0]


def training_graph(model: ir.Model, method: str, domain: tuple[float, float] | None,
                   loss: Loss = Loss()) -> ir.Model:
    """The trainable bound graph of `model` with inputs x, objective, epsilon, kappa, sample_weights and outputs
    loss, clean_loss, robust_loss, margins, margins_lower, sample_losses. Weights keep the model's initializer
    names."""
    check_loss(loss, method)
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
    if loss.name == "tau-ce":
        per_sample = tau_cross_entropy(b, outputs[CLEAN_MARGINS], loss.tau)
    elif loss.name == "hkr":
        objective = next(v for v in graph.inputs if v.name == OBJECTIVE)
        per_sample = hkr(b, outputs[model.graph.outputs[0].name], objective, loss.hkr_alpha, loss.hkr_margin)
    else:
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


def tau_cross_entropy(b: Builder, margins: ir.Value, tau: float) -> ir.Value:
    """logsumexp([0, -tau·m]) / tau per sample [batch]."""
    sharpened = _margin_cross_entropy(b, b.op("Mul", margins, b.const(tau)))
    return b.op("Div", sharpened, b.const(tau))


def hkr(b: Builder, logits: ir.Value, objective: ir.Value, alpha: float, margin: float) -> ir.Value:
    """-KR_i + alpha·hinge_i per sample [batch] (see the module docstring); labels come from the objective,
    whose rows e_label - e_j have their only +1 at the label."""
    labels = b.op("Relu", b.reduce("ReduceMax", objective, [1], keepdims=0))                 # [batch, C] one-hot
    others = b.op("Sub", b.const(1.0), labels)
    batch = b.reduce("ReduceSum", labels, [0, 1], keepdims=0)
    positives = b.reduce("ReduceSum", labels, [0], keepdims=1)                                # [1, C]
    one = b.const(1.0)
    # A class absent from the batch (or present in every sample) has no term to weigh: max(count, 1).
    toward = b.op("Div", batch, b.op("Max", positives, one))
    away = b.op("Div", batch, b.op("Max", b.op("Sub", batch, positives), one))
    signs = b.op("Sub", b.op("Mul", labels, toward), b.op("Mul", others, away))
    kr = b.reduce("ReduceMean", b.op("Mul", logits, signs), [1], keepdims=0)
    half = b.const(margin / 2.0)
    classes = b.op("Cast", b.op("Shape", logits, start=1, end=2), to=ir.DataType.FLOAT)
    own = b.op("Mul", b.op("Mul", labels, b.op("Sub", classes, one)), b.op("Relu", b.op("Sub", half, logits)))
    rest = b.op("Mul", others, b.op("Relu", b.op("Add", half, logits)))
    hinge = b.reduce("ReduceMean", b.op("Add", own, rest), [1], keepdims=0)
    return b.op("Sub", b.op("Mul", hinge, b.const(alpha)), kr)


def _margin_cross_entropy(b: Builder, margins: ir.Value) -> ir.Value:
    """logsumexp([0, -m]) per sample [batch], as a LogSoftmax so large margins do not overflow."""
    batch = b.op("Slice", b.op("Shape", margins), b.ints([0]), b.ints([1]))
    zeros = b.op("ConstantOfShape", b.op("Concat", batch, b.ints([1]), axis=0),
                 value=ir.tensor([0.0], dtype=ir.DataType.FLOAT))
    logits = b.op("Concat", zeros, b.op("Neg", margins), axis=1)
    own_class = b.op("Slice", b.op("LogSoftmax", logits, axis=1), b.ints([0]), b.ints([1]), b.ints([1]))
    return b.op("Neg", b.op("Squeeze", own_class, b.ints([1])))
