"""Branch and bound over input boxes: bound the property's boxes, halve the undecided ones, attack meanwhile.

The property's own boxes are always bounded and attacked here; on inputs with more than BRANCH_DIMENSIONS
dimensions (or with branching="relus") the undecided ones go on to `relu_bab` instead of being halved.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..alpha import VERIFY_ALPHA, AlphaSettings
from ..alpha_settings import BRANCH_BETA
from ..errors import GraphcertError, InputError
from . import relu_bab
from .bounds import spec_bounds
from .descent import CoefficientDescent
from .resources import MemorySizer, log
from .search import ABSOLUTE_SLACK, ATTACK_BOXES, RELATIVE_SLACK, Arrays, CallSizer, Frontier, Search, unsafe_objective

# Halving one of many input dimensions barely tightens bounds: beyond this many, bounds and attacks decide alone.
BRANCH_DIMENSIONS = 64
# Trying a split costs two bound evaluations; each box tries at most this many dimensions.
SPLIT_CANDIDATES = 2
# Boxes fewer than this many splits from the property's box look ahead at every dimension (strong branching near
# the root, where a choice shapes the most of the tree; ACAS Xu 2_8 prop_1, real arithmetic: 15,105 bound
# evaluations at depth 6, 3,165 at 9, a timeout after 12,665 with SPLIT_CANDIDATES only).
LOOKAHEAD_DEPTH = 9
# Boxes in the first call of each float32 second look at blocked boxes (later calls are sized to the clock).
SLACK_BOXES = 64
# Input branching goes on for this many seconds before the property's boxes get the thorough attack, when that
# would first load torch (about 2 s): a property the branching decides sooner never loads it. ACAS Xu, idle
# machine, 60 s: prop_3 on 1_4 holds in 4.3 s with the attack first (torch's import 2.3 s of it), and 12 of the
# 14 counterexamples the root attack found (prop_2) come from box centres within 1.4-4.8 s without any attack;
# prop_7 on 1_9 needs the attack (22 s without, 3.7 s with it first).
ROOT_ATTACK_DELAY = 2.0

# The torch-free descent on the property's undecided boxes takes at most this share of the time left.
DESCENT_SHARE = 0.1
# The attack on the property's own boxes: uniform samples scored, PGD restarts per live conjunct, steps each.
ROOT_ATTACK = dict(samples=1024, restarts=32, steps=100)
# Before a unit-splitting search that cannot attack as it goes (`relu_bab.attacks_as_it_goes`), a lighter one.
# On mnistfc (7 counterexamples, 256x2 to 256x6) and eran's sigmoid net (idx 7259) it finds every
# counterexample the thorough one does, in 0.25-1.0 s instead of 0.7-1.8 s; on eran idx 3334 and 3054 (true)
# it gives up after 1.1-1.3 s instead of 2.1-2.5 s. A splitting search attacks the boxes again and again
# (`relu_bab.SPLIT_ATTACK_SHARE` of its time) after its root bounds, which often prove the property at once:
# the torch-free descent before them found 10 of 12 counterexamples (`descent`).
ROOT_ATTACK_BEFORE_UNIT_SPLITS = dict(samples=256, restarts=8, steps=50)


def torch_loaded() -> bool:
    """Whether this process has imported torch already (then an attack costs no import)."""
    return "torch" in sys.modules


BoundFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class Boxes(Arrays):
    """Undecided input boxes. score: the unsafe objective at the box center; boxes whose centers come closest
    to the unsafe set are split first (for a proof the order does not change the work; for a violated
    property it leads to the region where a counterexample lies). leverage: for the weakest live conjunct, the
    best over its rows of lower bound + |A_i|·width_i / 2, A being CROWN's coefficients of the input in the
    row's lower bound (A·x + terms free of x, minimised over the box: a wide dimension with a large coefficient
    costs the bound most), as alpha,beta-CROWN's input-split "smart branching" scores dimensions."""
    lower: np.ndarray     # [B, n]
    upper: np.ndarray     # [B, n]
    alive: np.ndarray     # [B, conjuncts]: not yet refuted on the box
    score: np.ndarray     # [B]
    leverage: np.ndarray  # [B, n]: how much the box's weakest margin bound loses to each dimension's width (NaN: unknown)
    depth: np.ndarray     # [B] splits from the property's box


class InputSplitSearch:
    """Branch and bound over input boxes, with attacks on what bounds cannot decide.

    branching: "inputs" halves input boxes, "relus" splits ReLU units (CROWN-bounded methods on models with a
    batch dimension only); None picks inputs up to BRANCH_DIMENSIONS input dimensions, ReLUs beyond.
    """

    def __init__(self, search: Search, method: str, bound_fn: BoundFn | None = None,
                 alpha: AlphaSettings = VERIFY_ALPHA, branching: str | None = None,
                 beta: AlphaSettings | None = BRANCH_BETA):
        if branching not in (None, "inputs", "relus"):
            raise InputError(f"branching is 'inputs' or 'relus', not {branching!r}")
        self.search, self.method, self.beta = search, method, beta
        self.branching = branching or ("inputs" if search.network.n_inputs <= BRANCH_DIMENSIONS else "relus")
        # alpha-CROWN stages bound the boxes through torch from the start; ReLU branching loads it when it begins
        # (`relu_bab.split_relus`), so a property CROWN proves at the root never does (1.7-2.4 s per process).
        if method != "crown":
            search.use_torch()
        began = time.monotonic()
        self.bound_fn = bound_fn or (spec_bounds(search.network, search.matrix, search.offset, method,
                                                 search.membership, search.deadline, search.mixtures, alpha,
                                                 search.budget, coefficients=self.branching == "inputs")
                                     if search.has_rows else None)
        # In float32 mode boxes are bounded in float64 where that can be done (`Float32Slack.run_in_double`):
        # their slack is then the float64 graph's own rounding, and no second look is needed. (Before unit
        # splitting too: the property's boxes are bounded once, and a second look would build a second graph.)
        run_in_double = getattr(search.rounding_slack, "run_in_double", None)
        self.in_double = bool(run_in_double is not None and run_in_double(self.bound_fn))
        self.box_slack = search.rounding_slack.in_double_only if self.in_double else search.rounding_slack
        # Building a split bound graph takes about as long: ReLU branching starts only with that much time left.
        self.build_seconds = time.monotonic() - began
        # A box costs its float64 bounds in and its margins out at least; the bound graph's own memory is measured.
        rows = len(search.offset)
        self.box_calls = CallSizer(memory=MemorySizer(search.budget, floor=16 * search.network.n_inputs + 24 * rows,
                                                      estimate=(2 if self.in_double else 1) *
                                                      getattr(self.bound_fn, "bytes_per_sample", 0)))
        # The float32 second looks at blocked boxes (`_evaluate`).
        self.slack_calls, self.double_calls = CallSizer(size=SLACK_BOXES), CallSizer(size=SLACK_BOXES)
        widths = np.max([hi - lo for lo, hi in search.prop.input_boxes], axis=0) if search.prop.cases else None
        self.root_width = None if widths is None else np.where(widths > 0, widths, 1.0)
        search.start_clock()

    def run(self) -> tuple[str, tuple | None, int]:
        search, prop = self.search, self.search.prop
        if not prop.cases:
            return search.finish("holds")
        lower, upper, alive = prop.root_boxes()
        if search.conjunct_without_rows(lower, upper, alive):
            return search.finish("violated")
        if not search.has_rows:
            self._attack_roots(lower, upper, alive)
            return search.finish("unknown", "the unsafe set has no output constraint to bound")
        # Bounds first: a property they prove at the root needs no attack (the attack costs seconds, a CROWN
        # call a fraction of one); what they leave open is attacked before any splitting, or soon after it begins.
        evaluated = self._evaluate(lower, upper, alive)
        if evaluated is None:
            return search.timeout()
        alive, _, center_objective, margin_lower, leverage = evaluated
        keep = alive.any(axis=1)
        if search.counterexample is not None:
            return search.finish("violated")
        roots = Boxes(lower[keep], upper[keep], alive[keep], center_objective[keep], leverage[keep],
                      np.zeros(int(keep.sum()), dtype=np.int32))
        # Descent without torch first: most counterexamples end the search here, before torch loads.
        if len(roots) and self._descend(roots.lower, roots.upper, roots.alive):
            return search.finish("violated")
        # Halving input boxes needs no torch: until it is loaded, the thorough attack waits ROOT_ATTACK_DELAY s
        # of branching (the box centres bounded meanwhile are tried as counterexamples too). ReLU splitting
        # attacks as it goes (SPLIT_ATTACK_SHARE of its time), after the root bounds that may decide at once.
        attack_after = time.monotonic() + (ROOT_ATTACK_DELAY if self.branching == "inputs" and
                                           not torch_loaded() else 0.0)
        splits_attack = self.branching == "relus" and relu_bab.attacks_as_it_goes(search, self.method)
        if len(roots) and time.monotonic() >= attack_after and not splits_attack:
            attack_after = None
            if self._attack_roots(roots.lower, roots.upper, roots.alive):
                return search.finish("violated")
        if len(roots) and self.branching == "relus":
            return relu_bab.split_relus(search, self.method, roots.lower, roots.upper, roots.alive,
                                        margin_lower[keep], self.build_seconds, self.beta,
                                        lambda: self._attack_roots(roots.lower, roots.upper, roots.alive))
        frontier = Frontier(roots)
        while len(frontier):
            if search.past_deadline():
                return search.timeout(frontier)
            if search.counterexample is not None:
                break
            if attack_after is not None and time.monotonic() >= attack_after:
                attack_after = None   # the root attack, once (counted in the attacks' share of the time)
                if self._attack_roots(roots.lower, roots.upper, roots.alive):
                    break
            too_large = search.frontier_too_large(len(frontier), 24 * lower.shape[1] + alive.shape[1] + 8)
            if too_large:
                return search.finish("unknown", too_large)
            parents = frontier.pop(max(1, self.box_calls.size // (2 * SPLIT_CANDIDATES)))
            children = self._split(parents)
            if children is None:
                return search.timeout(frontier)
            frontier.push(children)
            if attack_after is None:
                self._attack_if_due(frontier)
        return search.finish("holds")

    def _descend(self, lower, upper, alive) -> bool:
        """Sign descent without torch on the property's undecided boxes (`descent.CoefficientDescent`), within
        DESCENT_SHARE of the time left; True when a counterexample is confirmed."""
        search = self.search
        began = time.monotonic()
        try:
            descent = CoefficientDescent(search.network, search.matrix, search.offset, search.membership)
        except GraphcertError as refusal:   # a heuristic: the searches go on without it
            log.info("no torch-free descent: %s", str(refusal).splitlines()[0][:200])
            return False
        if descent.available:
            deadline = began + DESCENT_SHARE * max(0.0, search.deadline - began)
            points, objective = descent.run(lower, upper, alive, deadline, search.budget)
            for index in np.flatnonzero(objective <= 0)[:8]:
                if search.confirm(points[index]):
                    break
        search.attack_seconds += time.monotonic() - began
        return search.counterexample is not None

    def _attack_roots(self, lower, upper, alive) -> bool:
        """The attack on the property's own boxes (a quarter of the time left at most)."""
        settings = ROOT_ATTACK_BEFORE_UNIT_SPLITS if self.branching == "relus" else ROOT_ATTACK
        return self.search.attack_boxes(lower, upper, alive, budget=0.25, **settings)

    def _evaluate(self, lower, upper, alive):
        """Bound boxes, drop refuted conjuncts, try the centers; (alive, score, center objective, margin lower
        bounds, leverage) or None at the deadline.

        score: the weakest live conjunct's best row lower bound (> 0 means refuted; +inf when the box is).
        center objective: the unsafe objective at the box center (<= 0 there means a candidate counterexample).
        """
        search = self.search
        bounds = self._bound_batched(lower, upper)
        if bounds is None:
            return None
        margin_lower, margin_upper, center = bounds[:3]
        search.boxes_bounded += len(lower)
        base = ABSOLUTE_SLACK + RELATIVE_SLACK * (np.abs(margin_lower) + np.abs(margin_upper))
        rounding = self.box_slack(lower, upper)
        # Boxes that only the float32 slack keeps undecided get the tighter slack of CROWN's magnitudes.
        blocked = np.flatnonzero(((margin_lower > base) & (margin_lower <= base + rounding)).any(axis=1))
        of_boxes = None if self.in_double else getattr(search.rounding_slack, "of_boxes", None)
        # Sized to the clock (a call of 256 boxes took over a second on a busy machine); at the deadline the
        # boxes not reached keep the plain slack (sound).
        for chunk in self.slack_calls.slices(len(blocked) if of_boxes is not None else 0, search.deadline):
            if chunk is None:
                break
            part = blocked[chunk]
            rounding[part] = of_boxes(lower[part], upper[part], search.offset, rounding[part])
        slack = base + rounding
        refuted = ((margin_lower > slack).astype(np.int32) @ search.membership) > 0
        alive = alive & ~refuted
        # Those still blocked only by the float32 slack: margins and slack from a float64 bound graph.
        in_double = None if self.in_double else getattr(search.rounding_slack, "in_double", None)
        blocked = np.flatnonzero(alive.any(axis=1) & ((margin_lower > base) & (margin_lower <= slack)).any(axis=1))
        for chunk in self.double_calls.slices(len(blocked) if in_double is not None else 0, search.deadline):
            if chunk is None:
                break
            part = blocked[chunk]
            found = in_double(lower[part], upper[part], search.offset)
            if found is None:
                break
            wide_lower, wide_slack = found
            wide_base = ABSOLUTE_SLACK + RELATIVE_SLACK * np.abs(wide_lower)
            refuted = ((wide_lower > wide_base + wide_slack).astype(np.int32) @ search.membership) > 0
            alive[part] &= ~refuted
            margin_lower[part] = np.maximum(margin_lower[part], wide_lower)
        center_objective = unsafe_objective(center, search.membership, alive)
        for box in np.flatnonzero(center_objective <= 0)[:8]:
            if search.confirm(0.5 * (lower[box] + upper[box])):
                break
        leverage = self._leverage(margin_lower, alive, bounds[3], upper - lower) if len(bounds) > 3 else \
            np.full(lower.shape, np.nan)
        return alive, unsafe_objective(margin_lower, search.membership, alive), center_objective, \
            margin_lower, leverage

    def _leverage(self, margin_lower, alive, coefficients, widths) -> np.ndarray:
        """[B, n]: for each box's weakest live conjunct, the best over its rows of the row's lower bound plus
        |A_i|·width_i / 2, what halving dimension i could at most gain the row (see `Boxes`)."""
        membership = self.search.membership
        per_row = np.where(membership.T[None], margin_lower[:, None, :], -np.inf)      # [B, conjuncts, rows]
        weakest = np.argmin(np.where(alive & membership.any(axis=0), per_row.max(axis=2), np.inf), axis=1)
        rows = membership[:, weakest].T                                                # [B, rows]
        reach = margin_lower[:, :, None] + 0.5 * np.abs(coefficients) * widths[:, None, :]
        return np.where(rows[:, :, None], reach, -np.inf).max(axis=1)

    def _bound_batched(self, lower, upper):
        """bound_fn over chunks sized to take about CALL_SECONDS each; None when the deadline passes."""
        parts = []
        for chunk in self.box_calls.slices(len(lower), self.search.deadline):
            if chunk is None:
                return None
            parts.append(self.bound_fn(lower[chunk], upper[chunk]))
        return tuple(np.concatenate([p[k] for p in parts]).astype(np.float64) for k in range(len(parts[0])))

    def _split(self, boxes: Boxes) -> Boxes | None:
        """Halve each box along one dimension and return the live halves.

        Candidates (`_candidate_dimensions`): the dimension of highest leverage and the one widest relative to
        the property's box. Where they differ, the halves of both are bounded in one call and the split kept is
        the one whose halves get closest to refuted in total (scores clipped at 0, since a refuted half cannot
        do better).
        """
        lower, upper, alive = boxes.lower, boxes.upper, boxes.alive
        m, n = lower.shape
        dims = self._candidate_dimensions(lower, upper, alive, boxes.leverage, boxes.depth)
        tried = dims >= 0
        parent, dim = np.nonzero(tried)[0], dims[tried]
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
        child_alive, child_score, child_objective, _, child_leverage = evaluated
        half = len(parent)
        progress = np.full(dims.shape, -np.inf)
        progress[tried] = np.minimum(child_score[:half], 0) + np.minimum(child_score[half:], 0)
        candidate = np.full(dims.shape, -1)
        candidate[tried] = rows
        pick = candidate[np.arange(m), np.argmax(progress, axis=1)]
        selected = np.concatenate([pick, pick + half])
        keep = selected[child_alive[selected].any(axis=1)]
        return Boxes(child_lower[keep], child_upper[keep], child_alive[keep], child_objective[keep],
                     child_leverage[keep], boxes.depth[parent[keep % half]] + 1)

    def _candidate_dimensions(self, lower, upper, alive, leverage, depth) -> np.ndarray:
        """[m, SPLIT_CANDIDATES] dimensions per box (-1: none): the highest leverage first (it wins ties), then
        the relatively widest (none where that is the same dimension), then the next by leverage. Without
        leverage (bound functions that do not give input coefficients), |gradient| x width of the unsafe
        objective at the center ranks them instead."""
        m, n = lower.shape
        if np.isnan(leverage).any():
            torch = self.search.use_torch()
            center = torch.from_numpy((0.5 * (lower + upper)).astype(np.float32)).requires_grad_(True)
            objective = self.search.attack.objective(center, torch.from_numpy(alive))
            grad, = torch.autograd.grad(objective.sum(), center)
            leverage = np.abs(grad.numpy()) * (upper - lower)
        ranked = np.argsort(-leverage, axis=1, kind="stable")
        widest = np.argmax((upper - lower) / self.root_width, axis=1)[:, None]
        others = ranked[ranked != widest].reshape(m, n - 1)
        none = np.full((m, 1), -1)
        order = np.where(ranked[:, :1] == widest, np.concatenate([widest, none, others], axis=1),
                         np.concatenate([others[:, :1], widest, others[:, 1:], none], axis=1))
        order[depth >= LOOKAHEAD_DEPTH, SPLIT_CANDIDATES:] = -1
        return order

    def _attack_if_due(self, frontier: Frontier) -> None:
        """Attack the boxes whose centers come closest to the unsafe set, within ATTACK_SHARE of the time."""
        if not self.search.attack_due() or not len(frontier):
            return
        boxes = frontier.closest(ATTACK_BOXES)
        self.search.attack_boxes(boxes.lower, boxes.upper, boxes.alive, budget=1.0, samples=64, restarts=4,
                                 steps=30)
