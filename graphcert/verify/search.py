"""What every search shares: the property's rows, the deadline, the attack, the counterexample, the frontier.

`Search` holds the state both branch-and-bound searches (`input_bab`, `relu_bab`) need and ends them with
`finish(status)`; `Arrays` is a dataclass of parallel arrays (one row per box or domain) and `Frontier` keeps
the undecided rows, popped by smallest `score`; `CallSizer` sizes bound calls to the clock.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..vnnlib import Property
from .network import Network
from .resources import Budget, MemorySizer, PeakSampler, free_cores, freeze_heap, log, size

# Bound graphs compute in float32 without outward rounding: demand a little more than > 0 to refute.
ABSOLUTE_SLACK, RELATIVE_SLACK = 1e-6, 1e-5
# Bound calls are sized to take about this long, so the clock is checked often enough to honour timeouts.
CALL_SECONDS = 0.2
MAX_CHUNK = 16384
# The frontier of branch and bound may hold this share of the memory budget (bound calls need the rest).
FRONTIER_SHARE = 0.25
# Attacks during branch and bound take at most this share of the time, on this many boxes at a time.
ATTACK_SHARE = 0.2
ATTACK_BOXES = 64


# Bound the float32 model itself: its rounding as bounded leaves inside the relaxation (graphcert.rounding_leaves),
# so the slack keeps only the bound graph's own rounding. Off: the model's error is a slack beside the bounds.
ROUNDING_LEAVES = True


_UNBUILT = object()


def _with_rounding_leaves(network: Network):
    """The model with its rounding leaves, for a model whose error analysis (graphcert.rounding, whose rules the
    leaves use) took every node; the model itself when switched off or refused."""
    if not ROUNDING_LEAVES:
        return network.model
    from ..errors import UnsupportedOpError
    from ..rounding_leaves import with_rounding_leaves
    try:
        return with_rounding_leaves(network.model)
    except UnsupportedOpError as refusal:
        log.info("the model's rounding stays beside the bounds (%s)", refusal)
        return network.model


def unsafe_objective(margins: np.ndarray, membership: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """graphcert.attack.unsafe_objective in numpy (no torch for searches the bounds decide): margins [B, r],
    membership [r, K], alive [B, K] -> [B], the smallest over live conjuncts of the conjunct's largest row
    margin (+inf where none is alive, -inf for a live conjunct without rows)."""
    rows, conjuncts = np.nonzero(membership)
    per_conjunct = np.full((membership.shape[1], len(margins)), -np.inf)
    if len(rows):
        np.maximum.at(per_conjunct, conjuncts, margins[:, rows].T)
    return np.where(alive, per_conjunct.T, np.inf).min(axis=1, initial=np.inf)


class Float32Slack:
    """How much each row's margin lower bound must exceed 0 on a box for the property to hold there for the
    model as it runs in float32 (graphcert.rounding). Each box gets its own: IBP magnitudes over small boxes are
    far below those over the property's box. A model with ops the rounding analysis has no rule for gets
    +inf: bounds then never prove the property.

    When the bound graphs bound the float32 model itself (`network.bound_model` has rounding leaves), the
    slack is only their own rounding (`inside`)."""

    def __init__(self, network: Network, matrix: np.ndarray, budget: Budget | None = None):
        self.network, self.matrix, self.budget = network, matrix, budget
        # Built on first use (False: not available for this model): CROWN's unit-input bounds of boxes, and
        # the analysis that takes them (`of_boxes`, `of_domains`).
        self._splits = self._double = None
        self._box_double = None   # the float64 bound graphs' own rounding over boxes (`in_double_only`)
        self._domains: dict = {}
        self._slack = _UNBUILT
        # Bound graphs are built from network.bound_model, chosen here (the leaves take the same rules as the
        # analysis: a model they take, it takes).
        network.bound_model = _with_rounding_leaves(network)
        self.inside = network.bound_model is not network.model

    @property
    def slack(self):
        """The model's float32 error analysis (a RoundingSlack; None for a model with an op it has no rule for),
        built on first use: boxes bounded in float64 from the start (`run_in_double`) never need it."""
        if self._slack is _UNBUILT:
            from ..errors import UnsupportedOpError
            from ..rounding_slack import RoundingSlack
            try:
                self._slack = RoundingSlack(self.network.model)
            except UnsupportedOpError as refusal:
                log.info("no float32 rounding analysis (%s): bounds cannot prove the property", refusal)
                self._slack = None
        return self._slack

    def __call__(self, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """[B, rows] for boxes lower, upper [B, n]."""
        if self.slack is None:
            return np.full((len(lower), len(self.matrix)), np.inf)
        network = self.network
        if network.batched:
            return self.slack.of_rows(network.model_shaped(lower.astype(np.float32)),
                                      network.model_shaped(upper.astype(np.float32)), self.matrix[None],
                                      model_error=not self.inside)
        return np.concatenate([self.slack.of_rows(lo.reshape(network.sample_shape).astype(np.float32),
                                                  hi.reshape(network.sample_shape).astype(np.float32),
                                                  self.matrix[None], model_error=not self.inside)
                               for lo, hi in zip(lower, upper)])

    def in_double_only(self, lower: np.ndarray, upper: np.ndarray) -> np.ndarray | None:
        """[B, rows] for boxes whose bounds (and those of every domain inside them) are computed in float64 on
        the model with its rounding leaves: only the float64 bound graph's own rounding, which no domain's unit
        bounds need shrink (None when the bounds do not bound the float32 model itself)."""
        if not self.inside or not self.network.batched or self._double_slack() is None:
            return None
        network = self.network
        return self._box_double.of_rows(network.model_shaped(lower.astype(np.float32)),
                                             network.model_shaped(upper.astype(np.float32)), self.matrix[None],
                                             model_error=False)

    def _double_slack(self):
        """The analysis of float64 bound graphs' own rounding (`in_double_only`); None where it refuses."""
        if self._box_double is None:
            from ..errors import UnsupportedOpError
            from ..precision import FLOAT64
            from ..rounding_slack import RoundingSlack
            try:
                self._box_double = RoundingSlack(self.network.model, bound_arithmetic=FLOAT64)
            except UnsupportedOpError as refusal:
                log.info("no float64 rounding analysis (%s)", refusal)
                self._box_double = False
        return self._box_double or None

    def run_in_double(self, bounds) -> bool:
        """Run a bound graph (a `SpecBounds`) in float64 from now on, where its bounds bound the float32 model
        itself and onnxruntime runs it in double; whether it now does. Its boxes then need only `in_double_only`
        (the float64 graph's own rounding) and no second look: on ACAS Xu a call costs twice the float32 one,
        but about 40 % of the boxes went through a second, float64, graph anyway."""
        if not self.inside or not self.network.batched or not hasattr(bounds, "proto") or self._double_slack() is None:
            return False
        from ..errors import GraphcertError
        from ..precision import onnxruntime_runs_double
        try:
            if not onnxruntime_runs_double(bounds.proto):
                return False
            bounds.in_double()
        except GraphcertError as refusal:
            log.info("the bound graph stays in float32 (%s)", refusal)
            return False
        return True

    def of_boxes(self, lower: np.ndarray, upper: np.ndarray, offset: np.ndarray, plain: np.ndarray | None = None
                 ) -> np.ndarray:
        """[B, rows] for boxes lower, upper [B, n], no larger than `__call__`'s: the magnitudes also come from
        CROWN's bounds of every unit's input over each box (`of_domains`), at the cost of a CROWN pass per layer;
        worth it for boxes whose margins beat 0 but not the box-only slack (`plain`, when known)."""
        plain = self(lower, upper) if plain is None else plain
        if self.slack is None or not self.network.batched:
            return plain
        if self.inside:
            if self._double is None:
                self._double = self._build_double(offset)
            if self._double is not False:   # what is left is the graph's own rounding: `in_double` looks next
                return plain
        if self._splits is None:
            from ..errors import GraphcertError
            from .bounds import SplitBounds
            try:   # a model CROWN cannot bound keeps IBP's magnitudes
                self._splits = SplitBounds(self.network, self.matrix, offset, "clamp")
            except GraphcertError as refusal:
                log.info("float32 slack of boxes from IBP only (%s)", refusal)
                self._splits = False
            if self._splits is not False and self._splits.units == 0:
                self._splits = False
        if self._splits is False:
            return plain
        per_box = max(1, self._splits.bytes_per_sample)
        free = self.budget.free() if self.budget is not None else None
        if free is not None and per_box > free:
            log.info("float32 slack of boxes from IBP only (the CROWN graph may need %s per box, %s free)",
                     size(per_box), size(free))
            return plain
        chunk = len(lower) if free is None else max(1, int(0.5 * free / per_box))
        unbounded = np.full((len(lower), self._splits.units), np.inf, dtype=np.float32)
        found = [self._splits(lower[k:k + chunk], upper[k:k + chunk], -unbounded[k:k + chunk], unbounded[k:k + chunk])
                 for k in range(0, len(lower), chunk)]
        clamped_lower = np.concatenate([part[1] for part in found])
        clamped_upper = np.concatenate([part[2] for part in found])
        # Crossings within rounding are repaired outward (the interval only grows).
        return np.minimum(plain, self.of_domains(self._splits, lower, upper, np.minimum(clamped_lower, clamped_upper),
                                                 np.maximum(clamped_lower, clamped_upper)))

    def of_domains(self, splits, lower: np.ndarray, upper: np.ndarray, unit_lower: np.ndarray,
                   unit_upper: np.ndarray, in_double: bool = False) -> np.ndarray:
        """[B, rows] for split domains: boxes lower, upper [B, n] with bounds [B, units] of the input of every
        unit of `splits` (a verify.bounds.SplitBounds) that hold on the domain; the magnitudes then come from
        the tighter of IBP's and these bounds (graphcert.rounding_given), so the slack shrinks as domains split.
        `in_double`: the margins and unit bounds were computed in float64 (`domains_in_double`)."""
        if self.slack is None or not self.network.batched:
            return self(lower, upper)
        from ..errors import GraphcertError
        from ..precision import FLOAT64
        from ..rounding_slack import RoundingSlack
        if in_double not in self._domains:
            try:   # KeyError: a unit input the analysis does not reach (it does not depend on the input)
                self._domains[in_double] = RoundingSlack(self.network.model, given=splits.names,
                                                         **({"bound_arithmetic": FLOAT64} if in_double else {}))
            except (GraphcertError, KeyError) as refusal:
                log.info("float32 slack of split domains from the box only (%s)", refusal)
                self._domains[in_double] = False
        slack = self._domains[in_double]
        if slack is False:
            return self(lower, upper)
        given = splits.per_layer(unit_lower, unit_upper)
        network = self.network
        return slack.of_rows(network.model_shaped(lower.astype(np.float32)),
                             network.model_shaped(upper.astype(np.float32)), self.matrix[None], given=given,
                             model_error=not self.inside)

    def domains_in_double(self, splits) -> bool:
        """Whether split domains of this model can be bounded in float64: on deep nets the own rounding of float32
        bound graphs (bounded through |W| products) dwarfs any margin (eran's 9x200 ReLU net: about 1e5), that
        of float64 graphs does not. The rounding analysis the domains' slack then takes must exist: with rounding
        leaves the float64 graphs' own (`in_double_only`; the float32 one, 0.2 s to build, is then not built),
        else the float32 model's (`of_domains`)."""
        if not self.network.batched or (self._double_slack() if self.inside else self.slack) is None:
            return False
        from ..precision import onnxruntime_runs_double
        return onnxruntime_runs_double(splits.proto)


    def in_double(self, lower: np.ndarray, upper: np.ndarray, offset: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray] | None:
        """(margin lower bounds, slack), both [B, rows], for boxes the float32 slack alone keeps undecided: the
        margins of a CROWN graph run in float64 (graphcert.precision), whose own rounding is then analysed in
        float64 (with the model's error beside the bounds, from that graph's bounds of the unit inputs). None
        when onnxruntime cannot run the graph in float64."""
        if self.slack is None or not self.network.batched:
            return None
        if self._double is None:
            self._double = self._build_double(offset)
        if self._double is False:
            return None
        splits, slack = self._double
        if not hasattr(splits, "units"):   # no unit to bound: the plain CROWN graph's margins
            margin_lower, given = splits(lower, upper)[0], {}
        else:
            unbounded = np.full((len(lower), splits.units), np.inf, dtype=np.float32)
            margin_lower, unit_lower, unit_upper = splits(lower, upper, -unbounded, unbounded)
            given = splits.per_layer(np.minimum(unit_lower, unit_upper), np.maximum(unit_lower, unit_upper))
        # The slack only where a margin is positive: elsewhere it cannot refute anything.
        found = np.full(margin_lower.shape, np.inf)
        useful = np.flatnonzero((margin_lower > 0).any(axis=1))
        if len(useful):
            network = self.network
            found[useful] = slack.of_rows(network.model_shaped(lower[useful].astype(np.float32)),
                                          network.model_shaped(upper[useful].astype(np.float32)), self.matrix[None],
                                          given={name: (low[useful], high[useful]) for name, (low, high) in given.items()},
                                          model_error=not self.inside)
        return margin_lower, found

    def _build_double(self, offset):
        """Only where onnxruntime runs the graph in float64 (the torch executor could, but far slower than the
        search can wait for)."""
        from ..errors import GraphcertError
        from ..precision import FLOAT64, onnxruntime_runs_double
        from ..rounding_slack import RoundingSlack
        from .bounds import SpecBounds, SplitBounds
        try:
            # The model's error inside the bounds needs no unit bounds for magnitudes: the plain CROWN graph.
            splits = SplitBounds(self.network, self.matrix, offset, "clamp") if not self.inside else None
            if splits is None or splits.units == 0:
                splits = SpecBounds(self.network, self.matrix, offset, "crown")
            if (self.budget is not None and splits.bytes_per_sample > self.budget.free()) \
                    or not onnxruntime_runs_double(splits.proto):
                return False
            splits.in_double()
            return splits, RoundingSlack(self.network.model, given=getattr(splits, "names", ()),
                                         bound_arithmetic=FLOAT64)
        except (GraphcertError, KeyError) as refusal:
            log.info("no float64 bounds for the float32 slack (%s)", refusal)
            return False


class Search:
    """The property, network and deadline of one verify call, with its attack and what it has found so far.

    The rows of the unsafe set: `matrix`/`offset` (margins c·y - d; a conjunct is refuted on a box once one
    of its rows has a positive lower bound), `membership[row, conjunct]`, and `mixtures` (averaged rows that
    alpha-CROWN may learn, `Property.rows_with_mixtures`).
    """

    def __init__(self, prop: Property, network: Network, deadline: float, budget: Budget | None = None,
                 rounding: str = "float32", threads: int | None = None):
        self.prop, self.network, self.deadline = prop, network, deadline
        self.threads = threads   # torch's intra-op threads while the search runs (None: `free_cores` then)
        self.budget = budget or Budget()
        self.reason = ""
        self.matrix, self.offset, rows, self.mixtures = prop.rows_with_mixtures()
        self.membership = np.zeros((len(self.offset), len(prop.unsafe)), dtype=bool)
        for k, indices in enumerate(rows):
            self.membership[indices, k] = True
        self.has_rows = len(self.offset) > 0
        self._attack = None   # made on first use (`attack`): torch loads then
        self.torch_threads: int | None = None   # torch's thread count before `use_torch` set one
        # Attack rows (boxes x samples) through the torch graph, with activations and gradients.
        self.attack_memory = MemorySizer(self.budget, floor=16 * (network.n_inputs + network.n_outputs),
                                         share=0.25, first=1 << 16)
        self.counterexample: tuple[np.ndarray, np.ndarray] | None = None
        network.bound_model = network.model   # (float32: Float32Slack may choose the model with rounding leaves)
        self.rounding_slack = Float32Slack(network, self.matrix, self.budget) if rounding == "float32" else \
            (lambda lower, upper: np.zeros((len(lower), len(self.matrix))))
        self.boxes_bounded = 0
        self.attack_seconds = 0.0
        self.started = time.monotonic()

    @property
    def attack(self):
        if self._attack is None:
            self.use_torch()
            from ..attack import Attack
            network = self.network
            self._attack = Attack(network.differentiable, self.matrix, self.offset, self.membership,
                                  memory_bytes=max(64 << 20, self.budget.total // 4), model=network.model)
        return self._attack

    def use_torch(self):
        """torch, for attacks and alpha/beta-CROWN, with `threads` intra-op threads (by default the cores no
        other task is running on, `free_cores`) until `release_torch`. Loaded only when needed: 1.5-1.8 s of a
        `verify` process that the bounds decide at the root."""
        import torch
        if self.torch_threads is None:
            self.torch_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads or free_cores())
            freeze_heap()   # torch's own objects: kept out of the search's collections (`resources`)
        return torch

    def release_torch(self) -> None:
        if self.torch_threads is not None:
            import torch
            torch.set_num_threads(self.torch_threads)
            self.torch_threads = None

    def start_clock(self) -> None:
        """Attacks get their share of the time from here on (bound graphs built before do not count)."""
        self.started = time.monotonic()

    def past_deadline(self) -> bool:
        return time.monotonic() > self.deadline

    def finish(self, status: str, reason: str = "") -> tuple[str, tuple | None, int]:
        """(status, counterexample, boxes bounded): a confirmed counterexample always wins. `reason` says why
        the search ended undecided (kept in `self.reason` and logged)."""
        if self.counterexample is not None:
            return "violated", self.counterexample, self.boxes_bounded
        if reason:
            self.reason = reason
            log.info("%s: %s", status, reason)
        return status, None, self.boxes_bounded

    def timeout(self, frontier: "Frontier | None" = None, kind: str = "input boxes",
                score: str = "the unsafe objective at the closest box center") -> tuple[str, tuple | None, int]:
        """finish("timeout"), logging the best partial result: how much is left undecided and how close."""
        if frontier is None or not len(frontier):
            return self.finish("timeout", f"the deadline passed after {self.boxes_bounded} bound evaluations")
        return self.finish("timeout", f"{len(frontier)} {kind} left undecided after {self.boxes_bounded} bound "
                                      f"evaluations; {score} is {frontier.items.score.min():.4g}")

    def frontier_too_large(self, domains: int, bytes_each: int) -> str:
        """Why a frontier of `domains` rows of `bytes_each` bytes does not fit its share of the budget ("" when
        it fits)."""
        allowed = FRONTIER_SHARE * self.budget.total
        if domains * bytes_each <= allowed:
            return ""
        return (f"the frontier of {domains} undecided domains ({size(domains * bytes_each)}) would pass its "
                f"share of the memory budget ({size(int(allowed))} of {self.budget})")

    def attack_due(self, share: float = ATTACK_SHARE) -> bool:
        """Whether the attacks so far took at most `share` of the search's time."""
        return self.attack_seconds <= share * (time.monotonic() - self.started)

    def attack_boxes(self, lower, upper, alive, budget: float, **settings) -> bool:
        """Attack the boxes for at most `budget` of the remaining time; True when a counterexample is confirmed."""
        began = time.monotonic()
        seconds = budget * max(0.0, self.deadline - began)
        # Many boxes (specs with thousands of input boxes) are attacked in chunks sized to the memory budget,
        # each with its share of the time; the attack's memory grows with boxes x samples.
        sizer = self.attack_memory
        start = 0
        while start < len(lower) and self.counterexample is None and time.monotonic() < self.deadline:
            part = slice(start, start + max(1, min(sizer.limit() // max(1, settings.get("samples", 64)),
                                                      len(lower))))
            share = (part.stop - start) / len(lower) if part.stop < len(lower) else 1.0
            deadline = min(self.deadline, time.monotonic() + share * max(0.0, began + seconds - time.monotonic()))
            with PeakSampler() as sampler:
                points, objective = self.attack.run(lower[part], upper[part], alive[part], deadline, **settings)
            sizer.record((part.stop - start) * settings.get("samples", 64), sampler.growth)
            for index in np.argsort(objective)[:8]:
                if objective[index] > 0 or self.confirm(points[index]):
                    break
            start = part.stop
        self.attack_seconds += time.monotonic() - began
        return self.counterexample is not None

    def confirm(self, x: np.ndarray) -> bool:
        found = self.network.confirm(self.prop, x)
        if found is not None and self.counterexample is None:
            self.counterexample = found
        return self.counterexample is not None

    def conjunct_without_rows(self, lower, upper, alive) -> bool:
        """A conjunct with no output rows is met by every output: any input of its box is a counterexample."""
        empty = ~self.membership.any(axis=0)
        for box in np.flatnonzero((alive & empty).any(axis=1)):
            self.confirm(0.5 * (lower[box] + upper[box]))
        return self.counterexample is not None


class CallSizer:
    """Slices of a batch sized so that one bound call takes about CALL_SECONDS (the clock is checked often
    enough to honour timeouts, and calls stay large enough to amortise their overhead) and, with a
    `MemorySizer`, fits the memory budget (the peak resident memory of each call is measured)."""

    def __init__(self, size: int = 8, seconds: float = CALL_SECONDS, memory: MemorySizer | None = None):
        self.size, self.seconds, self.memory = size, seconds, memory

    def slices(self, total: int, deadline: float):
        """Consecutive slices over range(total); a None (and no more) once the deadline has passed. Each full
        slice's call time, measured until the next one is asked for, rescales the size."""
        start = 0
        while start < total:
            if time.monotonic() > deadline:
                yield None
                return
            size = self.size if self.memory is None else max(1, min(self.size, self.memory.limit()))
            # A call that would end past the deadline is cut to what the time left allows at the last rate (a
            # stage that does not watch the clock inside its calls, such as the ReLU look-ahead, keeps it then).
            left = deadline - time.monotonic()
            if left < self.seconds:
                size = max(1, min(size, int(self.size * left / self.seconds)))
            part = slice(start, min(start + size, total))
            began = time.monotonic()
            if self.memory is None:
                yield part
            else:
                with PeakSampler() as sampler:
                    yield part
                self.memory.record(part.stop - part.start, sampler.growth)
            taken, seconds = part.stop - part.start, max(time.monotonic() - began, 1e-4)
            if taken == size:
                self.size = int(np.clip(size * self.seconds / seconds, 1, MAX_CHUNK))
            else:
                # A smaller call (the caller had fewer) may only raise the size: its fixed costs make it look
                # slower per sample than a full one. Without this a caller that asks for less than the size
                # (input branch and bound pops size / candidates parents) never lets it grow: ACAS Xu bounded
                # 6 boxes per call, 150 boxes a second.
                self.size = int(np.clip(max(self.size, taken * self.seconds / seconds), 1, MAX_CHUNK))
            start = part.stop


@dataclasses.dataclass
class Arrays:
    """Parallel arrays, one row per box or domain (subclasses name the fields)."""

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))

    def take(self, index) -> "Arrays":
        return type(self)(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    @classmethod
    def concat(cls, parts: list["Arrays"]) -> "Arrays":
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)})


class Frontier:
    """Undecided boxes or domains (`Arrays` with a `score` field), popped smallest score first."""

    def __init__(self, items: Arrays):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def push(self, items: Arrays) -> None:
        self.items = type(self.items).concat([self.items, items])

    def pop(self, count: int) -> Arrays:
        chosen = self._closest(count)
        taken = self.items.take(chosen)
        rest = np.ones(len(self), dtype=bool)
        rest[chosen] = False
        self.items = self.items.take(rest)
        return taken

    def closest(self, count: int) -> Arrays:
        return self.items.take(self._closest(count))

    def _closest(self, count: int) -> np.ndarray:
        values = self.items.score
        if count >= len(values):
            return np.arange(len(values))
        return np.argpartition(values, count)[:count]
