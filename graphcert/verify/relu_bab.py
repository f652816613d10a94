"""Branch and bound over activation units (ReLU, Sigmoid, Tanh) of the property boxes that input-box bounds left
undecided.

A domain is a property box, its live conjuncts, bounds of every unit's input z (flattened over layers in graph
order), its margin lower bounds and split signs. The property boxes get alpha-CROWN bounds of z first (every
pass's slopes optimised for the margins, `AlphaUnitBounds`), which every domain inherits; each live conjunct of
a box is then searched apart (a domain holds one conjunct, whose rows alone alpha-beta-CROWN bounds); each round
the domains with the weakest margin bounds split their chosen unit's interval [l, u] at a point p, 0 for a
ReLU (z >= 0 and z <= 0) and for an S-shaped unit whose interval holds 0 (each part is then convex or
concave, where its lines are tight), else the middle: the children get the parent's bounds with one side
set to p, which hold on them (together they cover the parent), and their lines are re-relaxed on the
narrower intervals. Every split carries a sign for beta-CROWN: +1 for the child z >= p, -1 for z <= p (p its
new lower or upper bound of z). Children are bounded in
batches on their parent's unit bounds, only the margins bounded anew (`SplitBounds` mode "given"; with
REUSE_PARENT_BOUNDS off, CROWN bounds of the later layers' z are recomputed and clamped by the parent's, mode
"clamp", except after a split in the last layer). Children these bounds leave live are
re-bounded with alpha-beta-CROWN on their clamped bounds (`BetaSplitBounds`, unless beta is None), starting
from their parent's optimised slopes and multipliers (`Domains.warm`). Which ReLU a parent splits is chosen by
filtered smart branching (`LOOK_AHEAD`): a few candidates' children are bounded cheaply first. A child
keeps the better of its own and its parent's margin bounds (its inputs are a subset of the parent's; a mixture
row's root bound may be alpha-CROWN's for its learned weights, another average of the same conjunct's rows,
which refutes the conjunct just as well); a child whose clamped bounds cross is empty and refuted. A live
domain without a unit left to split (every ReLU stable, every other unit's interval at the split width
floor or its relaxation gap negligible) cannot be split further: the answer is then unknown.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import methods
from ..alpha import AlphaSettings, ProofWatch
from ..alpha_settings import BRANCH_BETA  # noqa: F401  (re-exported)
from ..passes.crown import SPLIT_LOWER_PREFIX, SPLIT_UPPER_PREFIX
from ..precision import outward
from .bounds import AlphaUnitBounds, BetaSplitBounds, SplitBounds
from .layerwise import LayerwiseUnitBounds
from .resources import MemorySizer, log, size
from .s_shaped import CURVES, Hopeless, RootPlateau, chord_gap, split_point
from .search import ABSOLUTE_SLACK, RELATIVE_SLACK, Arrays, CallSizer, Frontier, Search, unsafe_objective

# Methods whose search may split ReLUs (the domains are bounded by CROWN with clamps, after the method's own
# bounds on the property's boxes).
# ReLU domains are re-bounded with alpha-beta-CROWN (None: CROWN with clamps only), in calls of about this long
# (each of many optimisation steps; the steps check the deadline).
BETA_CALL_SECONDS = 1.0
WEAKEST = "the weakest domain's margin lower bound (> 0 refutes)"
# Children start alpha-beta-CROWN from their parent's optimised parameters (False: from CROWN's slopes).
WARM_START = True
# Splits of Sigmoid/Tanh units off 0 carry a sign too, so that beta-CROWN's multipliers bring in z >= p and
# z <= p (False: only splits at 0 do, as before).
BETA_OFF_ZERO = True
# Filtered smart branching: for each parent whose first choice is a ReLU, this many candidate ReLUs (that
# choice and the largest first-order gains, `_split_gains`) have both children bounded on the parent's unit
# bounds (the "given" split graph, one backward pass); the candidate whose weaker child is best is split.
# Below 2: the first choice alone.
LOOK_AHEAD = 4
# Look-ahead calls of about this long: most of a call's first-order gains (`_split_gains`, a forward and
# backward pass through torch) is per-op overhead. eran relu 9x200 idx 186, 2 threads: 2.6 ms a parent in
# 0.2 s calls, 1.3 ms in 1 s calls; mnistfc 256x4 prop_0_0.03 1.3 -> 0.5 ms.
LOOK_CALL_SECONDS = 1.0
# True: children are bounded on their parent's unit bounds (the split unit's set to the split point), one
# backward pass for the margins, as beta-CROWN does. False: CROWN recomputes every later layer's unit bounds per
# child, clamped by the parent's (L passes on L layers). Measured with root alpha bounds and one conjunct per
# domain (in-process, 60 s, real arithmetic, load 5-6): reusing proves eran relu idx 186 in 30 s, mnistfc
# 256x2 prop_3_0.03 in 41 s and 256x4 prop_0_0.03 in 41 s; recomputing leaves the first two at -0.10 and -0.07
# (load 8-9) and proves the third in 39 s.
REUSE_PARENT_BOUNDS = True
# The property's boxes get alpha-CROWN bounds of every unit's input z (`AlphaUnitBounds`, at most this many
# steps) before the first split: children inherit them. 0: CROWN's.
ROOT_ALPHA_STEPS = 30
# On ReLU-only nets, at most this many steps at this learning rate instead (S-shaped nets keep the settings'
# default, 0.1: eran's sigmoid idx 1211 held in 7.1 s at 0.2 against 5.8 s, and timed out at 0.4). Same 60 s, in-process, 2 threads (1 thread), boxes bounded and seconds, 30 steps at 0.1
# against 20 at 0.2: eran relu 9x200 idx 186 21,335 / 28.1 s against 21,135 / 29.4 s (16,475 / 30.2 against
# 16,655 / 27.1), idx 6998 6.9 -> 7.2 s (10.0 -> 7.9), mnistfc 256x4 prop_0_0.03 45,261 / 28.5 s against
# 41,661 / 25.7 s (57,241 / 39.8 against 46,691 / 35.8), 256x2 prop_3_0.03 13.6 -> 13.4 s (11.3 -> 11.1).
# At 0.4 256x4 prop_0_0.03 timed out with 30 steps, and eran's sigmoid idx 1211 at both counts.
ROOT_ALPHA_STEPS_RELU, ROOT_ALPHA_LR_RELU = 20, 0.2
# The root's alpha-CROWN bounds and optimises only the ReLUs that CROWN's bounds leave unstable on the property's
# boxes (as alpha-beta-CROWN does); the others keep CROWN's bounds, which keep them stable. False: every unit.
ROOT_ALPHA_UNSTABLE_ONLY = True
# On nets with Sigmoid/Tanh units, the root's unit bounds are found layer by layer, each layer's alpha-CROWN
# optimising its own bounds (`layerwise.LayerwiseUnitBounds`), instead of every pass's slopes optimised for the
# margins (`AlphaUnitBounds`, kept for ReLU-only nets). eran's 6x200 sigmoid net at 60 s, float32: idx 1211 and
# 7481 hold in 14-16 s (timeouts before; on 1211 the margins' alpha-CROWN leaves -25 to -46). Its 9x200 ReLU net, idx 186: root margins -0.85
# layer by layer, -0.80 for the margins' slopes (holds in 50 s), -0.85 with both in turn (times out): a ReLU
# split removes a relaxation, and the margins' own slopes weigh more there.
ROOT_LAYER_BY_LAYER_S_SHAPED = True
# Layer by layer comes after the margins' alpha-CROWN (`AlphaUnitBounds`, at most ROOT_ALPHA_STEPS steps), which
# proves many properties sooner (eran's sigmoid net, idx 3334 and 7167: in 4-5 steps, 3.3 s, against 8 s layer
# by layer) and stops once its shrinking gains will not take its weakest bound to 0 (`s_shaped.Hopeless`; idx
# 1211 starts at -134 and gains 19.5, then 6.6: layer by layer follows after 4 steps).
# On nets with Sigmoid/Tanh units the root's alpha-CROWN goes on to at most this many steps, until its weakest
# live conjunct bound gains less than ROOT_PLATEAU[1] of its distance to 0 over ROOT_PLATEAU[0] steps or the
# steps past ROOT_ALPHA_STEPS have taken ROOT_TIME_SHARE of the time left. (eran's 6x200 sigmoid net, idx 6981,
# 60 s, load 6: 30 steps -1.02 at the root, the split search ends at -0.09; 150 steps -0.71, holds in 39 s.)
ROOT_ALPHA_STEPS_S_SHAPED = 200
ROOT_PLATEAU = (10, 0.01)
ROOT_TIME_SHARE = 0.4
# The attacks during unit splitting take at most this share of its time (the first comes after the first round of
# splits). They restart on the property's boxes, which the torch-free descent and the first attack have searched
# already: eran relu idx 186 (true), in-process, 60 s: 0.2 (input splitting's share) 49.8 s, 0.05 46.3-47.5 s;
# mnistfc 256x6 prop_3_0.05, whose counterexample the first attack finds, 12.7 vs 13.3 s.
SPLIT_ATTACK_SHARE = 0.05
# In float32 mode, bound split domains in float64 where onnxruntime runs the graph in double (False: in float32,
# whose own rounding then counts against every margin through |W| products).
DOMAINS_IN_DOUBLE = True


# Domains.unit: no unit left to split; not chosen yet (alpha-beta-CROWN re-bounds the domain first).
NO_UNIT, UNCHOSEN = -1, -2


@dataclass
class Domains(Arrays):
    """Split domains, one row each."""
    root: np.ndarray          # [B] index of the property box
    alive: np.ndarray         # [B, conjuncts] not yet refuted
    unit_lower: np.ndarray    # [B, units] float32 bounds of every ReLU input z on the domain
    unit_upper: np.ndarray
    score: np.ndarray         # [B] the weakest live conjunct's best margin lower bound (split smallest first)
    unit: np.ndarray          # [B] the unit to split next, NO_UNIT when every unit is stable
    margins: np.ndarray       # [B, rows] float32 margin lower bounds
    signs: np.ndarray         # [B, units] int8 split constraints: +1 z >= unit_lower, -1 z <= unit_upper, 0 none
    warm: np.ndarray          # [B, width] float32 alpha-beta parameters to start from (NaN: the default start)


def met_clamps(clamped_lower: np.ndarray, clamped_upper: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A split graph's clamped bounds of z [B, units] -> (lower, upper, empty [B]): crossed bounds (beyond float32
    rounding) mean no input of the box meets the splits; crossings within rounding are repaired as the graph does
    for its relaxations."""
    wide_lower, wide_upper = clamped_lower.astype(np.float64), clamped_upper.astype(np.float64)
    crossing = ABSOLUTE_SLACK + RELATIVE_SLACK * (np.abs(wide_lower) + np.abs(wide_upper))
    empty = (wide_lower > wide_upper + crossing).any(axis=1)
    return np.minimum(clamped_lower, clamped_upper), np.maximum(clamped_lower, clamped_upper), empty


def attacks_as_it_goes(search: Search, method: str) -> bool:
    """Whether `split_relus` may search (and so attack the boxes as it goes) with this method on this network;
    where it then finds nothing to split, it calls its `attack_roots` first."""
    return methods.get(method).branches_on_relus and search.network.batched


def split_relus(search: Search, method: str, lower, upper, alive, margin_lower, build_seconds: float,
                beta: AlphaSettings | None, attack_roots: Callable[[], bool] = lambda: False):
    """Branch and bound over ReLU units of the undecided property boxes (lower, upper [B, n], alive, margin
    lower bounds [B, rows]); (status, counterexample, boxes bounded). `attack_roots()` attacks the boxes (True:
    a counterexample) where no search follows after all."""
    if not attacks_as_it_goes(search, method):
        return search.finish("unknown", f"bounds left the property undecided; method {method} does not split ReLUs"
                             if search.network.batched else "the model has no batch axis to bound split domains on")
    if time.monotonic() + build_seconds > search.deadline:
        attack_roots()
        return search.finish("timeout", "too little time left to build the ReLU split bound graph")
    search.use_torch()   # alpha/beta-CROWN, with the search's threads
    clamp = SplitBounds(search.network, search.matrix, search.offset, "clamp")
    if clamp.units == 0:
        attack_roots()
        return search.finish("unknown", "bounds left the property undecided and the model has no ReLU, Sigmoid "
                                        "or Tanh to split")
    if clamp.bytes_per_sample > search.budget.free():
        attack_roots()
        return search.finish("unknown", f"the split bound graph may need {size(clamp.bytes_per_sample)} for one "
                                        f"domain, over the {size(search.budget.free())} of the memory budget free")
    return ReluSplitSearch(search, clamp, lower, upper, beta).run(alive, margin_lower)


class ReluSplitSearch:
    """The search over ReLU domains of the property boxes (lower, upper), bounded by `clamp` (and beta)."""

    def __init__(self, search: Search, clamp: SplitBounds, lower, upper, beta: AlphaSettings | None):
        self.search, self.clamp = search, clamp
        self.lower, self.upper = lower, upper
        # In float32 mode, where onnxruntime runs the split graph in double, domains are bounded in float64 (see
        # Float32Slack.domains_in_double); the search's choices stay in float32.
        domains_in_double = getattr(search.rounding_slack, "domains_in_double", None)
        self.double = bool(DOMAINS_IN_DOUBLE and domains_in_double is not None and domains_in_double(clamp))
        found = None
        if self.double:
            clamp.in_double()
            log.info("split domains are bounded in float64")
            in_double_only = getattr(search.rounding_slack, "in_double_only", None)
            found = in_double_only(lower, upper) if in_double_only is not None else None
        # Sub-domains of a root box need no more slack than it. Bounds of the float32 model itself in float64 need
        # only the float64 graphs' own rounding, one slack for every domain (the float32 graphs' analysis, 0.2 s to
        # build, is then never needed).
        self.fixed_slack = found is not None
        self.root_slack = found if found is not None else search.rounding_slack(lower, upper)
        self.layer = clamp.layer
        self.splitter: SplitBounds | None = None      # mode "given", built on the first last-layer split
        self.chooser: SplitBounds | None = None       # the same graph in float32, for the look-ahead's choices
        self.scorer = None                            # the splitter's graph through torch (`_split_gains`)
        self.beta_settings = beta
        # Built once the root bounds leave a domain live (`_start_beta`): instances decided at the root skip it.
        self.beta_bounds: BetaSplitBounds | None = None
        # Columns of alpha-beta parameters each domain keeps for its children (0: none kept).
        self.warm_width = 0
        # A domain costs its input box and unit bounds in and out at least; the graphs' own memory is measured.
        floor = 16 * search.network.n_inputs + 24 * clamp.units
        estimate = clamp.bytes_per_sample
        self.domain_calls = CallSizer(memory=MemorySizer(search.budget, floor, estimate=estimate))
        self.beta_calls = CallSizer(seconds=BETA_CALL_SECONDS, memory=MemorySizer(search.budget, floor,
                                                                                   estimate=estimate))
        # Look-ahead calls take a parent's candidates' children at once.
        self.look_calls = CallSizer(seconds=LOOK_CALL_SECONDS,
                                    memory=MemorySizer(search.budget, 2 * max(LOOK_AHEAD, 1) * floor,
                                                       estimate=2 * max(LOOK_AHEAD, 1) * estimate))

    def run(self, alive, margin_lower):
        search, clamp = self.search, self.clamp
        unbounded = np.full((len(self.lower), clamp.units), np.inf, dtype=np.float32)
        unsplit = np.zeros((len(self.lower), clamp.units), dtype=np.int8)
        cold = np.full((len(self.lower), self.warm_width), np.nan, dtype=np.float32)
        unit_lower, unit_upper = -unbounded, unbounded
        if self.double:   # the boxes' own stage ran in float32: in float64 the domains start afresh
            margin_lower = np.full(margin_lower.shape, -np.inf)
        if ROOT_ALPHA_STEPS > 0:
            margin_lower, unit_lower, unit_upper = self._root_unit_bounds(alive, margin_lower, unit_lower, unit_upper)
            # Conjuncts the root's bounds refute need no domain (the same test `_live_domains` applies to them).
            boxes = np.arange(len(alive))
            alive = alive & ~self._refuted(boxes, margin_lower.astype(np.float64), unit_lower, unit_upper)
            if not alive.any():
                return search.finish("holds")
        # One search per live conjunct of each box (a domain is refuted once its one conjunct is; beta then
        # bounds only that conjunct's rows).
        root, conjunct = np.nonzero(alive)
        single = np.zeros((len(root), alive.shape[1]), dtype=bool)
        single[np.arange(len(root)), conjunct] = True
        domains = self._bound_domains(clamp, root, single, unit_lower[root], unit_upper[root], unsplit[root],
                                      margin_lower[root], cold[root])
        if domains is None:
            return search.timeout()
        if len(domains) and self.beta_settings is not None:
            self._start_beta()
            domains.warm = np.full((len(domains), self.warm_width), np.nan, dtype=np.float32)
            domains = self._tighten_with_beta(domains)
        frontier = Frontier(domains)
        while len(frontier):
            if search.counterexample is not None:
                break
            if search.past_deadline():
                return search.timeout(frontier, "split domains", WEAKEST)
            if (frontier.items.unit == NO_UNIT).any():
                return search.finish("unknown", "a live domain has no unit left to split (every ReLU stable, "
                                                "every other unit's interval too narrow to gain from a split)")
            # float32 bounds of every unit, an int8 split sign, float32 margins (and warm starts)
            each = 9 * clamp.units + 4 * margin_lower.shape[1] + 32
            if self.warm_width and search.frontier_too_large(len(frontier), each + 4 * self.warm_width):
                # Children then start from the default slopes: slower to bound, but the frontier fits.
                log.info("dropping the warm starts of %d split domains (memory budget)", len(frontier))
                self.warm_width = 0
                frontier.items.warm = frontier.items.warm[:, :0]
            too_large = search.frontier_too_large(len(frontier), each)
            if too_large:
                return search.finish("unknown", too_large)
            # As many parents as the calls that bound their children take (CROWN's, or beta's when it goes first)
            calls = self.beta_calls if self._children_straight_to_beta() else self.domain_calls
            parents = frontier.pop(max(1, calls.size // 2))
            parents.unit = self._look_ahead(parents)
            children = self._split(parents)
            if children is None:
                return search.timeout(frontier, "split domains", WEAKEST)
            for group in children:
                frontier.push(group)
            self._attack_domains_if_due(frontier)
        return search.finish("holds")

    def _start_beta(self) -> None:
        self.beta_bounds = BetaSplitBounds(self.search.network, self.search.matrix, self.search.offset,
                                           self.search.membership, self.clamp, self.beta_settings)
        if self.double:
            self.beta_bounds.alpha.in_double()
        self.warm_width = self.beta_bounds.width if WARM_START else 0

    def _root_unit_bounds(self, alive, margin_lower, unit_lower, unit_upper):
        """alpha-CROWN's margin lower bounds and unit input bounds of the property's boxes (`AlphaUnitBounds`),
        each no looser than those given; those given where the graph would not fit the memory budget, or once
        the deadline has passed."""
        search, clamp = self.search, self.clamp
        # The slopes of every pass and their gradients: a few times the CROWN graph's own memory.
        each = 4 * clamp.bytes_per_sample
        free = search.budget.free()
        if each > free or search.past_deadline():
            log.info("split units keep CROWN's bounds at the root (alpha-CROWN may need %s per box, %s free)",
                     size(each), size(free))
            return margin_lower, unit_lower, unit_upper
        # Splits of S-shaped units only narrow a relaxation (a ReLU split removes one): the root's bounds weigh
        # more there, so it keeps optimising while it gains (`RootPlateau`), within a share of the time left.
        s_shaped = not clamp.relu.all()
        steps = max(ROOT_ALPHA_STEPS, ROOT_ALPHA_STEPS_S_SHAPED) if s_shaped else ROOT_ALPHA_STEPS_RELU
        root_deadline = time.monotonic() + ROOT_TIME_SHARE * max(0.0, search.deadline - time.monotonic())
        settings = AlphaSettings(iterations=steps, lr=AlphaSettings.lr if s_shaped else ROOT_ALPHA_LR_RELU,
                                 give_up=False)
        network, matrix, offset = search.network, search.matrix, search.offset
        margin_lower, unit_lower, unit_upper = margin_lower.copy(), unit_lower.copy(), unit_upper.copy()
        chunk = max(1, int(free // each))
        unstable, fed_lower, fed_upper = None, unit_lower.copy(), unit_upper.copy()
        if ROOT_ALPHA_UNSTABLE_ONLY:
            unstable = self._crown_unit_bounds(alive, chunk, margin_lower, unit_lower, unit_upper)
            # Only the ReLUs left out are clamped to CROWN's bounds (which keep them stable): a clamp on a unit
            # whose bounds the steps optimise would match their start and, once a step's bound is the looser,
            # stop the gradient through it (eran relu 186 and mnistfc 256x4 prop_0_0.03: weaker root bounds).
            stable = clamp.relu & ~unstable
            fed_lower, fed_upper = np.where(stable, unit_lower, fed_lower), np.where(stable, unit_upper, fed_upper)
        # (bounder, whether a second one follows: its steps then stop once its bound will not reach 0)
        layer_by_layer = s_shaped and ROOT_LAYER_BY_LAYER_S_SHAPED
        stages = [(AlphaUnitBounds(network, matrix, offset, clamp, settings, double=self.double, unstable=unstable),
                   layer_by_layer)]
        if layer_by_layer:
            stages.append((LayerwiseUnitBounds(network, matrix, offset, clamp, settings, double=self.double), False))
        membership = search.membership
        for start in range(0, len(alive), chunk):
            part = slice(start, start + chunk)
            live = alive[part]
            score = lambda low: unsafe_objective(low.astype(np.float64), membership, live)  # noqa: E731
            for bounder, first_of_two in stages:
                if (score(margin_lower[part]) > 0).all():
                    break
                watch = ProofWatch(score, steps, give_up=False)
                plateau = RootPlateau(score, *ROOT_PLATEAU)
                hopeless = Hopeless(score)

                def stop(low, high):
                    if search.past_deadline() or watch(low, high):
                        return True
                    if first_of_two:
                        return hopeless(low) or len(hopeless.history) >= ROOT_ALPHA_STEPS or \
                            time.monotonic() > root_deadline
                    # Past ROOT_ALPHA_STEPS (S-shaped units only): stop at a plateau or the root's share of time.
                    return plateau(low) and len(plateau.history) >= ROOT_ALPHA_STEPS or \
                        len(plateau.history) >= ROOT_ALPHA_STEPS and time.monotonic() > root_deadline

                given_lower, given_upper = (fed_lower, fed_upper) if bounder is stages[0][0] else (unit_lower,
                                                                                                  unit_upper)
                low, found_lower, found_upper = bounder(self.lower[part], self.upper[part], stop, given_lower[part],
                                                        given_upper[part], root_deadline)
                search.boxes_bounded += len(low)
                # float64 bounds (in float64 mode) as float32, rounded outward
                low, found_lower = outward("lower", low), outward("lower", found_lower)
                found_upper = outward("upper", found_upper)
                margin_lower[part] = np.maximum(margin_lower[part], low)
                unit_lower[part] = np.maximum(unit_lower[part], found_lower)
                unit_upper[part] = np.minimum(unit_upper[part], found_upper)
                log.info("root %s: weakest live conjunct bound %.4g", type(bounder).__name__,
                         float(score(margin_lower[part]).min()))
        log.info("root unit bounds: weakest live conjunct bound %.4g, %d unstable ReLUs",
                 float(unsafe_objective(margin_lower.astype(np.float64), membership, alive).min()),
                 int(((unit_lower < 0) & (unit_upper > 0) & clamp.relu).sum()))
        return margin_lower, unit_lower, unit_upper

    def _crown_unit_bounds(self, alive, chunk: int, margin_lower, unit_lower, unit_upper) -> np.ndarray:
        """CROWN's bounds of every unit's input z on the property's boxes, met in place with those given; the
        ReLUs they leave unstable on some box with a live conjunct ([units] bool)."""
        clamp = self.clamp
        for start in range(0, len(alive), chunk):
            part = slice(start, start + chunk)
            low, found_lower, found_upper = clamp(self.lower[part], self.upper[part], unit_lower[part],
                                                  unit_upper[part])
            self.search.boxes_bounded += len(low)
            margin_lower[part] = np.maximum(margin_lower[part], outward("lower", low))
            unit_lower[part] = np.maximum(unit_lower[part], outward("lower", found_lower))
            unit_upper[part] = np.minimum(unit_upper[part], outward("upper", found_upper))
        live = alive.any(axis=1)
        return ((unit_lower[live] < 0) & (unit_upper[live] > 0)).any(axis=0) & clamp.relu

    def _split(self, parents: Domains) -> list[Domains] | None:
        """Both children of every parent (split on its chosen unit), bounded and filtered to the live ones;
        None at the deadline."""
        rows, unit = np.arange(len(parents)), parents.unit
        point = split_point(parents.unit_lower[rows, unit], parents.unit_upper[rows, unit], self.clamp.relu[unit])
        active, inactive = parents.unit_lower.copy(), parents.unit_upper.copy()   # z >= point, z <= point
        active[rows, unit] = np.maximum(active[rows, unit], point)
        inactive[rows, unit] = np.minimum(inactive[rows, unit], point)
        # The split constraints for beta-CROWN: z >= point (its new lower bound) and z <= point (its new upper
        # bound), which replace a constraint an earlier split of the unit put there (both still hold).
        signed = (point == 0) | BETA_OFF_ZERO   # elsewhere the children keep the parent's sign (still true)
        active_signs, inactive_signs = parents.signs.copy(), parents.signs.copy()
        active_signs[rows[signed], unit[signed]], inactive_signs[rows[signed], unit[signed]] = 1, -1
        # Children start from the parent's optimised alpha and beta, with beta 0 on the new split constraint.
        warm = parents.warm.copy()
        if warm.shape[1]:
            for columns in self.beta_bounds.beta_columns(unit):
                chosen = signed[:, None] & (columns >= 0)
                warm[np.nonzero(chosen)[0], columns[chosen]] = 0.0
        if self._children_straight_to_beta():
            # Children on their parent's unit bounds, warm-started: alpha-beta-CROWN's first step evaluates the
            # parent's parameters on them, at least as tight as CROWN's own bound in practice, so CROWN is not
            # run first (eran relu 9x200 idx 186: it pruned no child and took 3 of 39 s). The parent's margins
            # bound its children's until then.
            twice = lambda a: np.concatenate([a, a])  # noqa: E731 (active child, inactive child)
            children = Domains(twice(parents.root), twice(parents.alive), np.concatenate([active, parents.unit_lower]),
                               np.concatenate([parents.unit_upper, inactive]), twice(parents.score),
                               np.full(2 * len(parents), UNCHOSEN), twice(parents.margins),
                               np.concatenate([active_signs, inactive_signs]), twice(warm))
            return [self._tighten_with_beta(children, clamps=True)]
        # A split before the last layer pays off through the later layers' bounds, so those are
        # recomputed (clamped by the parent's); a split in the last layer only changes its own relaxation.
        last = self.layer[unit] == self.layer[-1]
        if REUSE_PARENT_BOUNDS:
            last = np.ones_like(last)
        if last.any():
            self._ensure_splitter()
        found = []
        for group, bounds in ((~last, self.clamp), (last, self.splitter)):
            if not group.any():
                continue
            twice = lambda a: np.concatenate([a[group], a[group]])  # noqa: E731 (active child, inactive child)
            children = self._bound_domains(bounds, twice(parents.root), twice(parents.alive),
                                           np.concatenate([active[group], parents.unit_lower[group]]),
                                           np.concatenate([parents.unit_upper[group], inactive[group]]),
                                           np.concatenate([active_signs[group], inactive_signs[group]]),
                                           twice(parents.margins), twice(warm))
            if children is None:
                return None
            found.append(children)
        return found

    def _children_straight_to_beta(self) -> bool:
        return bool(REUSE_PARENT_BOUNDS and self.beta_bounds is not None and self.warm_width)

    def _bound_domains(self, bounds: SplitBounds, root, alive, unit_lower, unit_upper, signs,
                       parent_lower, warm) -> Domains | None:
        """The live domains among those given; None at the deadline."""
        search = self.search
        found = []
        for chunk in self.domain_calls.slices(len(root), search.deadline):
            if chunk is None:
                return None
            margin_lower, clamped_lower, clamped_upper = bounds(self.lower[root[chunk]], self.upper[root[chunk]],
                                                                unit_lower[chunk], unit_upper[chunk])
            search.boxes_bounded += len(margin_lower)
            met_lower, met_upper, empty = met_clamps(clamped_lower, clamped_upper)
            found.append(self._live_domains(root[chunk], alive[chunk] & ~empty[:, None], met_lower, met_upper,
                                            signs[chunk],
                                            np.maximum(margin_lower.astype(np.float64), parent_lower[chunk]),
                                            warm[chunk], choose=self.beta_bounds is None))
        domains = Domains.concat(found)
        if self.beta_bounds is None or not len(domains):
            return domains
        return self._tighten_with_beta(domains)

    def _live_domains(self, root, alive, unit_lower, unit_upper, signs, margin_lower, warm,
                      choose: bool = True) -> Domains:
        """The domains with a live conjunct left after refuting by margin_lower, with the unit each splits next
        (without `choose`, or past the deadline: UNCHOSEN, for domains alpha-beta-CROWN re-bounds first, which
        chooses then)."""
        membership = self.search.membership
        live = alive & ~self._refuted(root, margin_lower, unit_lower, unit_upper)
        score = unsafe_objective(margin_lower, membership, live)
        keep = live.any(axis=1)
        # Past the deadline the search ends in a timeout before any of these is split: no choice (the gains'
        # backward pass through torch would be work after the deadline).
        choose = choose and not self.search.past_deadline()
        unit = self._branching_unit(root[keep], live[keep], unit_lower[keep], unit_upper[keep]) if choose else \
            np.full(int(keep.sum()), UNCHOSEN)
        return Domains(root[keep], live[keep], unit_lower[keep], unit_upper[keep], score[keep], unit,
                       margin_lower[keep].astype(np.float32), signs[keep], warm[keep])

    def _refuted(self, root, margin_lower, unit_lower, unit_upper) -> np.ndarray:
        """[domains, conjuncts] bool: conjuncts whose margin lower bounds (float64) clear float32 rounding."""
        base = ABSOLUTE_SLACK + RELATIVE_SLACK * np.abs(margin_lower)
        slack = base + self._rounding_slack(root, unit_lower, unit_upper)
        return ((margin_lower > slack).astype(np.int32) @ self.search.membership) > 0

    def _rounding_slack(self, root, unit_lower, unit_upper) -> np.ndarray:
        """Float32 slack of each domain: its root box's, or smaller from the domain's own unit bounds."""
        slack = self.root_slack[root]
        of_domains = getattr(self.search.rounding_slack, "of_domains", None)
        if of_domains is None or not len(root) or self.fixed_slack:
            return slack
        own = of_domains(self.clamp, self.lower[root], self.upper[root], unit_lower, unit_upper, in_double=self.double)
        return np.minimum(slack, own)

    def _tighten_with_beta(self, domains: Domains, clamps: bool = False) -> Domains:
        """Re-bound the live domains with alpha and beta multipliers (`BetaSplitBounds`), in chunks sized by
        their own CallSizer; at the deadline the domains not reached keep the bounds they came with (their CROWN
        bounds, or their parent's for children sent straight here: sound either way). With
        `clamps` (children of a split not bounded before), their unit bounds become those the beta graph met
        with IBP (later layers tightened by the split; a crossing refutes the domain)."""
        search, settings = self.search, self.beta_settings
        membership = search.membership
        found, done = [], 0
        for chunk in self.beta_calls.slices(len(domains), search.deadline):
            if chunk is None:
                break
            part = domains.take(chunk)
            live = part.alive
            watch = ProofWatch(lambda low: unsafe_objective(low.astype(np.float64), membership, live),
                               settings.iterations, settings.give_up)
            tighter, optimised = self.beta_bounds(self.lower[part.root], self.upper[part.root], part.unit_lower,
                                                  part.unit_upper, part.signs, np.argmax(part.alive, axis=1),
                                                  stop=lambda low, high: search.past_deadline() or watch(low, high),
                                                  warm=part.warm if self.warm_width else None, clamps=clamps)
            search.boxes_bounded += len(tighter)
            margin_lower = np.maximum(tighter.astype(np.float64), part.margins)
            alive, unit_lower, unit_upper = part.alive, part.unit_lower, part.unit_upper
            if clamps:
                unit_lower, unit_upper, empty = met_clamps(*self.beta_bounds.clamped)
                alive = alive & ~empty[:, None]
            found.append(self._live_domains(part.root, alive, unit_lower, unit_upper, part.signs,
                                            margin_lower, optimised[:, :self.warm_width]))
            done = chunk.stop
        rest = domains.take(slice(done, None))   # only once the deadline has passed
        rest.unit = np.where(rest.unit == UNCHOSEN, NO_UNIT, rest.unit)
        found.append(rest)
        return Domains.concat(found)

    def _branching_unit(self, root, alive, lower, upper) -> np.ndarray:
        """Per domain, the unstable ReLU with the largest triangle relaxation intercept -l·u/(u-l) in the
        earliest layer that has one; without one, among the other units (Sigmoid, Tanh) whose function strays
        from its chord over [l, u] (`chord_gap`), the one whose split gains most (`_split_gains`); -1 when no
        unit is left to split.

        Early splits tighten every later layer's recomputed bounds. (Measured on random 2-16-16-2 networks,
        properties at 70-90 % of the way from the true maximum to CROWN's bound, 5 s: this proved 5 of 8,
        the last layer first 4, the last layer first without recomputing any bounds 2.)
        """
        relu = self.clamp.relu
        unit = self._relu_unit(lower[:, relu], upper[:, relu], self.layer[relu])
        unit = np.where(unit >= 0, np.flatnonzero(relu)[np.maximum(unit, 0)] if relu.any() else -1, -1)
        if relu.all():
            return unit
        gap = np.zeros(lower.shape, dtype=np.float64)
        for k, op in enumerate(self.clamp.activations):
            if op in CURVES:
                part = slice(self.clamp.offsets[k], self.clamp.offsets[k + 1])
                gap[:, part] = chord_gap(CURVES[op], lower[:, part], upper[:, part])
        splittable = gap > 0
        need = (unit < 0) & splittable.any(axis=1)
        score = gap
        if need.any():
            # First-order gain of the weaker child; the chord gap breaks ties (and decides where gradients vanish).
            gains = self._split_gains(root[need], alive[need], lower[need], upper[need])
            score = gap.copy()
            score[need] = gains + 1e-6 * gap[need]
        other = np.argmax(np.where(splittable, score, -np.inf), axis=1)
        return np.where(unit >= 0, unit, np.where(splittable.any(axis=1), other, -1))

    def _look_ahead(self, parents: Domains) -> np.ndarray:
        """Per parent, the unit to split: the first choice (`parents.unit`) or, for a ReLU, the best of
        LOOK_AHEAD candidates by the weaker child's bound (filtered smart branching; ties keep the first
        choice). Parents the deadline leaves unexamined keep their first choice."""
        unit = parents.unit.copy()
        relu = self.clamp.relu
        examined = np.flatnonzero((unit >= 0) & relu[np.maximum(unit, 0)])
        if LOOK_AHEAD < 2 or not len(examined) or int(relu.sum()) < 2:
            return unit
        self._ensure_splitter()
        for chunk in self.look_calls.slices(len(examined), self.search.deadline):
            if chunk is None:
                break
            rows = examined[chunk]
            candidates = self._candidates(parents.take(rows))
            unit[rows] = candidates[np.arange(len(rows)), np.argmax(self._weaker_child(parents.take(rows),
                                                                                       candidates), axis=1)]
        return unit

    def _candidates(self, parents: Domains) -> np.ndarray:
        """[P, k]: the first choice, then the unstable ReLUs with the largest first-order gains (the first
        choice again where fewer are unstable)."""
        lower, upper = parents.unit_lower, parents.unit_upper
        unstable = (lower < 0) & (upper > 0) & self.clamp.relu[None, :]
        gains = np.where(unstable, self._split_gains(parents.root, parents.alive, lower, upper), -np.inf)
        rows = np.arange(len(parents))
        gains[rows, parents.unit] = -np.inf
        k = min(LOOK_AHEAD, gains.shape[1]) - 1
        best = np.argpartition(-gains, k - 1, axis=1)[:, :k] if k > 0 else np.zeros((len(parents), 0), int)
        best = np.where(np.isfinite(np.take_along_axis(gains, best, axis=1)), best, parents.unit[:, None])
        return np.concatenate([parents.unit[:, None], best], axis=1)

    def _weaker_child(self, parents: Domains, candidates: np.ndarray) -> np.ndarray:
        """[P, k]: per candidate split, the smaller of its two children's weakest live conjunct bounds, the
        children bounded on the parent's unit bounds with the candidate's set to 0 on one side."""
        count, k = candidates.shape
        flat = candidates.reshape(-1)
        index = np.arange(count * k)
        lower, upper = np.repeat(parents.unit_lower, k, axis=0), np.repeat(parents.unit_upper, k, axis=0)
        active, inactive = lower.copy(), upper.copy()
        active[index, flat] = np.maximum(active[index, flat], 0)
        inactive[index, flat] = np.minimum(inactive[index, flat], 0)
        root = np.tile(np.repeat(parents.root, k), 2)
        margins, _, _ = self.chooser(self.lower[root], self.upper[root], np.concatenate([active, lower]),
                                     np.concatenate([upper, inactive]))
        self.search.boxes_bounded += len(margins)
        alive = np.tile(np.repeat(parents.alive, k, axis=0), (2, 1))
        score = unsafe_objective(margins.astype(np.float64), self.search.membership, alive)
        return np.nan_to_num(np.minimum(score[:count * k], score[count * k:]), nan=-np.inf).reshape(count, k)

    def _ensure_splitter(self) -> None:
        if self.splitter is None:
            self.splitter = SplitBounds(self.search.network, self.search.matrix, self.search.offset, "given")
            # A choice need not be sound: the look-ahead stays in float32 (its float64 runs took a quarter of
            # eran idx 186's search in float32 mode).
            self.chooser = copy.copy(self.splitter)
            if self.double:   # it bounds the children of last-layer splits
                self.splitter.in_double()

    def _split_gains(self, root, alive, lower, upper) -> np.ndarray:
        """[B, units]: BaBSR-like look-ahead for units other than ReLUs. The gradient of the live rows' summed
        margin lower bound (the "given" split graph, through torch) with respect to each unit's bounds, times
        how far a split at `split_point` moves them, is what each child gains to first order; the smaller
        of the two (the weaker child decides whether the split helps)."""
        import torch

        from .bounds import outward_float32
        self._ensure_splitter()
        if self.scorer is None:
            from ..torch_exec import TorchGraph
            self.scorer = TorchGraph(self.splitter.model, trainable=False)
        network, splitter = self.search.network, self.splitter
        lo, hi = outward_float32(self.lower[root], self.upper[root])
        unit_lower = torch.tensor(lower, dtype=torch.float32, requires_grad=True)
        unit_upper = torch.tensor(upper, dtype=torch.float32, requires_grad=True)
        feeds = {name: torch.as_tensor(value) for name, value in
                 zip(splitter.feeds, (network.model_shaped(lo), network.model_shaped(hi)))}
        for k, (name, shape) in enumerate(zip(splitter.names, splitter.shapes)):
            part = slice(splitter.offsets[k], splitter.offsets[k + 1])
            feeds[SPLIT_LOWER_PREFIX + name] = unit_lower[:, part].reshape(-1, *shape)
            feeds[SPLIT_UPPER_PREFIX + name] = unit_upper[:, part].reshape(-1, *shape)
        margins = self.scorer(feeds, outputs=["margins_lower"])["margins_lower"].reshape(len(lo), -1)
        rows = torch.from_numpy((alive.astype(np.float32) @ self.search.membership.T.astype(np.float32)) > 0)
        objective = torch.where(rows & torch.isfinite(margins), margins, torch.zeros_like(margins)).sum()
        if not objective.requires_grad:
            return np.zeros(lower.shape)
        d_lower, d_upper = torch.autograd.grad(objective, [unit_lower, unit_upper], allow_unused=True)
        d_lower = np.zeros(lower.shape) if d_lower is None else np.nan_to_num(d_lower.numpy().astype(np.float64))
        d_upper = np.zeros(lower.shape) if d_upper is None else np.nan_to_num(d_upper.numpy().astype(np.float64))
        point = split_point(lower, upper, self.clamp.relu[None, :]).astype(np.float64)
        raised = np.maximum(d_lower, 0) * (point - lower)       # the child z >= point
        lowered = np.maximum(-d_upper, 0) * (upper - point)     # the child z <= point
        return np.nan_to_num(np.minimum(raised, lowered), posinf=0.0)

    @staticmethod
    def _relu_unit(lower, upper, layer) -> np.ndarray:
        unstable = (lower < 0) & (upper > 0)
        intercept = np.where(unstable, -lower * upper / np.where(unstable, upper - lower, 1.0), -1.0)
        if not unstable.size:
            return np.full(len(lower), -1)
        layer = np.where(unstable, layer[None, :], np.iinfo(layer.dtype).max)
        earliest = layer.min(axis=1, keepdims=True)
        unit = np.argmax(np.where(layer == earliest, intercept, -2.0), axis=1)
        return np.where(unstable.any(axis=1), unit, -1)

    def _attack_domains_if_due(self, frontier: Frontier) -> None:
        """Attack the property boxes that still have live domains (their live conjuncts), within
        SPLIT_ATTACK_SHARE of the time."""
        if not self.search.attack_due(SPLIT_ATTACK_SHARE) or not len(frontier):
            return
        root, alive = frontier.items.root, frontier.items.alive
        roots = np.unique(root)
        live = np.zeros((len(roots), alive.shape[1]), dtype=bool)
        np.logical_or.at(live, np.searchsorted(roots, root), alive)
        self.search.attack_boxes(self.lower[roots], self.upper[roots], live, budget=1.0, samples=64, restarts=4,
                                 steps=30)
