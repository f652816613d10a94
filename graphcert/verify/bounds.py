"""Bound functions over input boxes and split domains, each a bound graph (or alpha-CROWN) run on a batch.

`spec_bounds` gives the bound function of a method (one graph, or a ladder ending in alpha-CROWN) over input
boxes; `SplitBounds` and `BetaSplitBounds` bound split domains (an input box plus bounds on the input of every
ReLU, Sigmoid and Tanh) for `relu_bab`.
"""
from __future__ import annotations

import json
import time

import numpy as np

from .. import api, methods
from ..alpha import VERIFY_ALPHA, AlphaCrown, AlphaSettings, ProofWatch
from ..export import to_proto
from ..interface import OBJECTIVE, InputSet
from ..passes.crown import (CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX, INPUT_COEFFICIENTS_PREFIX,
                           SPLIT_LOWER_PREFIX, SPLIT_SIGN_PREFIX, SPLIT_UNITS, SPLIT_UPPER_PREFIX, CrownPass)
from ..passes.spec import SpecPass
from ..runtime import LazySession
from .network import Network
from .resources import Budget, graph_bytes_per_sample, log, size



def outward_float32(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smallest float32 box containing [lower, upper]."""
    lo, hi = lower.astype(np.float32), upper.astype(np.float32)
    lo = np.where(lo > lower, np.nextafter(lo, np.float32(-np.inf)), lo)
    hi = np.where(hi < upper, np.nextafter(hi, np.float32(np.inf)), hi)
    return lo, hi


class SpecBounds(LazySession):
    """bound_fn(lower [B, n], upper [B, n]) -> (margin_lower, margin_upper, margins at the box centers), and with
    `coefficients` (CROWN on a batched model) a fourth: the margin lower bounds' coefficients of the input
    [B, rows, n] (`CrownPass(input_coefficients=True)`)."""

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, method: str,
                 coefficients: bool = False):
        self.method = method
        coefficients = coefficients and method == "crown" and network.batched
        if coefficients:
            spec = SpecPass(np.asarray(matrix, dtype=np.float32), offset, keep_output=False)(network.bound_model).model
            graph = CrownPass(InputSet("box"), keep_original=True, input_coefficients=True)(spec).model
        else:
            graph = api.bound_graph(network.bound_model, method, InputSet("box"), spec=matrix, spec_offset=offset,
                                    keep_original=True)
        proto = to_proto(graph)
        self.bytes_per_sample = graph_bytes_per_sample(proto)
        self.proto = proto   # graphcert.precision runs it in float64 where the float32 slack needs that
        self.network = network
        name = network.input_name
        self.feeds = (f"{name}_lower", f"{name}_upper")
        self.outputs = ["margins_lower", "margins_upper", "margins"]
        self.coefficients = INPUT_COEFFICIENTS_PREFIX + name if coefficients else None
        if self.coefficients is not None and self.coefficients not in {v.name for v in proto.graph.output}:
            self.coefficients = None   # (a pass that bounds the margins through IBP exposes none)
        if self.coefficients is not None:
            self.outputs.append(self.coefficients)

    def __call__(self, lower: np.ndarray, upper: np.ndarray):
        lo, hi = outward_float32(lower, upper)
        if self.network.batched:
            out = self.session.run(dict(zip(self.feeds, (self.network.model_shaped(lo), self.network.model_shaped(hi)))),
                                   self.outputs)
            found = tuple(out[k].reshape(len(lo), -1) for k in self.outputs[:3])
            if self.coefficients is None:
                return found
            # [rows, B, *sample], or [rows, 1, *sample] where they do not depend on the box (a linear model)
            coefficients = out[self.coefficients].reshape(len(out[self.coefficients]), -1, self.network.n_inputs)
            coefficients = np.broadcast_to(coefficients, (len(coefficients), len(lo), self.network.n_inputs))
            return found + (coefficients.transpose(1, 0, 2),)
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
            self.alpha = AlphaCrown(network.bound_model, "box", spec="runtime")
        else:
            self.alpha = AlphaCrown(network.bound_model, "box", spec=matrix, spec_offset=offset)

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


class SplitBounds(LazySession):
    """CROWN margins of split domains, one domain per batch element.

    A domain is an input box and bounds on the input z of every ReLU, Sigmoid and Tanh unit (`SPLIT_UNITS`,
    flattened over layers in graph order; `activations` names each layer's op, `relu` marks ReLU units).
    `mode` "clamp" intersects them with CROWN's bounds of z (-inf / +inf: plain CROWN), "given" takes
    them as they are (they must hold on the domain, e.g. a parent's clamped bounds with a unit's bound set
    to 0), which costs one backward pass instead of one per layer. Returns margin lower bounds [B, rows] and
    the clamped bounds [B, units] of z the relaxations used.
    """

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, mode: str):
        spec = SpecPass(np.asarray(matrix, dtype=np.float32), offset, keep_output=False)(network.bound_model).model
        graph = CrownPass(InputSet("box"), keep_original=False, split_bounds=mode)(spec).model
        self.names = json.loads(graph.metadata_props["graphcert.splits"])
        by_name = {v.name: v for v in graph.graph.inputs}
        self.shapes = [[int(d) for d in by_name[SPLIT_LOWER_PREFIX + name].shape[1:]] for name in self.names]
        sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.layer = np.repeat(np.arange(len(sizes)), sizes)
        # The op each layer's z feeds (a ReLU where some ReLU takes it: split at 0 with a sign).
        feeding: dict[str, set] = {}
        for node in spec.graph:
            if node.op_type in SPLIT_UNITS and node.inputs and node.inputs[0] is not None:
                feeding.setdefault(node.inputs[0].name, set()).add(node.op_type)
        self.activations = ["Relu" if "Relu" in feeding[name] else min(feeding[name]) for name in self.names]
        self.relu = np.repeat([op == "Relu" for op in self.activations], sizes)
        proto = to_proto(graph)
        self.bytes_per_sample = graph_bytes_per_sample(proto)
        self.proto = proto   # graphcert.precision runs it in float64 where the float32 slack needs that
        self.model = graph
        self.network = network
        x = network.input_name
        self.feeds = (f"{x}_lower", f"{x}_upper")
        self.outputs = ["margins_lower"] + [p + n for n in self.names for p in (CLAMPED_LOWER_PREFIX, CLAMPED_UPPER_PREFIX)]

    @property
    def units(self) -> int:
        return int(self.offsets[-1])

    def relu_rows(self, picked: np.ndarray) -> dict[str, np.ndarray]:
        """{ReLU layer's unit input name: indices of the `picked` [units] units in it}; S-shaped layers are left
        out (their every unit is relaxed, stable or not)."""
        return {name: np.flatnonzero(picked[self.offsets[k]:self.offsets[k + 1]])
                for k, name in enumerate(self.names) if self.activations[k] == "Relu"}

    def per_layer(self, unit_lower: np.ndarray, unit_upper: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{unit input name: (lower, upper) [B, *shape]} from flat [B, units] bounds."""
        found = {}
        for k, (name, shape) in enumerate(zip(self.names, self.shapes)):
            part = slice(self.offsets[k], self.offsets[k + 1])
            found[name] = (unit_lower[:, part].reshape(-1, *shape), unit_upper[:, part].reshape(-1, *shape))
        return found

    def split_feeds(self, unit_lower: np.ndarray, unit_upper: np.ndarray,
                    signs: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The split graph's per-layer feeds from flat [B, units] bounds of z (and split signs, for beta)."""
        feeds = {}
        for k, (name, shape) in enumerate(zip(self.names, self.shapes)):
            part = slice(self.offsets[k], self.offsets[k + 1])
            for prefix, values in ((SPLIT_LOWER_PREFIX, unit_lower), (SPLIT_UPPER_PREFIX, unit_upper),
                                   (SPLIT_SIGN_PREFIX, signs)):
                if values is not None:
                    feeds[prefix + name] = values[:, part].astype(np.float32).reshape(-1, *shape)
        return feeds

    def __call__(self, lower: np.ndarray, upper: np.ndarray, unit_lower: np.ndarray, unit_upper: np.ndarray):
        lo, hi = outward_float32(lower, upper)
        feeds = dict(zip(self.feeds, (self.network.model_shaped(lo), self.network.model_shaped(hi))))
        feeds.update(self.split_feeds(unit_lower, unit_upper))
        out = self.session.run(feeds, self.outputs)
        clamped = [out[name].reshape(len(lo), -1) for name in self.outputs[1:]]
        return (out["margins_lower"].reshape(len(lo), -1), np.concatenate(clamped[0::2], axis=1),
                np.concatenate(clamped[1::2], axis=1))


class BetaSplitBounds:
    """alpha- and beta-CROWN margins of split domains (`graphcert.alpha`), each domain for one conjunct of the
    unsafe set: only that conjunct's rows are bounded (a run-time objective of `rows` rows, the conjunct's rows
    with its last repeated), as alpha-beta-CROWN bounds one property per search, instead of every row of the
    property for every domain. The clamped bounds of z that `SplitBounds` found are given, and the split signs
    (+1 for z >= 0, -1 for z <= 0, 0 unsplit, [B, units]) bring in the split constraints with multipliers
    optimised per domain and row. Returns margin lower bounds [B, all rows] (-inf on rows of other conjuncts;
    a batch started cold is never below CROWN's with the given bounds, a warm-started one runs no CROWN start and
    its caller keeps the better of these and those it had: the parent's or CROWN's), and each domain's optimised
    slopes and multipliers
    flattened into a row of `width` float32 (the warm start of its children: `__call__`'s `warm`, NaN for the
    default start; width 0 when the graph's parameter shapes are not static)."""

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, membership: np.ndarray,
                 splits: SplitBounds, settings: AlphaSettings):
        self.alpha = AlphaCrown(network.bound_model, "box", spec="runtime", split_bounds="given", beta=True)
        self.network, self.splits, self.settings = network, splits, settings
        self.matrix, self.offset = np.asarray(matrix, dtype=np.float32), np.asarray(offset, dtype=np.float64)
        # [conjuncts, rows]: each conjunct's row indices, its last repeated (duplicates bound the same margin)
        members = [np.flatnonzero(membership[:, k]) for k in range(membership.shape[1])]
        self.rows = max(1, max((len(m) for m in members), default=1))
        self.conjunct_rows = np.stack([np.concatenate([m, np.repeat(m[-1:], self.rows - len(m))]) if len(m)
                                       else np.zeros(self.rows, int) for m in members])
        shapes = self.alpha.parameter_shapes(self.rows) or {}
        # name -> (rows, per-sample shape, first column in a domain's row)
        self.layout: dict[str, tuple[int, tuple[int, ...], int]] = {}
        column = 0
        for name, (rows, shape) in shapes.items():
            self.layout[name] = (rows, shape, column)
            column += rows * int(np.prod(shape))
        self.width = column
        self.clamped: tuple[np.ndarray, np.ndarray] | None = None   # `__call__(..., clamps=True)` fills it

    def __call__(self, lower, upper, unit_lower, unit_upper, signs, conjunct, stop, warm: np.ndarray | None = None,
                 clamps: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`conjunct` [B]: each domain's conjunct; `stop(margin_lower, None)` sees bounds of every row (-inf on
        rows of other conjuncts). With `clamps`, `self.clamped` then holds the bounds of z the graph used (the
        given ones met with IBP through the earlier layers' clamps: a split tightens later layers), flat
        [B, units] (float64 in float64 mode), the tightest over the steps."""
        from ..interface import OBJECTIVE
        lo, hi = outward_float32(lower, upper)
        rows = self.conjunct_rows[conjunct]                                     # [B, m]
        feeds = self.alpha.feeds(lower=self.network.model_shaped(lo), upper=self.network.model_shaped(hi))
        feeds[OBJECTIVE] = np.ascontiguousarray(self.matrix[rows])              # [B, m, n]
        feeds.update(self.splits.split_feeds(unit_lower, unit_upper, signs))
        settings = self.settings
        start = self._unpack(warm) if warm is not None and self.width and warm.shape[1] == self.width else None
        keep = self.width > 0
        pairs = tuple((CLAMPED_LOWER_PREFIX + name, CLAMPED_UPPER_PREFIX + name) for name in self.splits.names) \
            if clamps else ()
        low, _ = self.alpha.bounds(feeds, settings.iterations, settings.lr, settings.lr_decay,
                                   stop=lambda low, high: stop(self._every_row(low, rows), None),
                                   start=start, keep=keep, track=pairs)
        if clamps:
            tracked = self.alpha.tracked
            self.clamped = tuple(np.concatenate([tracked[pair[side]].reshape(len(lo), -1) for pair in pairs], axis=1)
                                 for side in (0, 1))
        kept = self._pack(self.alpha.kept, len(lo)) if keep else np.empty((len(lo), 0), np.float32)
        return self._every_row(low, rows), kept

    def _every_row(self, low: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Bounds [B, m] of the objective rows `rows` -> margin bounds [B, all rows] (offsets added, -inf on rows
        not bounded, the best of duplicates)."""
        found = np.full((len(rows), len(self.offset)), -np.inf)
        np.maximum.at(found, (np.arange(len(rows))[:, None], rows),
                      low.reshape(len(rows), -1).astype(np.float64) + self.offset[rows])
        return found

    def _unpack(self, warm: np.ndarray) -> dict[str, np.ndarray]:
        """Rows [B, width] -> graph inputs [rows, B, ...]."""
        found = {}
        for name, (rows, shape, column) in self.layout.items():
            part = warm[:, column:column + rows * int(np.prod(shape))].reshape(len(warm), rows, *shape)
            found[name] = np.ascontiguousarray(np.swapaxes(part, 0, 1))
        return found

    def _pack(self, parameters: dict[str, np.ndarray], batch: int) -> np.ndarray:
        packed = np.empty((batch, self.width), dtype=np.float32)
        for name, (rows, shape, column) in self.layout.items():
            columns = slice(column, column + rows * int(np.prod(shape)))
            packed[:, columns] = np.swapaxes(parameters[name], 0, 1).reshape(batch, -1)
        return packed

    def beta_columns(self, unit: np.ndarray) -> list[np.ndarray]:
        """Per multiplier input over split unit inputs, the columns [len(unit), rows] of each given unit's
        multipliers in a domain's row (units of another layer than the input's point at a dummy column -1,
        to be masked by the caller via `unit_in`)."""
        columns = []
        for name, unit_name in self.alpha.betas.items():
            if name not in self.layout:
                continue
            rows, shape, column = self.layout[name]
            k = self.splits.names.index(unit_name)
            start, size = self.splits.offsets[k], self.splits.offsets[k + 1] - self.splits.offsets[k]
            inside = (unit >= start) & (unit < start + size)
            where = column + np.arange(rows)[None, :] * size + (unit - start)[:, None]
            columns.append(np.where(inside[:, None], where, -1))
        return columns


class AlphaUnitBounds:
    """alpha-CROWN bounds of every split unit's input z over input boxes (the property's boxes that branch and
    bound starts from): the slopes of every backward pass, intermediate ones included, follow the gradient of the
    margins' bounds, and each z keeps its tightest bounds over the steps (`AlphaCrown.bounds`' `track`). Children
    bounded on their parent's unit bounds inherit these, so they pay for themselves in every domain. Returns
    margin lower bounds [B, rows] and bounds [B, units] of z (flattened as in `splits`)."""

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, splits: SplitBounds,
                 settings: AlphaSettings, double: bool = False, unstable: np.ndarray | None = None):
        """`unstable` [units] (None: every unit): the ReLUs whose input bounds are computed and optimised; the
        other units' bounds are those fed with each call (`unit_lower`, `unit_upper`), which must then keep
        them stable."""
        rows = splits.relu_rows(unstable) if unstable is not None else None
        self.alpha = AlphaCrown(network.bound_model, "box", spec=np.asarray(matrix, dtype=np.float32), spec_offset=offset,
                                split_bounds="clamp", intermediate_rows=rows)
        if double:
            self.alpha.in_double()
        self.network, self.splits, self.settings = network, splits, settings
        self.pairs = tuple((CLAMPED_LOWER_PREFIX + name, CLAMPED_UPPER_PREFIX + name) for name in splits.names)

    def __call__(self, lower, upper, stop, unit_lower=None, unit_upper=None,
                 deadline: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`unit_lower`, `unit_upper` [B, units]: sound bounds of z that CROWN's are clamped by (None: none);
        `stop` ends the steps (`deadline` is for `layerwise.LayerwiseUnitBounds`, which shares this call)."""
        lo, hi = outward_float32(lower, upper)
        feeds = self.alpha.feeds(lower=self.network.model_shaped(lo), upper=self.network.model_shaped(hi))
        unbounded = np.full((len(lo), self.splits.units), np.inf, dtype=np.float32)
        feeds.update(self.splits.split_feeds(-unbounded if unit_lower is None else unit_lower,
                                             unbounded if unit_upper is None else unit_upper))
        settings = self.settings
        low, _ = self.alpha.bounds(feeds, settings.iterations, settings.lr, settings.lr_decay, stop=stop,
                                   track=self.pairs)
        tracked = self.alpha.tracked
        return (low.reshape(len(lo), -1),
                np.concatenate([tracked[a].reshape(len(lo), -1) for a, _ in self.pairs], axis=1),
                np.concatenate([tracked[b].reshape(len(lo), -1) for _, b in self.pairs], axis=1))


def spec_bounds(network: Network, matrix: np.ndarray, offset: np.ndarray, method: str, membership: np.ndarray,
                deadline: float, mixtures: list[np.ndarray] = (), alpha: AlphaSettings = VERIFY_ALPHA,
                budget: Budget | None = None, coefficients: bool = False):
    """The bound function of a method name: a bound graph, or the method's verify ladder (graphcert.methods:
    its stages, the last `verify_root_stages` of them run on the root boxes only; `auto` branches with CROWN,
    which decides far more boxes per second than alpha-CROWN). `coefficients`: a lone CROWN graph also returns
    the margin lower bounds' input coefficients (`SpecBounds`).

    A stage whose graph may hold more than the free `budget` for one box (`graph_bytes_per_sample`) is left
    out, and alpha-CROWN with it (it runs the same graph through torch, keeping more); IBP, the smallest,
    stands in when nothing else is left: weaker bounds, but an answer instead of a process the kernel kills."""
    record = methods.get(method)
    free = budget.free() if budget is not None else None

    def fits(stage: SpecBounds) -> bool:
        if free is None or stage.bytes_per_sample <= free:
            return True
        log.info("%s bound graph may need %s for one box, over the %s free: left out", stage.method,
                 size(stage.bytes_per_sample), size(free))
        return False

    names = [method] if record.combines == "graph" else list(record.verify_stages)
    root_stages = 0 if record.combines == "graph" else record.verify_root_stages
    built: dict[str, SpecBounds] = {}   # alpha-CROWN's size is judged by the CROWN graph it optimises
    for name in names:
        graph_method = "crown" if name == "alpha-crown" else name
        if graph_method not in built:
            built[graph_method] = SpecBounds(network, matrix, offset, graph_method,
                                             coefficients=coefficients and record.combines == "graph")
    graphs = {name: built["crown" if name == "alpha-crown" else name] for name in names}
    kept = [name for name in names if fits(graphs[name])]
    if not kept:
        return graphs.get("ibp") or SpecBounds(network, matrix, offset, "ibp")
    if record.combines == "graph":
        return graphs[method]
    root_stages -= sum(1 for name in names[len(names) - root_stages:] if name not in kept)
    stages = [AlphaSpecBounds(network, matrix, offset, membership, deadline, mixtures, alpha)
              if name == "alpha-crown" else graphs[name] for name in kept]
    ladder = LadderBounds(stages, membership, max(0, root_stages))
    ladder.bytes_per_sample = max(graphs[name].bytes_per_sample for name in kept)
    return ladder


