"""The soundness harness every bound pass is tested with: do the bounds contain the model's true outputs?

`check_bounds_sound` runs the ORIGINAL model in onnxruntime at the box centre, random points, random corners
and points found by projected sign-gradient attacks that push each output coordinate toward (and past) its
bound, and measures how far any output leaves [lower, upper]. Gradients come from `graphcert.torch_exec`
when it runs the model, otherwise from a zeroth-order estimate (random-direction finite differences).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from graphcert.runtime import Session

RTOL = 1e-5
ATOL = 1e-5

BoundFn = Callable[[np.ndarray, object], tuple[np.ndarray, np.ndarray]]


@dataclass
class SoundnessReport:
    """max_violation: the largest amount by which an output left its bounds beyond the float tolerance
    (<= 0 means sound at every point tried); worst: where that happened."""

    max_violation: float
    worst: str
    points: int
    gradients: str

    @property
    def sound(self) -> bool:
        return self.max_violation <= 0.0

    def assert_sound(self) -> None:
        assert self.sound, (f"bounds violated by {self.max_violation:.3g} beyond tolerance at {self.worst} "
                            f"({self.points} points checked, {self.gradients} gradients)")


class _Function:
    """A model as a function of many points, each of the shape of x0, with flattened outputs; points go
    through onnxruntime in one batch when the model's leading dimension is free, one by one otherwise."""

    def __init__(self, proto: onnx.ModelProto, output: str | None):
        self.session = Session(proto)
        initializers = {init.name for init in proto.graph.initializer}
        inputs = [v for v in proto.graph.input if v.name not in initializers]
        if len(inputs) != 1:
            raise ValueError(f"the harness checks models with one input, got {[v.name for v in inputs]}")
        self.input = inputs[0].name
        self.output = output or proto.graph.output[0].name
        self.batches = _leading_dim_free(inputs[0])

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float32)
        if len(points) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        if self.batches and points.shape[1] == 1:
            out = self.session.run({self.input: points.reshape((-1,) + points.shape[2:])}, [self.output])
            return out[self.output].reshape(len(points), -1)
        return np.stack([self.session.run({self.input: p}, [self.output])[self.output].reshape(-1) for p in points])


def _leading_dim_free(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return len(dims) >= 2 and not dims[0].HasField("dim_value")


class _TorchGradient:
    """Exact gradients through the torch executor, run on the normalised model (its batch is symbolic)."""

    def __init__(self, normalised, input_name: str, output: str):
        import torch

        from graphcert.torch_exec import TorchGraph

        self.torch = torch
        self.graph = TorchGraph(normalised, trainable=False)
        self.input, self.output = input_name, output
        shape = next(v for v in normalised.graph.inputs if v.name == input_name).shape or []
        self.batches = len(shape) >= 2 and not isinstance(shape[0], int)

    def __call__(self, points: np.ndarray, coordinates: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """d/dx of directions[k] * f(points[k])[coordinates[k]] for every k."""
        if self.batches and points.shape[1] == 1:
            return self._ascent(points.reshape((-1,) + points.shape[2:]), coordinates, directions).reshape(points.shape)
        return np.stack([self._ascent(p, c[None], d[None]) for p, c, d in zip(points, coordinates, directions)])

    def _ascent(self, batch: np.ndarray, coordinates, directions) -> np.ndarray:
        torch = self.torch
        x = torch.tensor(batch, dtype=torch.float32, requires_grad=True)
        out = self.graph({self.input: x})[self.output].reshape(len(coordinates), -1)
        picked = out[torch.arange(len(coordinates)), torch.as_tensor(coordinates)]
        (picked * torch.as_tensor(directions, dtype=torch.float32)).sum().backward()
        return x.grad.detach().numpy()


class _ZerothOrderGradient:
    """Gradients estimated from symmetric differences of f, `delta` apart, along random sign vectors."""

    def __init__(self, function: _Function, rng: np.random.Generator, delta: np.ndarray, directions: int = 8):
        self.function, self.rng, self.delta, self.directions = function, rng, delta, directions

    def __call__(self, points: np.ndarray, coordinates: np.ndarray, directions: np.ndarray) -> np.ndarray:
        signs = self.rng.choice(np.float32([-1.0, 1.0]), size=(len(points), self.directions) + points.shape[1:])
        moved = (self.delta * signs).astype(np.float32)
        ahead = self.function((points[:, None] + moved).reshape((-1,) + points.shape[1:]))
        behind = self.function((points[:, None] - moved).reshape((-1,) + points.shape[1:]))
        rows = np.repeat(np.arange(len(points)), self.directions)
        taken = np.repeat(coordinates, self.directions)
        slopes = (ahead[rows, taken] - behind[rows, taken]).reshape(len(points), self.directions)
        slopes = slopes * directions[:, None]
        return (slopes.reshape(slopes.shape + (1,) * (points.ndim - 1)) * signs).mean(axis=1)


def _gradient_source(original: onnx.ModelProto, function: _Function, x0: np.ndarray, delta: np.ndarray,
                     rng: np.random.Generator, prefer: str):
    """Ascent directions g(points, coordinates, directions): exact from the torch executor where it runs the
    model (unless `prefer` is "zeroth-order"), else estimated on the normalised model, batched in onnxruntime."""
    from graphcert.export import to_proto
    from graphcert.model import load

    normalised = load(original)
    if prefer != "zeroth-order":
        try:
            exact = _TorchGradient(normalised, function.input, function.output)
            exact(x0[None], np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.float32))
            return exact, "torch"
        except Exception:  # no torch executor, or no torch kernel for one of the model's ops
            pass
    return _ZerothOrderGradient(_Function(to_proto(normalised), function.output), rng, delta), "zeroth-order"


def check_bounds_sound(original_proto: onnx.ModelProto, bound_fn: BoundFn, x0: np.ndarray, eps,
                       domain: tuple[float, float] | None = None, n_random: int = 32, corners: int = 32,
                       pgd_steps: int = 10, attack_targets: int = 24, output: str | None = None, seed: int = 0,
                       rtol: float = RTOL, atol: float = ATOL, gradients: str = "auto") -> SoundnessReport:
    """Check lower <= f(x) <= upper for x in the L-inf ball of radius `eps` around `x0` (clipped to `domain`).

    x0 has the shape the original model takes; bound_fn(x0, eps) returns (lower, upper) of `output` (the
    first graph output by default) with the shape the model gives it. Attacks run `pgd_steps` of projected
    sign-gradient ascent (upper bounds) and descent (lower bounds) on up to `attack_targets` coordinates,
    with torch gradients when `gradients` is "auto" and the executor runs the model, else "zeroth-order".
    """
    rng = np.random.default_rng(seed)
    x0 = np.asarray(x0, dtype=np.float32)
    low = x0 - np.asarray(eps, dtype=np.float32)
    high = x0 + np.asarray(eps, dtype=np.float32)
    if domain is not None:
        low, high = np.maximum(low, domain[0]), np.minimum(high, domain[1])
    low, high = np.broadcast_to(low, x0.shape).astype(np.float32), np.broadcast_to(high, x0.shape).astype(np.float32)

    lower, upper = (np.asarray(b, dtype=np.float64).reshape(-1) for b in bound_fn(x0, eps))
    function = _Function(original_proto, output)
    checker = _Containment(lower, upper, rtol, atol)
    checker.record(function(x0[None]), "centre")

    unit = rng.random((n_random,) + x0.shape, dtype=np.float32)
    checker.record(function(low + unit * (high - low)), "random point")
    picks = rng.random((corners,) + x0.shape) < 0.5
    checker.record(function(np.where(picks, high, low)), "corner")

    if pgd_steps > 0:
        step = 2.5 * (high - low) / 2 / pgd_steps
        gradient, gradients = _gradient_source(original_proto, function, x0, step * 1e-2 + 1e-4, rng, gradients)
        targets = np.arange(lower.size)
        if targets.size > attack_targets:
            targets = rng.choice(targets, attack_targets, replace=False)
        coordinates = np.concatenate([targets, targets])
        directions = np.concatenate([-np.ones(len(targets)), np.ones(len(targets))]).astype(np.float32)
        points = low + rng.random((len(coordinates),) + x0.shape, dtype=np.float32) * (high - low)
        for _ in range(pgd_steps):
            ascent = gradient(points, coordinates, directions)
            points = np.clip(points + step * np.sign(ascent), low, high).astype(np.float32)
            checker.record(function(points), "attacked point")
    else:
        gradients = "no"
    return SoundnessReport(checker.max_violation, checker.worst, checker.points, gradients)


class _Containment:
    """Accumulates the largest excess of f beyond [lower, upper] minus the tolerance."""

    def __init__(self, lower, upper, rtol, atol):
        self.lower, self.upper, self.rtol, self.atol = lower, upper, rtol, atol
        self.max_violation, self.worst, self.points = -np.inf, "nowhere", 0

    def record(self, values: np.ndarray, where: str) -> None:
        values = values.astype(np.float64)
        if len(values) == 0:
            return
        if values.shape[1] != self.lower.size:
            raise ValueError(f"bounds have {self.lower.size} elements, the model's output {values.shape[1]}")
        tolerance = self.atol + self.rtol * np.abs(values)
        excess = np.maximum(self.lower - values, values - self.upper) - tolerance
        # NaN bounds contain nothing; NaN outputs are points where the model itself is undefined.
        excess = np.where(np.isnan(self.lower) | np.isnan(self.upper), np.inf, excess)
        excess = np.where(np.isnan(values), -np.inf, excess)
        self.points += len(values)
        index = np.unravel_index(np.argmax(excess), excess.shape)
        if excess[index] > self.max_violation:
            self.max_violation = float(excess[index])
            k = index[1]
            self.worst = (f"{where} (output {k}: f={values[index]:.6g}, bounds "
                          f"[{self.lower[k]:.6g}, {self.upper[k]:.6g}])")


def graph_bound_fn(bound_proto: onnx.ModelProto, input_name: str, output: str, kind: str = "linf",
                   domain: tuple[float, float] | None = None) -> BoundFn:
    """A bound function reading `<output>_lower`/`<output>_upper` from a bound graph (graphcert.interface)."""
    session = Session(bound_proto)

    def bounds(x0, eps):
        if kind == "linf":
            feeds = {input_name: x0, "epsilon": np.asarray(eps, dtype=np.float32)}
        else:
            low, high = x0 - eps, x0 + eps
            if domain is not None:
                low, high = np.maximum(low, domain[0]), np.minimum(high, domain[1])
            feeds = {f"{input_name}_lower": low, f"{input_name}_upper": high}
        out = session.run(feeds, [f"{output}_lower", f"{output}_upper"])
        return out[f"{output}_lower"], out[f"{output}_upper"]
    return bounds
