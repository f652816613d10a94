"""Falsification: random sampling and projected gradient descent into the unsafe set of a property.

The objective of a point is min over the live conjuncts of max over the conjunct's rows of the margin
`c·y - d`: it is <= 0 exactly when y satisfies some conjunct, so minimising it aims into the unsafe set.
Points found here are only candidates; the verifier re-runs them on the original model before reporting.

Starting points come from uniform samples, samples on the box's faces and vertices (every vertex when there
are few), the corner against the gradient at the center, and the bound graph's weakest corners
(`BoundCorners`): the vertex where a row's linear lower bound (CROWN, or IBP where CROWN would not fit the
memory budget) is smallest, which lands in regions the gradient at the center never points to (mnistfc 256x2
prop_0 and 256x6 prop_3 at eps 0.05: PGD from every other start stalls at margins 0.96 and 0.73).

Memory: boxes and their starting points stream through in chunks sized to `memory_bytes` from a per-point
estimate (the network's activations forward and backward, the property's rows and conjuncts), so a spec with
thousands of boxes or conjuncts costs time, not memory. Only the best points found are kept.
"""
from __future__ import annotations

import math
import time

import numpy as np
import onnx_ir as ir
import torch

from .attack_schedule import inner_float32, step_scale  # noqa: F401  (re-exported)
from .interface import perturbed_inputs
from .torch_exec import TorchGraph

DEFAULT_MEMORY_BYTES = 1 << 30
# Points returned by `Attack.run` (the verifier confirms candidates best first).
KEEP_POINTS = 16
# Boxes (the first of each chunk) and rows per box whose weakest bound corners an attack computes.
CORNER_BOXES, CORNER_ROWS = 16, 8
# Samples scored per box at a time (the clock is checked between rounds).
SAMPLE_ROUND = 2048
# Every vertex is sampled when a box has at most this many (else random vertices).
ENUMERATED_VERTICES = 4096


class FlatNetwork:
    """The normalised model as a torch function from flat inputs [B, n_x] to flat outputs [B, n_y]."""

    def __init__(self, model: ir.Model, output: str):
        """`model` has one input whose dimensions are static apart from a leading symbolic batch."""
        self.graph = TorchGraph(model, trainable=False)
        self.graph.eval()
        [x] = perturbed_inputs(model)
        self.input_name, self.output = x.name, output
        dims = list(x.shape) if x.shape is not None else []
        self.batched = len(dims) >= 2 and not isinstance(dims[0], int)
        self.sample_shape = dims[1:] if self.batched else dims
        self.floats_per_sample = _activation_floats(model, self.batched)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.batched:
            y = self.graph({self.input_name: x.reshape(len(x), *self.sample_shape)})[self.output]
            return y.reshape(len(x), -1)
        # Models without a batch dimension (1-D inputs) take one sample at a time.
        return torch.stack([self.graph({self.input_name: xi.reshape(self.sample_shape)})[self.output].reshape(-1)
                            for xi in x])


class BoundCorners:
    """The weakest corners of a bound graph: for a box and a margin row, the vertex minimising the row's linear
    lower bound A·x + c over the box, i.e. x_i at its lower end where A_i > 0 and at its upper end where A_i < 0.

    A comes from the bound graph itself run by the torch executor: with the relaxation fixed, the bound's
    derivative is A_i+ with respect to the lower end and A_i- with respect to the upper end, so their sum
    is A (computed through the relaxation too, which only perturbs it). CROWN where its coefficient matrices
    for the requested boxes fit `memory_bytes` (about units x inputs floats per box, forward and backward),
    else IBP (whose derivative gives the same kind of direction from interval ends); none for models without
    a batch dimension or that neither method bounds.
    """

    def __init__(self, model: ir.Model, network: "FlatNetwork", matrix: np.ndarray, offset: np.ndarray,
                 memory_bytes: int):
        self.model, self.network = model, network
        self.matrix, self.offset = np.asarray(matrix, dtype=np.float32), np.asarray(offset, dtype=np.float32)
        n_inputs = int(np.prod(network.sample_shape)) if network.sample_shape else 1
        crown_bytes = 12 * network.floats_per_sample * max(n_inputs, len(self.matrix))
        self.methods = ("crown", "ibp") if crown_bytes * CORNER_BOXES <= memory_bytes else ("ibp",)
        self._graph = None        # built on first use; False when no method bounds the model

    def _build(self):
        from . import api
        from .errors import GraphcertError
        from .interface import InputSet
        self._graph = False
        if not self.network.batched or not len(self.matrix):
            return
        for method in self.methods:
            try:
                graph = api.bound_graph(self.model, method, InputSet("box"), spec=self.matrix,
                                        spec_offset=self.offset, keep_original=False)
                self._graph = TorchGraph(graph, trainable=False)
                self._graph.eval()
                return
            except (GraphcertError, NotImplementedError, KeyError, ValueError):
                continue

    def __call__(self, lower: torch.Tensor, upper: torch.Tensor, rows: torch.Tensor, limit: int,
                 deadline: float) -> torch.Tensor | None:
        """[B, <= limit, n]: for boxes lower, upper [B, n], the weakest corners of the `limit` rows among `rows`
        (indices into the property's rows) with the smallest lower bounds on each box (None: unavailable).

        One bound pass for all boxes, then one gradient per rank; fewer ranks when the clock would not allow
        them (each gradient costs about two bound passes)."""
        if self._graph is None:
            self._build()
        if self._graph is False or not len(rows):
            return None
        began = time.monotonic()
        name, shape = self.network.input_name, self.network.sample_shape
        low = lower.reshape(len(lower), *shape).clone().requires_grad_(True)
        high = upper.reshape(len(upper), *shape).clone().requires_grad_(True)
        try:
            bound = self._graph({f"{name}_lower": low, f"{name}_upper": high},
                                outputs=["margins_lower"])["margins_lower"].reshape(len(lower), -1)[:, rows]
        except (RuntimeError, KeyError, ValueError):      # an op the executor cannot run: no corners
            self._graph = False
            return None
        bound = torch.where(torch.isfinite(bound), bound, torch.zeros_like(bound))
        order = bound.detach().argsort(dim=1)[:, :limit]                                    # [B, ranks]
        pass_seconds = time.monotonic() - began
        ranks = min(order.shape[1], int(max(0.0, deadline - time.monotonic()) // max(2 * pass_seconds, 1e-3)))
        corners = []
        for rank in range(ranks):
            try:
                grad_low, grad_high = torch.autograd.grad(bound.gather(1, order[:, rank:rank + 1]).sum(),
                                                          (low, high), retain_graph=rank + 1 < ranks,
                                                          allow_unused=True)
            except RuntimeError:
                break
            if grad_low is None or grad_high is None:
                break
            slope = (grad_low + grad_high).reshape(len(lower), -1)
            corner = torch.where(slope > 0, lower, upper)
            corners.append(torch.where(slope == 0, 0.5 * (lower + upper), corner))
        return torch.stack(corners, dim=1).detach() if corners else None


def _activation_floats(model: ir.Model, batched: bool) -> int:
    """Floats one sample's forward pass produces (values of unknown shape count as the largest known one)."""
    sizes, unknown = [], 0
    for node in model.graph:
        for value in node.outputs:
            dims = list(value.shape) if value.shape is not None else None
            if dims is not None and batched and dims and not isinstance(dims[0], int):
                dims = dims[1:]
            if dims is None or not all(isinstance(d, int) for d in dims):
                unknown += 1
            else:
                sizes.append(int(np.prod(dims)))
    return max(1, sum(sizes) + unknown * max(sizes, default=1024))


def _row_conjunct_pairs(membership: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, conjuncts = membership.nonzero(as_tuple=True)
    return rows, conjuncts


def unsafe_objective(margins: torch.Tensor, membership: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """margins [B, r], membership [r, K] (row r belongs to conjunct k), alive [B, K] -> objective [B].

    Each conjunct's maximum is gathered over its own rows only (memory B x (member pairs + K), not B x K x r).
    """
    return conjunct_margins(margins, membership).masked_fill(~alive, math.inf).amin(dim=1)


def conjunct_margins(margins: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """[B, K]: each conjunct's largest row margin (-inf for a conjunct without rows: every output meets it)."""
    rows, conjuncts = _row_conjunct_pairs(membership)
    b, k = len(margins), membership.shape[1]
    out = margins.new_full((b, k), -math.inf)
    if not len(rows):
        return out
    return out.scatter_reduce(1, conjuncts.expand(b, -1), margins[:, rows], reduce="amax", include_self=True)


class _Rows:
    """Some rows of the property (margins c·y + d) and the conjuncts they belong to."""

    def __init__(self, matrix: torch.Tensor, offset: torch.Tensor, membership: torch.Tensor,
                 index: torch.Tensor | None = None):
        """`index`: each row's index among the property's rows (default: all of them, in order)."""
        self.matrix, self.offset, self.membership = matrix, offset, membership
        self.index = torch.arange(len(matrix)) if index is None else index
        self.pairs = _row_conjunct_pairs(membership)

    def margins(self, network, x: torch.Tensor) -> torch.Tensor:
        return network(x) @ self.matrix.T + self.offset

    def objective(self, network, x: torch.Tensor, alive: torch.Tensor, step: int) -> torch.Tensor:
        if len(x) <= step:
            return unsafe_objective(self.margins(network, x), self.membership, alive)
        return torch.cat([unsafe_objective(self.margins(network, x[i:i + step]), self.membership, alive[i:i + step])
                          for i in range(0, len(x), step)])


class Attack:
    """Sampling, gradient corners and multi-start sign-gradient PGD per live conjunct, over many boxes at once.

    Each PGD start belongs to one (box, live conjunct) pair; its loss is, in turn, the whole unsafe objective,
    that conjunct's largest row margin, or that plus one of its rows' margins (a targeted margin, which
    escapes the plateaus where the maximum keeps switching rows). Progress is judged by the unsafe objective.
    """

    def __init__(self, network: FlatNetwork, matrix: np.ndarray, offset: np.ndarray, membership: np.ndarray,
                 seed: int = 0, memory_bytes: int = DEFAULT_MEMORY_BYTES, model: ir.Model | None = None):
        """`model`: the normalised model `network` runs, for the bound graph's weakest corners (None: without)."""
        self.network = network
        self.bound_corners = None if model is None else BoundCorners(model, network, matrix, offset, memory_bytes)
        self.matrix = torch.as_tensor(matrix, dtype=torch.float32)
        self.offset = torch.as_tensor(offset, dtype=torch.float32)
        self.membership = torch.as_tensor(membership, dtype=torch.bool)
        self.generator = torch.Generator().manual_seed(seed)
        self.memory_bytes = memory_bytes
        self.rows_view = _Rows(self.matrix, self.offset, self.membership)

    def points_per_chunk(self, n_inputs: int, rows: "_Rows | None" = None) -> int:
        """How many points one chunk may hold within the memory budget (evaluating `rows`, default all)."""
        rows = rows or self.rows_view
        n_rows, n_conjuncts = rows.membership.shape
        # Per point: input, gradient, bounds, sample and best copies; activations forward and backward;
        # margins, the gathered member pairs and the conjunct table (with gradients); the live mask.
        per_point = 4 * (8 * n_inputs + 3 * self.network.floats_per_sample
                         + 3 * (n_rows + len(rows.pairs[0]) + n_conjuncts)) + n_conjuncts
        return max(1, int(self.memory_bytes // per_point))

    def objective(self, x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """The unsafe objective of points x [B, n] with live conjuncts [B, K], in chunks within the budget."""
        return self.rows_view.objective(self.network, x, alive, self.points_per_chunk(x.shape[1]))

    def run(self, lower: np.ndarray, upper: np.ndarray, alive: np.ndarray, deadline: float,
            samples: int = 256, restarts: int = 8, steps: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """For boxes [M, n] with live conjuncts [M, K]: the best points found [<= KEEP_POINTS, n] and their
        objectives, best first.

        Per box, `samples` uniform random points are scored; PGD then starts `restarts` times per live
        conjunct (at most 4 conjuncts per box, the ones whose best sample comes closest) from the box
        center, the best samples and gradient-sign corners. Boxes go in chunks within the memory budget;
        stops once some point reaches the unsafe set (objective <= 0) or at the deadline.
        """
        lo_all, hi_all = inner_float32(lower, upper)
        alive_all = np.asarray(alive, dtype=bool)
        n = lo_all.shape[1]
        targets = max(1, min(4, int(alive_all.sum(axis=1).max(initial=1))))
        per_box = restarts * targets
        best_x = np.zeros((0, n), dtype=np.float32)
        best = np.zeros(0, dtype=np.float32)
        membership = self.membership.numpy()
        start, size = 0, len(lo_all)      # shrunk below until a chunk's own rows fit the budget
        while start < len(lo_all):
            part = slice(start, start + size)
            # Only the conjuncts live in this chunk, and their rows, are evaluated: a spec whose boxes each
            # have their own conjuncts costs each point its own rows, not all of them.
            conjuncts = np.flatnonzero(alive_all[part].any(axis=0))
            rows = np.flatnonzero(membership[:, conjuncts].any(axis=1))
            view = _Rows(self.matrix[rows], self.offset[rows], self.membership[rows][:, conjuncts],
                         torch.from_numpy(rows))
            fits = max(1, self.points_per_chunk(n, view) // per_box)
            if fits < size and size > 1:
                size = max(1, min(fits, size // 2))
                continue
            x, objective = self._run_chunk(view, torch.from_numpy(lo_all[part]), torch.from_numpy(hi_all[part]),
                                           torch.from_numpy(alive_all[part][:, conjuncts]), deadline, samples,
                                           restarts, targets, steps)
            start += size
            best_x = np.concatenate([best_x, x])
            best = np.concatenate([best, objective])
            order = np.argsort(best, kind="stable")[:KEEP_POINTS]
            best_x, best = best_x[order], best[order]
            if best[0] <= 0 or time.monotonic() > deadline:
                break
        return best_x, best

    def _run_chunk(self, view: _Rows, lo, hi, alive, deadline, samples, restarts, targets, steps):
        m, n = lo.shape
        starts, conjunct = self._starts(view, lo, hi, alive, samples, restarts, targets, deadline)  # [P, n]
        owner = torch.arange(m).repeat_interleave(targets * restarts)
        lo_r, hi_r, alive_r = lo[owner], hi[owner], alive[owner]
        # The loss of each start, in turn: the whole unsafe objective, its conjunct's largest margin, or that
        # plus one of the conjunct's rows (a targeted margin).
        member = view.membership[:, conjunct].T                       # [P, r]
        targeted = self._targeted_rows(member, restarts)
        aim_whole = torch.arange(len(member)) % 3 == 0
        x = starts.clone()
        with torch.no_grad():
            best = view.objective(self.network, x, alive_r, self.points_per_chunk(n, view))
        best_x = x.clone()
        width = hi_r - lo_r
        for step in range(steps):
            if best.min() <= 0 or time.monotonic() > deadline:
                break
            x.requires_grad_(True)
            margins = view.margins(self.network, x)
            whole = unsafe_objective(margins, view.membership, alive_r)
            loss = margins.masked_fill(~member, -math.inf).amax(dim=1)
            loss = loss + torch.where(targeted >= 0, margins.gather(1, targeted.clamp(min=0)[:, None])[:, 0],
                                      torch.zeros_like(loss))
            loss = torch.where(aim_whole, whole, loss)
            grad, = torch.autograd.grad(loss.sum(), x)
            with torch.no_grad():
                current = whole.detach()
                improved = current < best
                best = torch.where(improved, current, best)
                best_x[improved] = x.detach()[improved]
                x = torch.minimum(torch.maximum(x.detach() - step_scale(step, steps) * width * grad.sign(), lo_r),
                                  hi_r)
        with torch.no_grad():
            current = view.objective(self.network, x, alive_r, self.points_per_chunk(n, view))
            improved = current < best
            best = torch.where(improved, current, best)
            best_x[improved] = x[improved]
        order = best.argsort()[:KEEP_POINTS]
        return best_x[order].numpy(), best[order].numpy()

    def _targeted_rows(self, member: torch.Tensor, restarts: int) -> torch.Tensor:
        """[P]: a member row of each start's conjunct to weight up (every third start), or -1."""
        p = len(member)
        counts = member.sum(dim=1)
        pick = torch.arange(p) // 3 % counts.clamp(min=1)
        ranks = member.cumsum(dim=1) - 1                              # rank of each member row in its conjunct
        row = torch.where(member & (ranks == pick[:, None]), torch.arange(member.shape[1]), member.shape[1])
        row = row.amin(dim=1)
        return torch.where((torch.arange(p) % 3 == 2) & (counts > 1), row, torch.full_like(row, -1))

    def _starts(self, view: _Rows, lo, hi, alive, samples, restarts, targets, deadline):
        """Starting points [m*targets*restarts, n] and each one's conjunct [m*targets*restarts].

        Per box: the `targets` live conjuncts whose best sample comes closest; for each, its best samples by
        that conjunct's margin, with the gradient-sign corner of its largest row at the center (the corner
        minimising its linearisation) second. Samples: the box center, uniform points, points on faces,
        vertices and the bound graph's weakest corners.
        """
        m, n = lo.shape
        k = alive.shape[1]
        count = max(samples, restarts)
        # Score the samples in rounds within the budget, keeping each conjunct's best `restarts` per box.
        per_round = max(1, self.points_per_chunk(n, view) // max(m, 1))
        # Where points are cheap (small networks, few boxes), sample up to 16 times more, in rounds of at most
        # SAMPLE_ROUND points per box and while sampling has used less than a third of the time left.
        count = max(count, min(16 * count, per_round))
        per_round = min(per_round, SAMPLE_ROUND)
        began = time.monotonic()
        sampling_until = began + (deadline - began) / 3
        kept_points = lo.new_zeros((m, 0, n))
        kept_scores = lo.new_zeros((m, k, 0))
        # Every vertex is a sample when there are few of them (a quarter of the samples are vertices).
        enumerate_vertices = n < 63 and 2 ** n <= min(ENUMERATED_VERTICES, count // 4)
        for begin in range(0, count, per_round):
            if begin > 0 and time.monotonic() > sampling_until:
                break
            size = min(per_round, count - begin)
            u = torch.rand(m, size, n, generator=self.generator)
            # Counterexamples often lie on the boundary, where uniform samples hardly ever go: samples 1 mod 4
            # have each coordinate on a face of the box with probability 1/2, samples 3 mod 4 are vertices.
            face = torch.rand(m, size, n, generator=self.generator)
            index = torch.arange(begin, begin + size)
            on_face = ((index % 4 == 1).view(1, -1, 1) & (face < 0.5)) | (index % 4 == 3).view(1, -1, 1)
            ends = (face < 0.25) | ((index % 4 == 3).view(1, -1, 1) & (face < 0.5))
            if enumerate_vertices:
                vertex = (index // 4) % (2 ** n)
                bits = ((vertex[:, None] >> torch.arange(n)) & 1).bool()
                ends = torch.where((index % 4 == 3).view(1, -1, 1), bits.unsqueeze(0), ends)
            points = lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1)
            # Ends exactly (lo + 1 * (hi - lo) can round past hi, out of the input set).
            points = torch.where(on_face, torch.where(ends, hi.unsqueeze(1), lo.unsqueeze(1)), points)
            if begin == 0:
                points[:, 0] = 0.5 * (lo + hi)
                corners = self._bound_corners(view, lo, hi, deadline)
                if corners is not None:
                    points = torch.cat([points, corners], dim=1)
                    size = points.shape[1]
            with torch.no_grad():
                scores = conjunct_margins(view.margins(self.network, points.reshape(m * size, n)), view.membership)
            scores = scores.reshape(m, size, k).transpose(1, 2).masked_fill(~alive.unsqueeze(2), math.inf)
            kept_points = torch.cat([kept_points, points], dim=1)
            kept_scores = torch.cat([kept_scores, scores], dim=2)
            # Keep, per box, the union of every conjunct's best `restarts` samples (bounded by k*restarts), and
            # always the center (first, and first again after each selection below; the choice of conjuncts
            # below sees its real score).
            priority = kept_scores.clone()
            priority[:, :, 0] = -math.inf
            keep = priority.argsort(dim=2)[:, :, :restarts]               # [m, k, restarts]
            union = torch.zeros(m, kept_points.shape[1], dtype=torch.bool)
            union.scatter_(1, keep.reshape(m, -1), True)
            width = int(union.sum(dim=1).max())
            index = union.float().argsort(dim=1, descending=True, stable=True)[:, :width]
            kept_points = torch.gather(kept_points, 1, index.unsqueeze(2).expand(-1, -1, n))
            kept_scores = torch.gather(kept_scores, 2, index.unsqueeze(1).expand(-1, k, -1))
        best_score = kept_scores.amin(dim=2).masked_fill(~alive, math.inf)     # [m, k]
        chosen = best_score.argsort(dim=1)[:, :targets]                          # [m, targets]
        # Dead conjuncts (boxes with fewer live ones) fall back to the box's first choice.
        live_chosen = torch.gather(alive, 1, chosen)
        chosen = torch.where(live_chosen, chosen, chosen[:, :1])
        scores = torch.gather(kept_scores, 1, chosen.unsqueeze(2).expand(-1, -1, kept_scores.shape[2]))
        order = scores.argsort(dim=2)[:, :, :restarts]                           # [m, targets, restarts]
        starts = torch.gather(kept_points.unsqueeze(1).expand(-1, targets, -1, -1), 2,
                              order.unsqueeze(3).expand(-1, -1, -1, n)).clone()
        if order.shape[2] < restarts:       # fewer samples than restarts: pad with the center
            pad = 0.5 * (lo + hi)
            starts = torch.cat([starts, pad[:, None, None].expand(-1, targets, restarts - order.shape[2], -1)], 2)
        if restarts >= 3:
            starts[:, :, 1] = self._corners(view, lo, hi, chosen)
        return starts.reshape(-1, n), chosen.reshape(-1).repeat_interleave(restarts)

    def _bound_corners(self, view: _Rows, lo, hi, deadline: float) -> torch.Tensor | None:
        """[m, <= CORNER_ROWS, n]: the bound graph's weakest corners of the rows with the smallest lower bounds,
        for the first CORNER_BOXES boxes (later boxes get their center), or None without a bound graph."""
        if self.bound_corners is None:
            return None
        m, n = lo.shape
        first = min(m, CORNER_BOXES)
        found = self.bound_corners(lo[:first], hi[:first], view.index, CORNER_ROWS, deadline)
        if found is None:
            return None
        corners = (0.5 * (lo + hi)).unsqueeze(1).repeat(1, found.shape[1], 1)
        corners[:first] = found
        return corners

    def _corners(self, view: _Rows, lo, hi, chosen):
        """[m, targets, n]: for each chosen conjunct, the box corner against the gradient of its largest row
        margin at the center (the vertex minimising that margin's linearisation there)."""
        m, n = lo.shape
        targets = chosen.shape[1]
        center = (0.5 * (lo + hi)).repeat_interleave(targets, 0).requires_grad_(True)
        member = view.membership[:, chosen.reshape(-1)].T
        loss = view.margins(self.network, center).masked_fill(~member, -math.inf).amax(dim=1)
        grad, = torch.autograd.grad(loss.sum(), center)
        corner = torch.where(grad > 0, lo.repeat_interleave(targets, 0), hi.repeat_interleave(targets, 0))
        corner = torch.where(grad == 0, center.detach(), corner)
        return corner.reshape(m, targets, n)
