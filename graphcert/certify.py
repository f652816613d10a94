"""Certified accuracy of a classifier on a data set at an L-inf radius.

A sample is certified when the lower bound of every margin logit[label] - logit[j] (j != label) is
strictly positive over the input box; bounds are computed on the margins themselves (the margin matrix
is folded into the last layer), not on logits compared separately.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import api
from .alpha import AlphaSettings, ProofWatch
from .data import Dataset, fit_to_input
from .errors import InputError, UnsupportedOpError
from .export import to_proto
from .interface import OBJECTIVE, InputSet, epsilon_name, perturbed_inputs
from .model import static_shape
from .runtime import Session


@dataclass
class CertifyResult:
    clean_accuracy: float
    certified_accuracy: float
    n: int
    clean: int
    certified: int
    eps: float
    method: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def margin_objective(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows e_label - e_j for every j != label: [batch, n_classes - 1, n_classes]."""
    batch = len(labels)
    others = np.array([[j for j in range(n_classes) if j != y] for y in labels], dtype=np.int64)
    objective = np.zeros((batch, n_classes - 1, n_classes), dtype=np.float32)
    rows = np.arange(n_classes - 1)
    for i in range(batch):
        objective[i, rows, labels[i]] = 1.0
        objective[i, rows, others[i]] = -1.0
    return objective


def check_eps(eps: float) -> float:
    eps = float(eps)
    if math.isnan(eps) or eps < 0 or math.isinf(eps):
        raise InputError(f"epsilon must be a finite number >= 0, got {eps}")
    return eps


class GraphCertifier:
    """Margin lower bounds from a bound graph run by onnxruntime (methods registered in graphcert.api)."""

    def __init__(self, model, method: str, domain):
        bound = api.bound_graph(model, method, InputSet("linf", domain), spec="runtime")
        self.session = Session(to_proto(bound))
        x = perturbed_inputs(model)[0]
        self.x_name, self.eps_name = x.name, epsilon_name(model, x)
        self.output_name = next(n for n in self.session.output_names if n not in ("margins",) and not n.endswith(("_lower", "_upper")))

    def __call__(self, x: np.ndarray, eps: float, objective: np.ndarray):
        out = self.session.run({self.x_name: x, self.eps_name: np.float32(eps), OBJECTIVE: objective},
                               [self.output_name, "margins_lower"])
        return out[self.output_name], out["margins_lower"]


def certify(model, data: Dataset, eps: float, method: str = "ibp", limit: int | None = None,
            batch_size: int = 256, clip: bool = True, progress: bool = False,
            alpha: AlphaSettings | None = None) -> CertifyResult:
    """Clean and certified accuracy at L-inf radius `eps`; `alpha` tunes alpha-CROWN (methods alpha-crown, auto)."""
    eps = check_eps(eps)
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    normalised = model if not isinstance(model, (str, bytes)) and hasattr(model, "graph") else api.load(model)
    inputs = perturbed_inputs(normalised)
    if len(inputs) != 1:
        raise InputError(f"certify needs a model with one input; this one has {len(inputs)}")
    shape = static_shape(inputs[0])
    out_shape = static_shape(normalised.graph.outputs[0])
    if len(shape) < 2 or len(out_shape) != 2:
        raise InputError(f"certify needs a batched classifier (input [batch, ...], output [batch, classes]); "
                         f"this model maps {shape} to {out_shape}")
    n_classes = out_shape[1]
    data = data.head(limit)
    if not isinstance(n_classes, int) or data.y.max() >= n_classes:
        raise InputError(f"labels go up to {data.y.max()} but the model has {n_classes} outputs")
    x_all = fit_to_input(data.x, shape)
    domain = data.domain if clip else None
    start = time.perf_counter()
    bounder = certifier(normalised, method, domain, alpha or AlphaSettings())
    clean = certified = 0
    batches = range(0, len(data), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"certify {method} eps={eps:g}", unit="batch", leave=False)
    for lo in batches:
        x, y = x_all[lo:lo + batch_size], data.y[lo:lo + batch_size]
        logits, margins_lower = bounder(x, eps, margin_objective(y, n_classes))
        correct = logits.argmax(axis=1) == y
        clean += int(correct.sum())
        certified += int((correct & (margins_lower > 0).all(axis=1)).sum())
    n = len(data)
    return CertifyResult(clean / n, certified / n, n, clean, certified, eps, method,
                         time.perf_counter() - start)


class AlphaCertifier:
    """alpha-CROWN margins on the samples that CROWN leaves undecided (never looser than CROWN)."""

    def __init__(self, model, method: str, domain, settings: AlphaSettings):
        from .alpha import AlphaCrown
        self.crown = GraphCertifier(model, "crown", domain)
        self.alpha = AlphaCrown(model, "linf", domain, spec="runtime")
        self.settings = settings

    def __call__(self, x, eps, objective):
        logits, lower = self.crown(x, eps, objective)
        open_ = _undecided(logits, lower, objective)
        if open_.any():
            feeds = self.alpha.feeds(x=x[open_], eps=np.float32(eps), objective=objective[open_])
            settings = self.settings
            watch = ProofWatch(lambda low: float(low.min()), settings.iterations, settings.give_up)
            tighter, _ = self.alpha.bounds(feeds, settings.iterations, settings.lr, settings.lr_decay, stop=watch)
            lower[open_] = np.maximum(lower[open_], tighter)
        return logits, lower


class EscalatingCertifier:
    """`auto`: the cheapest method first, each stronger one only on the samples still undecided."""

    LADDER = ("ibp", "crown-ibp", "crown", "alpha-crown")

    def __init__(self, model, method: str, domain, settings: AlphaSettings):
        self.model, self.domain, self.settings = model, domain, settings
        self.stages: dict[str, object] = {}

    def _stage(self, name):
        if name not in self.stages:
            try:
                self.stages[name] = certifier(self.model, name, self.domain, self.settings)
            except UnsupportedOpError:
                self.stages[name] = None  # the model has ops this method cannot bound: skip it
        return self.stages[name]

    def __call__(self, x, eps, objective):
        logits, lower = self._stage("ibp")(x, eps, objective)
        for name in self.LADDER[1:]:
            open_ = _undecided(logits, lower, objective)
            stage = self._stage(name)
            if not open_.any() or stage is None:
                continue
            _, tighter = stage(x[open_], eps, objective[open_])
            lower[open_] = np.maximum(lower[open_], tighter)  # both are sound lower bounds
        return logits, lower


def _undecided(logits, lower, objective) -> np.ndarray:
    """Samples classified correctly at x whose margins are not yet all proved positive."""
    margins_at_x = np.einsum("bmn,bn->bm", objective, logits)
    return (margins_at_x > 0).all(axis=1) & ~(lower > 0).all(axis=1)


# method name -> factory(normalised model, method, domain, alpha settings) -> callable(x, eps, objective) ->
# (logits, margin lower)
CERTIFIERS = {"alpha-crown": AlphaCertifier, "auto": EscalatingCertifier}


def certifier(model, method: str, domain, settings: AlphaSettings | None = None):
    if method in CERTIFIERS:
        return CERTIFIERS[method](model, method, domain, settings or AlphaSettings())
    if method not in api.METHODS:
        raise InputError(f"unknown method '{method}'; choose one of: {', '.join(sorted(set(api.METHODS) | set(CERTIFIERS)))}")
    return GraphCertifier(model, method, domain)
