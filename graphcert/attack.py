"""Falsification: random sampling and projected gradient descent into the unsafe set of a property.

The objective of a point is min over the live conjuncts of max over the conjunct's rows of the margin
`c·y - d`: it is <= 0 exactly when y satisfies some conjunct, so minimising it aims into the unsafe set.
Points found here are only candidates; the verifier re-runs them on the original model before reporting.
"""
from __future__ import annotations

import math
import time

import numpy as np
import onnx_ir as ir
import torch

from .interface import perturbed_inputs
from .torch_exec import TorchGraph


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.batched:
            y = self.graph({self.input_name: x.reshape(len(x), *self.sample_shape)})[self.output]
            return y.reshape(len(x), -1)
        # Models without a batch dimension (1-D inputs) take one sample at a time.
        return torch.stack([self.graph({self.input_name: xi.reshape(self.sample_shape)})[self.output].reshape(-1)
                            for xi in x])


def unsafe_objective(margins: torch.Tensor, membership: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """margins [B, r], membership [r, K] (row r belongs to conjunct k), alive [B, K] -> objective [B]."""
    per_row = margins.unsqueeze(1).masked_fill(~membership.T.unsqueeze(0), -math.inf)   # [B, K, r]
    per_conjunct = per_row.amax(dim=2) if margins.shape[1] else margins.new_full(alive.shape, -math.inf)
    return per_conjunct.masked_fill(~alive, math.inf).amin(dim=1)


def inner_float32(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 box inside [lower, upper]: clamped attack points never leave the real input set."""
    lo = lower.astype(np.float32)
    hi = upper.astype(np.float32)
    lo = np.where(lo < lower, np.nextafter(lo, np.float32(np.inf)), lo)
    hi = np.where(hi > upper, np.nextafter(hi, np.float32(-np.inf)), hi)
    return lo, np.maximum(hi, lo)


class Attack:
    """Sampling + sign-gradient PGD with restarts, over many boxes at once."""

    def __init__(self, network: FlatNetwork, matrix: np.ndarray, offset: np.ndarray, membership: np.ndarray,
                 seed: int = 0):
        self.network = network
        self.matrix = torch.as_tensor(matrix, dtype=torch.float32)
        self.offset = torch.as_tensor(offset, dtype=torch.float32)
        self.membership = torch.as_tensor(membership, dtype=torch.bool)
        self.generator = torch.Generator().manual_seed(seed)

    def objective(self, x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        margins = self.network(x) @ self.matrix.T + self.offset
        return unsafe_objective(margins, self.membership, alive)

    def run(self, lower: np.ndarray, upper: np.ndarray, alive: np.ndarray, deadline: float,
            samples: int = 256, restarts: int = 8, steps: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """For boxes [M, n] with live conjuncts [M, K]: the best points found [M*restarts, n] and objectives.

        `samples` uniform random points per box are scored first; the best ones start the PGD restarts.
        Stops early once some point reaches the unsafe set (objective <= 0) or at the deadline.
        """
        lo, hi = (torch.from_numpy(a) for a in inner_float32(lower, upper))
        alive_t = torch.as_tensor(alive, dtype=torch.bool)
        starts = self._best_samples(lo, hi, alive_t, samples, restarts)
        m, r = len(lo), restarts
        lo_r, hi_r = lo.repeat_interleave(r, 0), hi.repeat_interleave(r, 0)
        alive_r = alive_t.repeat_interleave(r, 0)
        x = starts.reshape(m * r, -1).clone()
        best_x = x.clone()
        with torch.no_grad():
            best = self.objective(x, alive_r)
        width = hi_r - lo_r
        for step in range(steps):
            if best.min() <= 0 or time.monotonic() > deadline:
                break
            x.requires_grad_(True)
            loss = self.objective(x, alive_r)
            grad, = torch.autograd.grad(loss.sum(), x)
            with torch.no_grad():
                improved = loss < best
                best = torch.where(improved, loss, best)
                best_x[improved] = x[improved]
                # Cosine-decayed step: large moves to escape flat regions, small ones to settle near the boundary.
                scale = 0.25 * 0.5 * (1 + math.cos(math.pi * step / steps)) + 1e-3
                x = torch.minimum(torch.maximum(x - scale * width * grad.sign(), lo_r), hi_r)
        with torch.no_grad():
            loss = self.objective(x, alive_r)
            improved = loss < best
            best = torch.where(improved, loss, best)
            best_x[improved] = x[improved]
        return best_x.numpy(), best.numpy()

    def _best_samples(self, lo: torch.Tensor, hi: torch.Tensor, alive: torch.Tensor, samples: int,
                      restarts: int) -> torch.Tensor:
        """[M, restarts, n] starting points: the box center and the best of uniform random samples."""
        m, n = lo.shape
        count = max(samples, restarts)
        u = torch.rand(m, count, n, generator=self.generator)
        points = lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1)
        points[:, 0] = 0.5 * (lo + hi)
        with torch.no_grad():
            scores = self.objective(points.reshape(m * count, n), alive.repeat_interleave(count, 0)).reshape(m, count)
        scores[:, 0] = -math.inf       # always keep the center
        order = scores.argsort(dim=1)[:, :restarts]
        return torch.gather(points, 1, order.unsqueeze(2).expand(-1, -1, n))

