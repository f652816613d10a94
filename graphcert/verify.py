"""Deciding VNN-LIB properties: falsify, bound the unsafe margins, branch and bound over input boxes or ReLUs.

`verify(model, spec)` answers `holds` (every conjunct of the unsafe set is refuted on every input box),
`violated` (a counterexample that onnxruntime confirms on the original model), `unknown` (the search gave up)
or `timeout`. Bounds come from a bound graph with the property's rows folded in (`graphcert.api`), run on a
batch of boxes at once; boxes that bounds cannot decide are split and re-bounded, and attacked meanwhile.
Inputs with few dimensions are split as boxes; beyond BRANCH_DIMENSIONS the search splits ReLU units
instead (z >= 0 or z <= 0, bounded by CROWN with clamped pre-activation bounds, `SplitBounds`, then, where
that does not decide a domain, by alpha-beta-CROWN with the split constraints' multipliers, `BetaSplitBounds`).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch

from . import api
from .alpha import VERIFY_ALPHA, AlphaCrown, AlphaSettings, ProofWatch
from .attack import Attack, FlatNetwork, unsafe_objective
from .errors import InputError, SpecError
from .export import IR_VERSION, atomic_write, to_proto
from .interface import OBJECTIVE, InputSet, perturbed_inputs
from .model import read_proto
from .passes.crown import (CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX, SPLIT_LOWER_PREFIX, SPLIT_SIGN_PREFIX,
                           SPLIT_UPPER_PREFIX, CrownPass)
from .passes.spec import SpecPass
from .runtime import Session
from .vnnlib import Property, load_property

STATUSES = ("holds", "violated", "unknown", "timeout")
COMPETITION_WORDS = {"holds": "unsat", "violated": "sat", "unknown": "unknown", "timeout": "timeout"}
# Bound graphs compute in float32 without outward rounding: demand a little more than > 0 to refute.
ABSOLUTE_SLACK, RELATIVE_SLACK = 1e-6, 1e-5
# Bound calls are sized to take about this long, so the clock is checked often enough to honour timeouts.
CALL_SECONDS = 0.2
MAX_CHUNK = 16384
# Halving one of many input dimensions barely tightens bounds: beyond this many, bounds and attacks decide alone.
BRANCH_DIMENSIONS = 64
# Trying a split costs two bound evaluations; each box tries this many dimensions.
SPLIT_CANDIDATES = 3
FRONTIER_BYTES = 1 << 28
# Methods whose search may split ReLUs (the domains are bounded by CROWN with clamps, after the method's own
# bounds on the property's boxes).
RELU_SPLIT_METHODS = ("crown", "auto", "alpha-crown")
# ReLU domains are re-bounded with alpha-beta-CROWN (None: CROWN with clamps only), in calls of about this long
# (each of many optimisation steps; the steps check the deadline).
BRANCH_BETA = AlphaSettings(iterations=20, give_up=True)
BETA_CALL_SECONDS = 1.0
ATTACK_SHARE = 0.2
ATTACK_BOXES = 64

BoundFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class Result:
    status: str
    counterexample: tuple[np.ndarray, np.ndarray] | None
    seconds: float
    boxes: int = 0          # sub-boxes bounded


class Network:
    """The model twice: normalised (for bounds and attacks) and the original file (to confirm candidates)."""

    def __init__(self, model_path: str | os.PathLike):
        proto = read_proto(model_path)
        self.model = api.load(proto)
        inputs = perturbed_inputs(self.model)
        if len(inputs) != 1 or len(self.model.graph.outputs) != 1:
            raise InputError(f"{model_path}: verification needs exactly one input and one output, found "
                             f"{len(inputs)} and {len(self.model.graph.outputs)}")
        x, y = inputs[0], self.model.graph.outputs[0]
        self.input_name = x.name
        dims = list(x.shape) if x.shape is not None else []
        self.batched = len(dims) >= 2 and not isinstance(dims[0], int)
        self.sample_shape = dims[1:] if self.batched else dims
        if not all(isinstance(d, int) for d in self.sample_shape):
            raise InputError(f"{model_path}: input {x.name} has free dimensions {dims}; fix its shape first")
        self.differentiable = FlatNetwork(self.model, y.name)
        self.n_inputs = int(np.prod(self.sample_shape))
        self.n_outputs = int(np.prod([d for d in (y.shape or [])[1 if self.batched else 0:]]))
        # The original computation, with the IR version capped to one onnxruntime loads (the graph is unchanged).
        runnable = onnx.ModelProto()
        runnable.CopyFrom(proto)
        runnable.ir_version = min(runnable.ir_version, IR_VERSION)
        self.original = Session(runnable, threads=1)
        original_input = next(i for i in proto.graph.input if i.name == x.name)
        original_dims = [d.dim_value for d in original_input.type.tensor_type.shape.dim]
        self.original_shape = original_dims if all(original_dims) else ([1] if self.batched else []) + self.sample_shape

    def model_shaped(self, flat: np.ndarray) -> np.ndarray:
        """[B, n] -> the model's batched input shape (only for batched models)."""
        return flat.reshape(len(flat), *self.sample_shape)

    def confirm(self, prop: Property, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(x, y) when the original model maps x into the unsafe set under onnxruntime, else None."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        y = self.original.run({self.input_name: x.reshape(self.original_shape)})[self.original.output_names[0]]
        y = y.reshape(-1)
        return (x, y) if prop.is_counterexample(x, y) else None


def outward_float32(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smallest float32 box containing [lower, upper]."""
    lo, hi = lower.astype(np.float32), upper.astype(np.float32)
    lo = np.where(lo > lower, np.nextafter(lo, np.float32(-np.inf)), lo)
    hi = np.where(hi < upper, np.nextafter(hi, np.float32(np.inf)), hi)
    return lo, hi


class SpecBounds:
    """bound_fn(lower [B, n], upper [B, n]) -> (margin_lower, margin_upper, margins at the box centers)."""

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, method: str):
        graph = api.bound_graph(network.model, method, InputSet("box"), spec=matrix, spec_offset=offset,
                                keep_original=True)
        self.session = Session(to_proto(graph))
        self.network = network
        name = network.input_name
        self.feeds = (f"{name}_lower", f"{name}_upper")
        self.outputs = ["margins_lower", "margins_upper", "margins"]

    def __call__(self, lower: np.ndarray, upper: np.ndarray):
        lo, hi = outward_float32(lower, upper)
        if self.network.batched:
            out = self.session.run(dict(zip(self.feeds, (self.network.model_shaped(lo), self.network.model_shaped(hi)))),
                                   self.outputs)
            return tuple(out[k].reshape(len(lo), -1) for k in self.outputs)
        # Models without a batch dimension take one box at a time.
        rows = [self.session.run(dict(zip(self.feeds, (a.reshape(self.network.sample_shape),
                                                        b.reshape(self.network.sample_shape)))), self.outputs)
                for a, b in zip(lo, hi)]
        return tuple(np.stack([r[k].reshape(-1) for r in rows]) for k in self.outputs)


class LadderBounds:
    """`auto` and `alpha-crown`: each stage bounds only the boxes the stages before it left undecided.

    A box is undecided while some conjunct has no row with a positive lower bound; every stage is sound,
    so the tightest of their bounds is kept.
    """

    def __init__(self, stages, membership: np.ndarray, root_stages: int = 0):
        """The last `root_stages` stages run only on the first call (the property's own boxes)."""
        self.stages, self.membership, self.root_stages = stages, membership, root_stages
        self.calls = 0

    def __call__(self, lower: np.ndarray, upper: np.ndarray):
        stages = self.stages if self.calls == 0 else self.stages[:len(self.stages) - self.root_stages]
        self.calls += 1
        margin_lower, margin_upper, center = stages[0](lower, upper)
        for stage in stages[1:]:
            refuted = ((margin_lower > 0).astype(np.int32) @ self.membership) > 0
            open_ = ~refuted.all(axis=1)
            if not open_.any():
                break
            tighter_lower, tighter_upper, _ = stage(lower[open_], upper[open_])
            margin_lower[open_] = np.maximum(margin_lower[open_], tighter_lower)
            margin_upper[open_] = np.minimum(margin_upper[open_], tighter_upper)
        return margin_lower, margin_upper, center


class AlphaSpecBounds:
    """alpha-CROWN margins over boxes, stopping once every conjunct is refuted or (with the settings' give_up)
    once the weakest one cannot be refuted at its recent rate of progress (`graphcert.alpha.ProofWatch`).

    The last `len(mixtures)` rows of `matrix` are averages of the rows listed in `mixtures`
    (`Property.rows_with_mixtures`); on models with a batch dimension alpha-CROWN learns their weights instead.
    """

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, membership: np.ndarray,
                 deadline: float, mixtures: list[np.ndarray] = (), settings: AlphaSettings = VERIFY_ALPHA):
        self.network, self.membership, self.settings = network, membership, settings
        self.deadline = deadline
        self.learned = network.batched and len(mixtures) > 0
        if self.learned:
            base = len(offset) - len(mixtures)
            self.objective, self.offset = matrix[:base].astype(np.float32), offset[:base]
            self.mixtures = list(mixtures)
            self.alpha = AlphaCrown(network.model, "box", spec="runtime")
        else:
            self.alpha = AlphaCrown(network.model, "box", spec=matrix, spec_offset=offset)

    def __call__(self, lower: np.ndarray, upper: np.ndarray):
        lo, hi = outward_float32(lower, upper)
        shape = self.network.model_shaped if self.network.batched else (lambda a: a.reshape(self.network.sample_shape))
        rows = [(lo, hi)] if self.network.batched else list(zip(lo, hi))
        found_lower, found_upper = [], []
        for a, b in rows:
            feeds = self.alpha.feeds(lower=shape(a), upper=shape(b))
            extra = {}
            if self.learned:
                feeds[OBJECTIVE] = np.ascontiguousarray(
                    np.broadcast_to(self.objective, (len(a),) + self.objective.shape))
                extra = {"offset": self.offset, "mixtures": self.mixtures}
            settings = self.settings
            watch = ProofWatch(self._weakest_conjunct, settings.iterations, settings.give_up)
            low, high = self.alpha.bounds(feeds, settings.iterations, settings.lr, settings.lr_decay,
                                          stop=lambda low, high: self._past_deadline() or watch(low, high), **extra)
            found_lower.append(low.reshape(len(a) if self.network.batched else 1, -1))
            found_upper.append(high.reshape(len(a) if self.network.batched else 1, -1))
        margin_lower, margin_upper = np.concatenate(found_lower), np.concatenate(found_upper)
        return margin_lower, margin_upper, np.full_like(margin_lower, np.nan)

    def _past_deadline(self) -> bool:
        return time.monotonic() > self.deadline  # the bounds so far are sound; the search sees the deadline next

    def _weakest_conjunct(self, low: np.ndarray) -> float:
        """The smallest over boxes and conjuncts (with rows) of the conjunct's best row lower bound."""
        per_row = low.reshape(-1, 1, self.membership.shape[0])
        has_rows = self.membership.any(axis=0)
        best = np.where(self.membership.T[None, has_rows], per_row, -np.inf).max(axis=2)
        return float(best.min()) if best.size else np.inf


class SplitBounds:
    """CROWN margins of ReLU split domains, one domain per batch element.

    A domain is an input box and bounds on the input z of every ReLU unit (flattened over layers in graph
    order). `mode` "clamp" intersects them with CROWN's bounds of z (-inf / +inf: plain CROWN), "given" takes
    them as they are (they must hold on the domain, e.g. a parent's clamped bounds with a unit's bound set
    to 0), which costs one backward pass instead of one per layer. Returns margin lower bounds [B, rows] and
    the clamped bounds [B, units] of z the relaxations used.
    """

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, mode: str):
        spec = SpecPass(np.asarray(matrix, dtype=np.float32), offset, keep_output=False)(network.model).model
        graph = CrownPass(InputSet("box"), keep_original=False, split_bounds=mode)(spec).model
        self.names = json.loads(graph.metadata_props["graphcert.splits"])
        by_name = {v.name: v for v in graph.graph.inputs}
        self.shapes = [[int(d) for d in by_name[SPLIT_LOWER_PREFIX + name].shape[1:]] for name in self.names]
        sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.layer = np.repeat(np.arange(len(sizes)), sizes)
        self.session = Session(to_proto(graph))
        self.network = network
        x = network.input_name
        self.feeds = (f"{x}_lower", f"{x}_upper")
        self.outputs = ["margins_lower"] + [p + n for n in self.names for p in (CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX)]

    @property
    def units(self) -> int:
        return int(self.offsets[-1])

    def __call__(self, lower: np.ndarray, upper: np.ndarray, unit_lower: np.ndarray, unit_upper: np.ndarray):
        lo, hi = outward_float32(lower, upper)
        feeds = dict(zip(self.feeds, (self.network.model_shaped(lo), self.network.model_shaped(hi))))
        for k, (name, shape) in enumerate(zip(self.names, self.shapes)):
            part = slice(self.offsets[k], self.offsets[k + 1])
            feeds[SPLIT_LOWER_PREFIX + name] = unit_lower[:, part].astype(np.float32).reshape(-1, *shape)
            feeds[SPLIT_UPPER_PREFIX + name] = unit_upper[:, part].astype(np.float32).reshape(-1, *shape)
        out = self.session.run(feeds, self.outputs)
        clamped = [out[name].reshape(len(lo), -1) for name in self.outputs[1:]]
        return (out["margins_lower"].reshape(len(lo), -1), np.concatenate(clamped[0::2], axis=1),
                np.concatenate(clamped[1::2], axis=1))


class BetaSplitBounds:
    """alpha- and beta-CROWN margins of ReLU split domains (`graphcert.alpha`): the clamped bounds of z that
    `SplitBounds` found are given, and the split signs (+1 for z >= 0, -1 for z <= 0, 0 unsplit, [B, units])
    bring in the split constraints with multipliers optimised per domain and row. Returns margin lower
    bounds [B, rows], never below those of CROWN with the given bounds."""

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, splits: SplitBounds,
                 settings: AlphaSettings):
        self.alpha = AlphaCrown(network.model, "box", spec=np.asarray(matrix, dtype=np.float32), spec_offset=offset,
                                split_bounds="given", beta=True)
        self.network, self.splits, self.settings = network, splits, settings

    def __call__(self, lower, upper, unit_lower, unit_upper, signs, stop) -> np.ndarray:
        lo, hi = outward_float32(lower, upper)
        feeds = self.alpha.feeds(lower=self.network.model_shaped(lo), upper=self.network.model_shaped(hi))
        splits = self.splits
        for k, (name, shape) in enumerate(zip(splits.names, splits.shapes)):
            part = slice(splits.offsets[k], splits.offsets[k + 1])
            feeds[SPLIT_LOWER_PREFIX + name] = unit_lower[:, part].astype(np.float32).reshape(-1, *shape)
            feeds[SPLIT_UPPER_PREFIX + name] = unit_upper[:, part].astype(np.float32).reshape(-1, *shape)
            feeds[SPLIT_SIGN_PREFIX + name] = signs[:, part].astype(np.float32).reshape(-1, *shape)
        settings = self.settings
        low, _ = self.alpha.bounds(feeds, settings.iterations, settings.lr, settings.lr_decay, stop=stop)
        return low.reshape(len(lo), -1)


# method -> (stages, how many of the last run on the root boxes only). `auto` branches with CROWN, which
# decides far more boxes per second than alpha-CROWN; alpha-CROWN only tries the unsplit property first.
LADDERS = {"auto": (("ibp", "crown", "alpha-crown"), 1), "alpha-crown": (("crown", "alpha-crown"), 0)}


def spec_bounds(network: Network, matrix: np.ndarray, offset: np.ndarray, method: str, membership: np.ndarray,
                deadline: float, mixtures: list[np.ndarray] = (), alpha: AlphaSettings = VERIFY_ALPHA):
    """The bound function of a method name: a bound graph, or a ladder of them ending in alpha-CROWN."""
    if method not in LADDERS:
        return SpecBounds(network, matrix, offset, method)
    names, root_stages = LADDERS[method]
    stages = [AlphaSpecBounds(network, matrix, offset, membership, deadline, mixtures, alpha)
              if name == "alpha-crown"
              else SpecBounds(network, matrix, offset, name) for name in names]
    return LadderBounds(stages, membership, root_stages)


def verify(model_path: str | os.PathLike, spec_path: str | os.PathLike, timeout: float = 60.0,
           method: str = "crown", alpha: AlphaSettings = VERIFY_ALPHA, branching: str | None = None,
           beta: AlphaSettings | None = BRANCH_BETA) -> Result:
    """Decide whether the property holds on the model within `timeout` seconds (loading included); `alpha`
    tunes alpha-CROWN (methods alpha-crown, auto); `branching` ("inputs" or "relus") overrides the choice
    by input dimension; `beta` tunes the alpha-beta-CROWN bounds of ReLU domains (None: CROWN only)."""
    start = time.monotonic()
    deadline = start + timeout
    prop = load_property(spec_path)
    network = Network(model_path)
    if (prop.n_inputs, prop.n_outputs) != (network.n_inputs, network.n_outputs):
        raise SpecError(f"{spec_path} declares {prop.n_inputs} inputs and {prop.n_outputs} outputs, but "
                        f"{model_path} has {network.n_inputs} inputs and {network.n_outputs} outputs")
    threads = torch.get_num_threads()
    # torch runs attacks and alpha-beta-CROWN on small tensors through many ops, where a second thread gains
    # little and costs much on a busy machine (mnistfc 256x2 prop_5_0.03 beside other jobs: 1,500-2,600 domain
    # bounds in 12 s with one thread, 60-700 with torch's default of two).
    torch.set_num_threads(1)
    try:
        status, counterexample, boxes = Search(prop, network, method, deadline, alpha=alpha, branching=branching,
                                               beta=beta).run()
    finally:
        torch.set_num_threads(threads)
    return Result(status, counterexample, time.monotonic() - start, boxes)


class CallSizer:
    """Slices of a batch sized so that one bound call takes about CALL_SECONDS: the clock is checked often
    enough to honour timeouts, and calls stay large enough to amortise their overhead."""

    def __init__(self, size: int = 64, seconds: float = CALL_SECONDS):
        self.size, self.seconds = size, seconds

    def slices(self, total: int, deadline: float):
        """Consecutive slices over range(total); a None (and no more) once the deadline has passed. Each full
        slice's call time, measured until the next one is asked for, rescales the size."""
        start = 0
        while start < total:
            if time.monotonic() > deadline:
                yield None
                return
            part = slice(start, min(start + self.size, total))
            began = time.monotonic()
            yield part
            if part.stop - part.start == self.size:
                seconds = max(time.monotonic() - began, 1e-4)
                self.size = int(np.clip(self.size * self.seconds / seconds, 8, MAX_CHUNK))
            start = part.stop


class Search:
    """Branch and bound over input boxes or ReLU units, with attacks on what bounds cannot decide.

    branching: "inputs" halves input boxes, "relus" splits ReLU units (CROWN-bounded methods on models with a
    batch dimension only); None picks inputs up to BRANCH_DIMENSIONS input dimensions, ReLUs beyond.
    """

    def __init__(self, prop: Property, network: Network, method: str, deadline: float,
                 bound_fn: BoundFn | None = None, alpha: AlphaSettings = VERIFY_ALPHA, branching: str | None = None,
                 beta: AlphaSettings | None = BRANCH_BETA):
        if branching not in (None, "inputs", "relus"):
            raise InputError(f"branching is 'inputs' or 'relus', not {branching!r}")
        self.prop, self.network, self.deadline = prop, network, deadline
        self.branching = branching or ("inputs" if network.n_inputs <= BRANCH_DIMENSIONS else "relus")
        self.method = method
        matrix, offset, rows, mixtures = prop.rows_with_mixtures()
        self.membership = np.zeros((len(offset), len(prop.unsafe)), dtype=bool)
        for k, indices in enumerate(rows):
            self.membership[indices, k] = True
        self.has_rows = len(offset) > 0
        began = time.monotonic()
        self.bound_fn = bound_fn or (spec_bounds(network, matrix, offset, method, self.membership, deadline,
                                                 mixtures, alpha) if self.has_rows else None)
        # Building a split bound graph takes about as long: ReLU branching starts only with that much time left.
        self.build_seconds = time.monotonic() - began
        self.attack = Attack(network.differentiable, matrix, offset, self.membership)
        self.boxes_bounded = 0
        self.box_calls, self.domain_calls = CallSizer(), CallSizer()
        self.beta_calls = CallSizer(seconds=BETA_CALL_SECONDS)
        self.beta_settings = beta
        self.matrix, self.offset = matrix, offset
        self.attack_seconds = 0.0
        self.started = time.monotonic()
        self.counterexample = None

    def run(self) -> tuple[str, tuple | None, int]:
        lower = np.stack([lo for lo, _ in self.prop.input_boxes]) if self.prop.cases else np.zeros((0, 0))
        upper = np.stack([hi for _, hi in self.prop.input_boxes]) if self.prop.cases else np.zeros((0, 0))
        alive = np.zeros((len(lower), len(self.prop.unsafe)), dtype=bool)
        for box, conjunct in self.prop.cases:
            alive[box, conjunct] = True
        if not len(lower):
            return "holds", None, 0
        if self._attack(lower, upper, alive, budget=0.25, samples=1024, restarts=32, steps=100) or \
                self._conjunct_without_rows(lower, upper, alive):
            return "violated", self.counterexample, self.boxes_bounded
        if not self.has_rows:
            return "unknown", None, 0
        frontier = self._roots(lower, upper, alive)
        if frontier is None:
            return self._stopped()
        if len(frontier[0]) and self.branching == "relus":
            return self._split_relus(frontier[0], frontier[1], frontier[2], frontier[4])
        frontier = Frontier(*frontier[:4])
        while len(frontier):
            if time.monotonic() > self.deadline:
                return "timeout", None, self.boxes_bounded
            if self.counterexample is not None:
                return "violated", self.counterexample, self.boxes_bounded
            if len(frontier) * lower.shape[1] * 16 > FRONTIER_BYTES:
                return "unknown", None, self.boxes_bounded
            parents = frontier.pop(max(1, self.box_calls.size // (2 * SPLIT_CANDIDATES)))
            children = self._split(*parents[:3])
            if children is None:
                return self._stopped()
            frontier.push(*children)
            self._attack_if_due(frontier)
        return ("violated", self.counterexample, self.boxes_bounded) if self.counterexample is not None \
            else ("holds", None, self.boxes_bounded)

    def _split_relus(self, lower, upper, alive, margin_lower):
        """Branch and bound over ReLU units of the undecided property boxes.

        A domain is (property box, live conjuncts, bounds of every ReLU input z, margin lower bounds). The
        property boxes get CROWN bounds of z first; each round the domains with the weakest margin bounds
        split their chosen unit both ways (z >= 0 and z <= 0: the parent's bounds with one side set to 0,
        which hold on the child) and the children are bounded in batches: CROWN bounds of the later layers'
        z are recomputed and clamped by the parent's, except after a split in the last layer, where only
        the margins are (`SplitBounds` modes "clamp" and "given"). Children these bounds leave live are
        re-bounded with alpha-beta-CROWN on their clamped bounds (`BetaSplitBounds`, unless beta is None).
        A child keeps the better of its own and its parent's margin bounds (its inputs are a subset of the
        parent's; a mixture row's root bound may be alpha-CROWN's for its learned weights, another average of
        the same conjunct's rows, which refutes the conjunct just as well); a child whose clamped bounds
        cross is empty and refuted. A live domain without an
        unstable unit cannot be split further: the answer is then unknown.
        """
        if self.method not in RELU_SPLIT_METHODS or not self.network.batched:
            return "unknown", None, self.boxes_bounded
        if time.monotonic() + self.build_seconds > self.deadline:
            return self._stopped()
        clamp = SplitBounds(self.network, self.matrix, self.offset, "clamp")
        if clamp.units == 0:
            return "unknown", None, self.boxes_bounded
        self.splitter = None
        self.beta_bounds = BetaSplitBounds(self.network, self.matrix, self.offset, clamp, self.beta_settings) \
            if self.beta_settings is not None else None
        self.boxes = (lower, upper)
        self.layer = clamp.layer
        unbounded = np.full((len(lower), clamp.units), np.inf, dtype=np.float32)
        unsplit = np.zeros((len(lower), clamp.units), dtype=np.int8)
        domains = self._bound_domains(clamp, np.arange(len(lower)), alive, -unbounded, unbounded, unsplit, margin_lower)
        if domains is None:
            return self._stopped()
        frontier = Frontier(*domains, key=4)
        while len(frontier):
            if self.counterexample is not None:
                return "violated", self.counterexample, self.boxes_bounded
            if time.monotonic() > self.deadline:
                return "timeout", None, self.boxes_bounded
            if (frontier.parts[5] < 0).any():
                return "unknown", None, self.boxes_bounded
            # float32 bounds of every unit, an int8 split sign, float32 margins
            if len(frontier) * (9 * clamp.units + 4 * margin_lower.shape[1]) > FRONTIER_BYTES:
                return "unknown", None, self.boxes_bounded
            root, alive, unit_lower, unit_upper, _, unit, margins, signs = frontier.pop(
                max(1, self.domain_calls.size // 2))
            rows = np.arange(len(root))
            active, inactive = unit_lower.copy(), unit_upper.copy()
            active[rows, unit] = np.maximum(active[rows, unit], 0)
            inactive[rows, unit] = np.minimum(inactive[rows, unit], 0)
            active_signs, inactive_signs = signs.copy(), signs.copy()
            active_signs[rows, unit], inactive_signs[rows, unit] = 1, -1
            # A split before the last layer pays off through the later layers' bounds, so those are
            # recomputed (clamped by the parent's); a split in the last layer only changes its own relaxation.
            last = clamp.layer[unit] == clamp.layer[-1]
            if last.any() and self.splitter is None:
                self.splitter = SplitBounds(self.network, self.matrix, self.offset, "given")
            for group, bounds in ((~last, clamp), (last, self.splitter)):
                if not group.any():
                    continue
                children = self._bound_domains(bounds, np.concatenate([root[group], root[group]]),
                                               np.concatenate([alive[group], alive[group]]),
                                               np.concatenate([active[group], unit_lower[group]]),
                                               np.concatenate([unit_upper[group], inactive[group]]),
                                               np.concatenate([active_signs[group], inactive_signs[group]]),
                                               np.concatenate([margins[group], margins[group]]))
                if children is None:
                    return self._stopped()
                frontier.push(*children)
            self._attack_domains_if_due(frontier)
        return ("violated", self.counterexample, self.boxes_bounded) if self.counterexample is not None \
            else ("holds", None, self.boxes_bounded)

    def _bound_domains(self, bounds: SplitBounds, root, alive, unit_lower, unit_upper, signs, parent_lower):
        """The live domains among those given, as Frontier parts (root, alive, clamped bounds of z (lower,
        upper), score, unit to split next or -1, margin lower bounds, split signs); None at the deadline."""
        lower, upper = self.boxes
        found = []
        for chunk in self.domain_calls.slices(len(root), self.deadline):
            if chunk is None:
                return None
            margin_lower, clamped_lower, clamped_upper = bounds(lower[root[chunk]], upper[root[chunk]],
                                                                unit_lower[chunk], unit_upper[chunk])
            self.boxes_bounded += len(margin_lower)
            # Crossed clamped bounds (beyond float32 rounding) mean no input of the box meets the splits.
            wide_lower, wide_upper = clamped_lower.astype(np.float64), clamped_upper.astype(np.float64)
            crossing = ABSOLUTE_SLACK + RELATIVE_SLACK * (np.abs(wide_lower) + np.abs(wide_upper))
            empty = (wide_lower > wide_upper + crossing).any(axis=1)
            # Order repaired as the graph does for its relaxations (crossings within rounding).
            found.append(self._live_domains(root[chunk], alive[chunk] & ~empty[:, None],
                                            np.minimum(clamped_lower, clamped_upper),
                                            np.maximum(clamped_lower, clamped_upper), signs[chunk],
                                            np.maximum(margin_lower.astype(np.float64), parent_lower[chunk])))
        domains = [np.concatenate([part[k] for part in found]) for k in range(8)]
        if self.beta_bounds is None or not len(domains[0]):
            return domains
        return self._tighten_with_beta(domains)

    def _live_domains(self, root, alive, unit_lower, unit_upper, signs, margin_lower):
        """Frontier parts of the domains with a live conjunct left after refuting by margin_lower."""
        slack = ABSOLUTE_SLACK + RELATIVE_SLACK * np.abs(margin_lower)
        refuted = ((margin_lower > slack).astype(np.int32) @ self.membership) > 0
        live = alive & ~refuted
        score = unsafe_objective(torch.from_numpy(margin_lower), torch.from_numpy(self.membership),
                                 torch.from_numpy(live)).numpy()
        keep = live.any(axis=1)
        return (root[keep], live[keep], unit_lower[keep], unit_upper[keep], score[keep],
                self._branching_unit(unit_lower[keep], unit_upper[keep]), margin_lower[keep].astype(np.float32),
                signs[keep])

    def _tighten_with_beta(self, domains):
        """Re-bound the live domains with alpha and beta multipliers (`BetaSplitBounds`), in chunks sized by
        their own CallSizer; at the deadline the domains not reached keep their CROWN bounds (sound)."""
        root, alive, unit_lower, unit_upper, _, _, margins, signs = domains
        lower, upper = self.boxes
        membership = torch.from_numpy(self.membership)
        found, done = [], 0
        for chunk in self.beta_calls.slices(len(root), self.deadline):
            if chunk is None:
                break
            live = torch.from_numpy(alive[chunk])
            watch = ProofWatch(lambda low: unsafe_objective(torch.from_numpy(low.astype(np.float64)), membership,
                                                            live).numpy(),
                               self.beta_settings.iterations, self.beta_settings.give_up)
            tighter = self.beta_bounds(lower[root[chunk]], upper[root[chunk]], unit_lower[chunk], unit_upper[chunk],
                                       signs[chunk], stop=lambda low, high: time.monotonic() > self.deadline
                                       or watch(low, high))
            self.boxes_bounded += len(tighter)
            margin_lower = np.maximum(tighter.astype(np.float64), margins[chunk])
            found.append(self._live_domains(root[chunk], alive[chunk], unit_lower[chunk], unit_upper[chunk],
                                            signs[chunk], margin_lower))
            done = chunk.stop
        found.append(tuple(part[done:] for part in domains))
        return [np.concatenate([part[k] for part in found]) for k in range(8)]

    def _branching_unit(self, lower, upper) -> np.ndarray:
        """Per domain, the unstable unit with the largest triangle relaxation intercept -l·u/(u-l) in the
        earliest layer that has one; -1 when every unit is stable.

        Early splits tighten every later layer's recomputed bounds. (Measured on random 2-16-16-2 networks,
        properties at 70-90 % of the way from the true maximum to CROWN's bound, 5 s: this proved 5 of 8,
        the last layer first 4, the last layer first without recomputing any bounds 2.)
        """
        unstable = (lower < 0) & (upper > 0)
        intercept = np.where(unstable, -lower * upper / np.where(unstable, upper - lower, 1.0), -1.0)
        layer = np.where(unstable, self.layer[None, :], np.iinfo(self.layer.dtype).max)
        earliest = layer.min(axis=1, keepdims=True)
        unit = np.argmax(np.where(layer == earliest, intercept, -2.0), axis=1)
        return np.where(unstable.any(axis=1), unit, -1)

    def _attack_domains_if_due(self, frontier: "Frontier") -> None:
        """Attack the property boxes that still have live domains (their live conjuncts), within ATTACK_SHARE."""
        elapsed = time.monotonic() - self.started
        if self.attack_seconds > ATTACK_SHARE * elapsed or not len(frontier):
            return
        root, alive = frontier.parts[0], frontier.parts[1]
        roots = np.unique(root)
        live = np.zeros((len(roots), alive.shape[1]), dtype=bool)
        np.logical_or.at(live, np.searchsorted(roots, root), alive)
        lower, upper = self.boxes
        self._attack(lower[roots], upper[roots], live, budget=1.0, samples=64, restarts=4, steps=30)

    def _stopped(self):
        if self.counterexample is not None:
            return "violated", self.counterexample, self.boxes_bounded
        return "timeout", None, self.boxes_bounded

    def _conjunct_without_rows(self, lower, upper, alive) -> bool:
        """A conjunct with no output rows is met by every output: any input of its box is a counterexample."""
        empty = ~self.membership.any(axis=0)
        for box in np.flatnonzero((alive & empty).any(axis=1)):
            self._confirm(0.5 * (lower[box] + upper[box]))
        return self.counterexample is not None

    def _evaluate(self, lower, upper, alive):
        """Bound boxes, drop refuted conjuncts, try the centers; (alive, score, center objective, margin lower
        bounds) or None at the deadline.

        score: the weakest live conjunct's best row lower bound (> 0 means refuted; +inf when the box is).
        center objective: the unsafe objective at the box center (<= 0 there means a candidate counterexample).
        """
        bounds = self._bound_batched(lower, upper)
        if bounds is None:
            return None
        margin_lower, margin_upper, center = bounds
        self.boxes_bounded += len(lower)
        slack = ABSOLUTE_SLACK + RELATIVE_SLACK * (np.abs(margin_lower) + np.abs(margin_upper))
        refuted = ((margin_lower > slack).astype(np.int32) @ self.membership) > 0
        alive = alive & ~refuted
        membership, alive_t = torch.from_numpy(self.membership), torch.from_numpy(alive)
        center_objective = unsafe_objective(torch.from_numpy(center), membership, alive_t).numpy()
        for box in np.flatnonzero(center_objective <= 0)[:8]:
            if self._confirm(0.5 * (lower[box] + upper[box])):
                break
        return alive, unsafe_objective(torch.from_numpy(margin_lower), membership, alive_t).numpy(), center_objective, \
            margin_lower

    def _bound_batched(self, lower, upper):
        """bound_fn over chunks sized to take about CALL_SECONDS each; None when the deadline passes."""
        parts = []
        for chunk in self.box_calls.slices(len(lower), self.deadline):
            if chunk is None:
                return None
            parts.append(self.bound_fn(lower[chunk], upper[chunk]))
        return tuple(np.concatenate([p[k] for p in parts]).astype(np.float64) for k in range(3))

    def _roots(self, lower, upper, alive):
        evaluated = self._evaluate(lower, upper, alive)
        if evaluated is None:
            return None
        alive, _, center_objective, margin_lower = evaluated
        keep = alive.any(axis=1)
        return lower[keep], upper[keep], alive[keep], center_objective[keep], margin_lower[keep]

    def _split(self, lower, upper, alive):
        """Halve each box along one dimension and return the live halves.

        Candidates: the dimension widest relative to the property's box, plus the ones with the largest
        |gradient| x width of the unsafe objective at the center. All candidate halves are bounded in one
        call; the split kept is the one whose halves get closest to refuted in total (scores clipped at 0,
        since a refuted half cannot do better).
        """
        m, n = lower.shape
        dims = self._candidate_dimensions(lower, upper, alive)
        d = dims.shape[1]
        parent, dim = np.repeat(np.arange(m), d), dims.reshape(-1)
        rows = np.arange(len(parent))
        mid = 0.5 * (lower[parent, dim] + upper[parent, dim])
        left_upper, right_lower = upper[parent], lower[parent]
        left_upper[rows, dim] = mid
        right_lower[rows, dim] = mid
        child_lower = np.concatenate([lower[parent], right_lower])
        child_upper = np.concatenate([left_upper, upper[parent]])
        evaluated = self._evaluate(child_lower, child_upper, np.concatenate([alive[parent], alive[parent]]))
        if evaluated is None:
            return None
        child_alive, child_score, child_objective, _ = evaluated
        half = len(parent)
        progress = (np.minimum(child_score[:half], 0) + np.minimum(child_score[half:], 0)).reshape(m, d)
        pick = np.arange(m) * d + np.argmax(progress, axis=1)
        selected = np.concatenate([pick, pick + half])
        keep = selected[child_alive[selected].any(axis=1)]
        return child_lower[keep], child_upper[keep], child_alive[keep], child_objective[keep]

    def _candidate_dimensions(self, lower, upper, alive) -> np.ndarray:
        """[m, <= SPLIT_CANDIDATES] dimensions per box, the relatively widest first (it wins ties)."""
        m, n = lower.shape
        center = torch.from_numpy((0.5 * (lower + upper)).astype(np.float32)).requires_grad_(True)
        objective = self.attack.objective(center, torch.from_numpy(alive))
        grad, = torch.autograd.grad(objective.sum(), center)
        by_smear = np.argsort(-np.abs(grad.numpy()) * (upper - lower), axis=1)
        widest = np.argmax((upper - lower) / self._root_width(), axis=1)[:, None]
        others = by_smear[by_smear != widest].reshape(m, n - 1)[:, :SPLIT_CANDIDATES - 1]
        return np.concatenate([widest, others], axis=1)

    def _root_width(self) -> np.ndarray:
        widths = np.max([hi - lo for lo, hi in self.prop.input_boxes], axis=0)
        return np.where(widths > 0, widths, 1.0)

    def _attack_if_due(self, frontier: "Frontier") -> None:
        """Attack the boxes whose centers come closest to the unsafe set, within ATTACK_SHARE of the time."""
        elapsed = time.monotonic() - self.started
        if self.attack_seconds > ATTACK_SHARE * elapsed or not len(frontier):
            return
        lower, upper, alive, _ = frontier.closest(ATTACK_BOXES)
        self._attack(lower, upper, alive, budget=1.0, samples=64, restarts=4, steps=30)

    def _attack(self, lower, upper, alive, budget: float, **settings) -> bool:
        """Attack the boxes for at most `budget` of the remaining time; True when a counterexample is confirmed."""
        began = time.monotonic()
        deadline = began + budget * max(0.0, self.deadline - began)
        points, objective = self.attack.run(lower, upper, alive, deadline, **settings)
        for index in np.argsort(objective)[:8]:
            if objective[index] > 0 or self._confirm(points[index]):
                break
        self.attack_seconds += time.monotonic() - began
        return self.counterexample is not None

    def _confirm(self, x: np.ndarray) -> bool:
        found = self.network.confirm(self.prop, x)
        if found is not None and self.counterexample is None:
            self.counterexample = found
        return self.counterexample is not None


class Frontier:
    """Undecided boxes (or ReLU split domains) as parallel arrays, popped smallest `key` part first.

    Input boxes are (lower, upper, live conjuncts, unsafe objective at the center): boxes whose centers come
    closest to the unsafe set are split first; for a proof the order does not change the work, and for a
    violated property it leads to the region where a counterexample lies. ReLU domains order by their
    weakest margin bound.
    """

    def __init__(self, *parts: np.ndarray, key: int = 3):
        self.parts = list(parts)
        self.key = key

    def __len__(self) -> int:
        return len(self.parts[0])

    def push(self, *parts: np.ndarray) -> None:
        self.parts = [np.concatenate([mine, new]) for mine, new in zip(self.parts, parts)]

    def pop(self, count: int) -> list[np.ndarray]:
        chosen = self._closest(count)
        taken = [part[chosen] for part in self.parts]
        rest = np.ones(len(self), dtype=bool)
        rest[chosen] = False
        self.parts = [part[rest] for part in self.parts]
        return taken

    def closest(self, count: int) -> list[np.ndarray]:
        return [part[self._closest(count)] for part in self.parts]

    def _closest(self, count: int) -> np.ndarray:
        values = self.parts[self.key]
        if count >= len(values):
            return np.arange(len(values))
        return np.argpartition(values, count)[:count]


def write_result(result: Result, path: str | os.PathLike) -> None:
    """The competition's result file: unsat, sat with the counterexample, unknown or timeout."""
    lines = [COMPETITION_WORDS[result.status]]
    if result.status == "violated" and result.counterexample is not None:
        x, y = result.counterexample
        pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x)] + [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y)]
        lines.append("(" + "\n ".join(pairs) + ")")
    atomic_write(("\n".join(lines) + "\n").encode(), path)


@dataclass
class InstanceResult:
    onnx: str
    vnnlib: str
    status: str
    seconds: float
    timeout: float


def run_instances(csv_path: str | os.PathLike, out_csv: str | os.PathLike | None = None, method: str = "crown",
                  progress: bool = True, timeout_scale: float = 1.0, limit: int | None = None,
                  alpha: AlphaSettings = VERIFY_ALPHA, executor=None, resume: bool = False) -> list[InstanceResult]:
    """Verify every (onnx, vnnlib, timeout) row of a competition instances file (paths relative to it), serially
    or on `executor` (graphcert.distributed), streaming rows into `out_csv`; `resume` keeps the rows there."""
    from .distributed.instances import run_instances as run
    return run(csv_path, out_csv, method, progress, timeout_scale, limit, alpha, executor, resume)[0]


def summarize(results: list[InstanceResult]) -> dict:
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    counts["error"] = sum(r.status.startswith("error") for r in results)
    counts["median_seconds"] = statistics.median([r.seconds for r in results]) if results else 0.0
    return counts
