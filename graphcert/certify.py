"""Certified accuracy of a classifier on a data set at an L-inf or L2 radius.

A sample is certified when the lower bound of every margin logit[label] - logit[j] (j != label) is
strictly positive over the input ball; bounds are computed on the margins themselves (the margin matrix
is folded into the last layer), not on logits compared separately. With the L2 norm the ball of
`lipschitz` is never clipped to the data domain (a superset, so still sound); CROWN clips its
intermediate boxes to it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import api, methods
from .alpha import CERTIFY_ALPHA, AlphaSettings, ProofWatch
from .data import Dataset, fit_to_input
from .errors import GraphcertError, InputError
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
    norm: str = "linf"
    # `auto`: per ladder stage, {"status": "ran" | "skipped" | "not needed", "samples", "certified", "reason"}
    stages: dict | None = None
    rounding: str = "float32"   # "float32": certified for the model as it runs in float32; "real": real arithmetic

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


# Linear-relaxation graphs hold coefficients of (rows x tensor elements) per sample; samples per run are
# limited so that such coefficients (with a few temporaries each) stay within this many bytes.
COEFFICIENT_BYTES = 2 << 30


def samples_per_run(model, method: str) -> int | None:
    """How many samples a bound graph of `method` may take at once (None: no limit): the model's batch when
    it stays fixed (see graphcert.model.batch_note), and the coefficient budget of linear relaxations."""
    limits = [n for n in (_fixed_batch(model), _coefficient_limit(model, method)) if n is not None]
    return min(limits) if limits else None


def _fixed_batch(model) -> int | None:
    """The exported batch size of a model whose batch the importer could not free (None: any batch)."""
    dims = static_shape(perturbed_inputs(model)[0]) if perturbed_inputs(model) else []
    return dims[0] if len(dims) >= 2 and isinstance(dims[0], int) else None


def _coefficient_limit(model, method: str) -> int | None:
    """A crude upper bound from the largest coefficient tensor: rows for both bounds of the largest relaxed or
    output tensor, times the largest tensor any backward pass crosses."""
    if not methods.get(method).linear_relaxation:
        return None
    sizes, targets = [], []
    for node in model.graph:
        for value in node.outputs:
            dims = static_shape(value)[1:]
            if dims and all(isinstance(d, int) for d in dims):
                sizes.append(int(np.prod(dims)))
        if node.op_type not in ("Gemm", "MatMul", "Conv", "Add", "Sub", "Mul", "Div", "Reshape", "Flatten",
                                "Transpose", "Identity", "Squeeze", "Unsqueeze", "BatchNormalization"):
            dims = static_shape(node.inputs[0])[1:] if node.inputs and node.inputs[0] is not None else []
            if dims and all(isinstance(d, int) for d in dims):
                targets.append(int(np.prod(dims)))
    if not sizes:
        return None
    floats = 2 * max(targets + [sizes[-1]]) * max(sizes)
    return max(1, int(COEFFICIENT_BYTES // (4 * 4 * floats)))


class GraphCertifier:
    """Margin lower bounds from a bound graph run by onnxruntime (methods registered in graphcert.api)."""

    def __init__(self, model, method: str, domain, norm: str = "linf"):
        bound = api.bound_graph(model, method, InputSet("linf", domain), spec="runtime", norm=norm)
        self.session = Session(to_proto(bound))
        x = perturbed_inputs(model)[0]
        self.x_name, self.eps_name = x.name, epsilon_name(model, x)
        self.output_name = next(n for n in self.session.output_names if n not in ("margins",) and not n.endswith(("_lower", "_upper")))
        self.per_run = samples_per_run(model, method) or np.inf

    def __call__(self, x: np.ndarray, eps, objective: np.ndarray):
        logits, lower = [], []
        for start in range(0, len(x), int(min(self.per_run, max(len(x), 1)))):
            part = slice(start, start + int(min(self.per_run, len(x))))
            out = self.session.run({self.x_name: x[part], self.eps_name: rows_of(eps, part), OBJECTIVE: objective[part]},
                                   [self.output_name, "margins_lower"])
            logits.append(out[self.output_name])
            lower.append(out["margins_lower"])
        return np.concatenate(logits), np.concatenate(lower)


def rows_of(eps, index) -> np.ndarray:
    """The radii of the samples `index` in float32, rounded up (the ball bounded holds the ball asked for): eps is
    one radius for all (a scalar) or one per sample ([batch, 1, ...])."""
    wide = np.asarray(eps, dtype=np.float64)
    eps = wide.astype(np.float32)
    eps = np.where(eps.astype(np.float64) < wide, np.nextafter(eps, np.float32(np.inf)), eps).astype(np.float32)
    return eps[index] if eps.ndim and eps.shape[0] > 1 else eps


def certified_mask(logits: np.ndarray, margins_lower: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Samples classified correctly at x whose every margin lower bound is proved positive."""
    return (logits.argmax(axis=1) == labels) & (margins_lower > 0).all(axis=1)


@dataclass
class Prepared:
    """A model and data set checked for certification: inputs fitted to the model's shape."""
    model: object
    data: Dataset
    x: np.ndarray
    n_classes: int
    domain: tuple | None


def prepare(model, data: Dataset, limit: int | None, batch_size: int, clip: bool) -> Prepared:
    """Load and check a batched single-input classifier and its data (one-line InputErrors)."""
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
    return Prepared(normalised, data, fit_to_input(data.x, shape), n_classes, data.domain if clip else None)


def certify(model, data: Dataset, eps: float, method: str = "ibp", limit: int | None = None,
            batch_size: int = 256, clip: bool = True, progress: bool = False,
            alpha: AlphaSettings | None = None, norm: str = "linf", rounding: str = "float32") -> CertifyResult:
    """Clean and certified accuracy at radius `eps` in `norm` ("linf" or "l2"); `alpha` tunes alpha-CROWN
    (methods alpha-crown, auto); `rounding` "float32" certifies the model as it runs in float32 (see
    graphcert.rounding), "real" in real arithmetic."""
    eps = check_eps(eps)
    check_method_norm(method, norm)
    prepared = prepare(model, data, limit, batch_size, clip)
    normalised, data, x_all, n_classes, domain = (prepared.model, prepared.data, prepared.x, prepared.n_classes,
                                                  prepared.domain)
    start = time.perf_counter()
    bounder = certifier(normalised, method, domain, alpha or CERTIFY_ALPHA, norm, rounding)
    clean = certified = 0
    batches = range(0, len(data), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"certify {method} eps={eps:g}", unit="batch", leave=False)
    for lo in batches:
        x, y = x_all[lo:lo + batch_size], data.y[lo:lo + batch_size]
        logits, margins_lower = bounder(x, eps, margin_objective(y, n_classes))
        clean += int((logits.argmax(axis=1) == y).sum())
        certified += int(certified_mask(logits, margins_lower, y).sum())
    n = len(data)
    stages = bounder.report() if hasattr(bounder, "report") else None
    return CertifyResult(clean / n, certified / n, n, clean, certified, eps, method,
                         time.perf_counter() - start, norm, stages, rounding)


class AlphaCertifier:
    """alpha-CROWN margins on the samples that CROWN leaves undecided (never looser than CROWN)."""

    def __init__(self, model, method: str, domain, settings: AlphaSettings, norm: str = "linf"):
        from .alpha import AlphaCrown
        self.crown = GraphCertifier(model, "crown", domain, norm)
        self.alpha = AlphaCrown(model, "linf", domain, spec="runtime", norm=norm)
        self.settings = settings
        self.per_run = samples_per_run(model, method) or np.inf
        self.floor = None   # float32: callable(x, eps, objective) -> the slack margins must beat (Float32Certifier)

    def __call__(self, x, eps, objective):
        logits, lower = self.crown(x, eps, objective)
        floor = self.floor(x, eps, objective) if self.floor is not None else 0.0
        undecided = np.flatnonzero(_undecided(logits, lower - floor, objective))
        settings = self.settings
        for start in range(0, len(undecided), int(min(self.per_run, max(len(undecided), 1)))):
            part = undecided[start:start + int(min(self.per_run, len(undecided)))]
            feeds = self.alpha.feeds(x=x[part], eps=rows_of(eps, part), objective=objective[part])
            needed = floor[part] if np.ndim(floor) else 0.0   # proved once the margins beat the slack
            watch = ProofWatch(lambda low, needed=needed: (low - needed).min(axis=1), settings.iterations,
                               settings.give_up)
            tighter, _ = self.alpha.bounds(feeds, settings.iterations, settings.lr, settings.lr_decay, stop=watch)
            lower[part] = np.maximum(lower[part], tighter)
        return logits, lower


class EscalatingCertifier:
    """`auto`: the cheapest method first, each stronger one only on the samples still undecided."""

    def __init__(self, model, method: str, domain, settings: AlphaSettings, norm: str = "linf",
                 rounding: str = "real"):
        self.model, self.domain, self.settings, self.norm = model, domain, settings, norm
        self.rounding = rounding   # each stage's margins are slacked for its own bound graph, so undecided is
        self.slack = None          # judged on what would be certified (one RoundingSlack shared by the stages)
        self.ladder = methods.get(method).stages_of(norm)
        self.stages: dict[str, object] = {}
        self.refusals: dict[str, GraphcertError] = {}
        self.samples = dict.fromkeys(self.ladder, 0)    # samples each stage bounded
        self.certified = dict.fromkeys(self.ladder, 0)  # samples each stage proved that earlier ones did not
        self.first = next((name for name in self.ladder if self._stage(name) is not None), None)
        if self.first is None:
            raise self.refusals[self.ladder[0]]

    def _stage(self, name):
        if name not in self.stages:
            try:
                stage = certifier(self.model, name, self.domain, self.settings, self.norm, rounding="real")
                if self.rounding == "float32":
                    stage = Float32Certifier(stage, self.model, self.domain, self.norm, name, self.slack)
                    self.slack = stage.slack
                self.stages[name] = stage
            except GraphcertError as refusal:
                self.refusals[name] = refusal
                self.stages[name] = None  # the method cannot bound this model: skip it, and say why
        return self.stages[name]

    def __call__(self, x, eps, objective):
        logits, lower = self._stage(self.first)(x, eps, objective)
        self._count(self.first, len(x), (lower > 0).all(axis=1) & _correct(logits, objective))
        for name in self.ladder[self.ladder.index(self.first) + 1:]:
            open_ = _undecided(logits, lower, objective)
            if not open_.any():
                break
            stage = self._stage(name)
            if stage is None:
                continue
            _, tighter = stage(x[open_], rows_of(eps, open_), objective[open_])
            lower[open_] = np.maximum(lower[open_], tighter)  # both are sound lower bounds
            self._count(name, int(open_.sum()), (lower[open_] > 0).all(axis=1))
        return logits, lower

    def _count(self, name, samples, proved) -> None:
        self.samples[name] += samples
        self.certified[name] += int(np.sum(proved))

    def report(self) -> dict:
        """Per stage of the ladder: whether it ran (on how many samples, certifying how many more), was skipped
        (and why), or was not needed (every sample was decided before it)."""
        stages = {}
        for name in self.ladder:
            if name in self.refusals:
                stages[name] = {"status": "skipped", "reason": str(self.refusals[name])}
            elif self.samples[name]:
                stages[name] = {"status": "ran", "samples": self.samples[name], "certified": self.certified[name]}
            else:
                stages[name] = {"status": "not needed"}
        return stages


def _correct(logits, objective) -> np.ndarray:
    return (np.einsum("bmn,bn->bm", objective, logits) > 0).all(axis=1)


def _undecided(logits, lower, objective) -> np.ndarray:
    """Samples classified correctly at x whose margins are not yet all proved positive."""
    margins_at_x = np.einsum("bmn,bn->bm", objective, logits)
    return (margins_at_x > 0).all(axis=1) & ~(lower > 0).all(axis=1)


def check_method_norm(method: str, norm: str) -> None:
    """An InputError when `method` cannot certify balls of `norm` (or only trains), with the methods that can."""
    methods.check_certifies(method, norm)


ROUNDINGS = ("float32", "real")


def certifier(model, method: str, domain, settings: AlphaSettings | None = None, norm: str = "linf",
              rounding: str = "float32"):
    """callable(x, eps, objective) -> (logits, margin lower bounds) for a method: one bound graph run by
    onnxruntime, alpha-CROWN on what CROWN leaves open, or a cheapest-first ladder of other methods.

    rounding "float32" (the default) lowers every margin bound by the float32 rounding slack of
    graphcert.rounding, so a positive bound holds for the model as it runs in float32; "real" leaves the
    bounds of real arithmetic."""
    if rounding not in ROUNDINGS:
        raise InputError(f"unknown rounding '{rounding}'; choose float32 or real")
    record = methods.get(method)
    if record.combines == "graph":
        found = GraphCertifier(model, method, domain, norm)
    else:
        if record.combines == "ladder":
            return EscalatingCertifier(model, method, domain, settings or CERTIFY_ALPHA, norm, rounding)
        found = AlphaCertifier(model, method, domain, settings or CERTIFY_ALPHA, norm)
    return Float32Certifier(found, model, domain, norm, method) if rounding == "float32" else found


class Float32Certifier:
    """Margin lower bounds minus the float32 rounding slack of each sample's input set (graphcert.rounding)."""

    def __init__(self, inner, model, domain, norm: str, method: str = "crown", slack=None):
        from .errors import UnsupportedOpError
        from .rounding_slack import POINT_BOUND_GRAPHS, RoundingSlack
        self.point = method in POINT_BOUND_GRAPHS
        try:
            self.slack = slack if slack is not None else RoundingSlack(model, norm)
        except UnsupportedOpError as refusal:
            raise InputError(f"{str(refusal).split('; run')[0]}: certificates for the float32 model need it; "
                             f"--rounding real certifies in real arithmetic instead") from None
        self.inner, self.domain, self.norm = inner, domain, norm
        if isinstance(inner, AlphaCertifier):   # refine what CROWN leaves open after the slack, not before it
            inner.floor = self.slack_of

    def __getattr__(self, name):  # report(), per_run, ... of the wrapped certifier
        return getattr(self.inner, name)

    def __call__(self, x, eps, objective):
        logits, lower = self.inner(x, eps, objective)
        return logits, lower - self.slack_of(x, eps, objective)

    def slack_of(self, x, eps, objective) -> np.ndarray:
        """[batch, m] float32 rounding slack of the margin rows over each sample's input set."""
        radius = np.asarray(eps, dtype=np.float32)
        if radius.ndim == 1 and len(radius) == len(x) and x.ndim > 1:
            radius = radius.reshape(len(x), *([1] * (x.ndim - 1)))
        low, high = x - radius, x + radius
        if self.domain is not None and self.norm == "linf":
            low, high = np.maximum(low, self.domain[0]), np.minimum(high, self.domain[1])
        return self.slack.of_rows(low, high, objective, point=self.point)
