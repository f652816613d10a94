"""Counterexamples without torch: projected sign descent whose gradients come from a bound graph.

On a small box around a point x every unit's interval is narrow, where each relaxation's lines are close to the
unit's tangent: CROWN's input coefficients of a margin's lower bound are then nearly the margin's gradient at x
(exactly, for a ReLU net where no unit's interval holds 0; on a point, an S-shaped unit's chord would be flat).
A CROWN-IBP graph (IBP intervals, one backward pass from the margins) gives them, and the margins at x, for a
batch of points in one onnxruntime call, so the root of a search can look for counterexamples before anything
imports torch (1.8 s of every process that needs it).

Starts per live conjunct of each box: the box corner where CROWN-IBP's lower bound of the conjunct's first row
(on the whole box) is smallest, the box centre, and uniform points; each descends on its conjunct's largest row
margin, with the step schedule of the torch attack (`graphcert.attack`, which remains the thorough search).
Measured on the violated instances of alpha,beta-CROWN's CPU list and a few more (eran sigmoid 7259; mnistfc
256x2 prop_0/3/9/12, 256x4 prop_3/14, 256x6 prop_3/9 at eps 0.05; ACAS Xu 2_1 prop_2, 1_9 prop_7), 20 steps
find 10 of 12 in 0.02-0.3 s; 256x6 prop_3 and 1_9 prop_7 need the torch attack.
"""
from __future__ import annotations

import time

import numpy as np

from ..attack_schedule import inner_float32, step_scale
from ..export import to_proto
from ..interface import InputSet
from ..passes.crown import INPUT_COEFFICIENTS_PREFIX, CrownPass
from ..passes.spec import MARGINS, SpecPass
from ..runtime import LazySession
from .network import Network
from .resources import Budget, graph_bytes_per_sample
from .search import unsafe_objective

# Starts per live (box, conjunct) besides its corner and centre, and the (box, conjunct) pairs searched at most
# (the first ones given; the torch attack takes every box).
RANDOM_STARTS = 2
MAX_PAIRS = 256
# The gradient at a point is taken on a box this share of the property box's width around it.
GRADIENT_BOX = 1e-2
# Coefficients per call at most (points x rows x inputs floats): the points stream through in chunks.
CALL_FLOATS = 1 << 24
# The descent stops once its best objective, still positive, gained less than PLATEAU[1] of itself over the last
# PLATEAU[0] steps. On the properties that hold of the list above the best settles within 3-6 steps (eran sigmoid
# 3334, 7167, 7481, 1211: 0.8 s for 20 steps); the violated ones gain steadily until they cross 0 (mnistfc 256x2
# prop_0_0.05: 0.032, 0.014 for 5 steps, then below 0 at step 13).
PLATEAU = (6, 0.01)


class CoefficientDescent(LazySession):
    """Sign descent into the unsafe set of (matrix, offset, membership) on `network`, gradients from CROWN-IBP's
    input coefficients around each point; `available` is False where the graph gives none (a model without a
    batch axis, margins bounded by IBP alone)."""

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, membership: np.ndarray):
        self.network, self.membership = network, membership
        self.rows = len(offset)
        spec = SpecPass(np.asarray(matrix, dtype=np.float32), offset, keep_output=False)(network.model).model
        graph = CrownPass(InputSet("box"), keep_original=True, intermediate="ibp", input_coefficients=True)(spec).model
        self.proto = to_proto(graph)
        self.bytes_per_point = graph_bytes_per_sample(self.proto)
        name = network.input_name
        self.feeds = (f"{name}_lower", f"{name}_upper")
        self.coefficients = INPUT_COEFFICIENTS_PREFIX + name
        self.available = network.batched and self.coefficients in {v.name for v in self.proto.graph.output}

    def coefficients_on(self, lower: np.ndarray, upper: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Margins [B, rows] at the centres of the boxes (lower, upper [B, n]) and the input coefficients
        [B, rows, n] of their CROWN-IBP lower bounds, `chunk` boxes per call."""
        margins, coefficients = [], []
        for start in range(0, len(lower), chunk):
            part = slice(start, start + chunk)
            feeds = [self.network.model_shaped(bound[part].astype(np.float32)) for bound in (lower, upper)]
            out = self.session.run(dict(zip(self.feeds, feeds)), [MARGINS, self.coefficients])
            count = len(feeds[0])
            found = out[self.coefficients].reshape(self.rows, -1, lower.shape[1])
            coefficients.append(np.broadcast_to(found, (self.rows, count, lower.shape[1])).transpose(1, 0, 2))
            margins.append(out[MARGINS].reshape(count, -1).astype(np.float64))
        return np.concatenate(margins), np.concatenate(coefficients)

    def run(self, lower: np.ndarray, upper: np.ndarray, alive: np.ndarray, deadline: float, budget: Budget,
            steps: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The best points found in the boxes (lower, upper [B, n], live conjuncts alive [B, K]) and their unsafe
        objectives (<= 0: a candidate counterexample), best first; stops at the deadline or at a candidate.
        Nothing is searched when one point's graph would not fit the free memory `budget`."""
        n = lower.shape[1]
        chunk = min(CALL_FLOATS // max(1, self.rows * n), budget.free() // max(1, self.bytes_per_point))
        if chunk < 1:
            return np.empty((0, n)), np.empty(0)
        rng = np.random.default_rng(seed)
        lower, upper = inner_float32(lower, upper)   # points that stay in the box as float32
        box, conjunct = (pair[:MAX_PAIRS] for pair in np.nonzero(alive))
        lo, hi = lower[box], upper[box]
        first_row = np.argmax(self.membership[:, conjunct].T, axis=1)
        _, on_box = self.coefficients_on(lo, hi, chunk)
        corner = np.where(on_box[np.arange(len(box)), first_row] > 0, lo, hi)
        starts = [corner, 0.5 * (lo + hi)] + [rng.uniform(lo, hi) for _ in range(RANDOM_STARTS)]
        x = np.concatenate(starts)
        owner, aim = np.tile(box, len(starts)), np.tile(conjunct, len(starts))
        lo, hi = lower[owner], upper[owner]
        member = self.membership[:, aim].T                                  # [P, rows]
        # The box around each point is centred on it (its margins are the point's) and may reach past the
        # property's box.
        reach = GRADIENT_BOX * (hi - lo)
        best, best_x = np.full(len(x), np.inf), x.copy()
        history = []
        for step in range(steps + 1):
            margins, gradients = self.coefficients_on(x - reach, x + reach, chunk)
            objective = unsafe_objective(margins, self.membership, alive[owner])
            improved = objective < best
            best, best_x[improved] = np.where(improved, objective, best), x[improved]
            history.append(best.min())
            if best.min() <= 0 or step == steps or time.monotonic() > deadline or _settled(history):
                break
            # the gradient of the aimed conjunct's largest row margin
            row = np.argmax(np.where(member, margins, -np.inf), axis=1)
            x = np.clip(x - step_scale(step, steps) * (hi - lo) * np.sign(gradients[np.arange(len(x)), row]), lo, hi)
        order = np.argsort(best)
        return best_x[order], best[order]


def _settled(history: list[float]) -> bool:
    """The best objective (positive) gained less than PLATEAU[1] of itself over the last PLATEAU[0] steps."""
    window, share = PLATEAU
    return len(history) > window and history[-1] > 0 and history[-1 - window] - history[-1] < share * history[-1]
