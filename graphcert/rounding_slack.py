"""Per-sample slack of margin rows from graphcert.rounding's error graphs: what a margin lower bound must beat
for a certificate (certify), a proof (verify) or a certificate graph to hold for the model as it runs in float32.
The argument is in graphcert.rounding's docstring."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .interface import perturbed_inputs
from .arithmetic import FLOAT32, Arithmetic
from .rounding import ERROR, MAGNITUDE, NORM, SAFETY, error_graph
from .rounding_given import GIVEN_LOWER, GIVEN_UPPER, USED_LOWER, USED_UPPER


# Bound graphs whose margin is the model evaluated at one point of the input set plus folded constants (the
# lipschitz pass: objective·y(centre) - eps·K·||row||): their own rounding is the model's at that point.
POINT_BOUND_GRAPHS = ("lipschitz",)


class RoundingSlack:
    """Per-sample slack of margin rows: a margin lower bound must exceed it for the certificate to hold for the
    model evaluated in float32. norm "linf": input sets are boxes; "l2": balls (radius = the largest entry).

    The slack is the deployed model's error, the bound graph's own, and the final subtraction:
        |c|-weighted model error  +  bound graph error  +  8u·|c|·M    (all rounded up)
    The model's error is min(|c|·E, ||c||_2·N) of the tightened analysis (graphcert.rounding_norms). A bound
    graph of POINT_BOUND_GRAPHS computes the model at a point of the set, so the same bound covers it. A
    relaxation bound graph (IBP, CROWN) propagates radii and coefficient chains through |W|, where no
    cancellation helps: its error is bounded by the plain |W|-product E (tighten=False), as before.
    The model's error is in the arithmetic it is deployed in (graphcert.arithmetic.of_model: float16 for a
    float16 model); the bound graph's in the one it runs in (`bound_arithmetic`: float32, or float64 for a bound
    graph computed in double, graphcert.precision), which the plain analysis and the final term use."""

    def __init__(self, model: ir.Model, norm: str = "linf", given: tuple = (),
                 bound_arithmetic: Arithmetic = FLOAT32):
        """`given`: names of values (boxes only) whose bounds over each set are fed to `of_rows`
        (graphcert.rounding_given: the magnitudes then come from the tighter of IBP's and those bounds)."""
        from .export import to_proto
        from .runtime import Session
        self.model, self.norm, self.given = model, norm, tuple(given)
        self.bound_arithmetic = bound_arithmetic
        graph = error_graph(model, norm, given=self.given, widen=False)
        self.session = Session(to_proto(graph))
        self._loose = None
        [x] = perturbed_inputs(model)[:1]
        self.x_name = x.name
        dims = list(x.shape) if x.shape is not None else []
        # A model without a batch axis takes one input set at a time: its results get a batch of 1.
        self.batched = len(dims) >= 2 and not isinstance(dims[0], int)
        self.needs_point = any(v.name == x.name for v in graph.graph.inputs)
        self.output = next(v.name for v in graph.graph.outputs if v.name.endswith(MAGNITUDE))[:-len(MAGNITUDE)]
        self.has_norm = any(v.name == self.output + NORM for v in graph.graph.outputs)

    def _feeds(self, lower: np.ndarray, upper: np.ndarray, bounds: dict | None = None) -> dict:
        lower, upper = np.asarray(lower, np.float32), np.asarray(upper, np.float32)
        if self.norm == "l2":
            centre = (lower + upper) / 2
            radius = ((upper - lower) / 2).reshape(len(lower), -1).max(axis=1) * np.float32(1 + 2 ** -20)
            return {self.x_name: centre.astype(np.float32), f"{self.x_name}_radius": radius.astype(np.float32)}
        feeds = {f"{self.x_name}_lower": lower, f"{self.x_name}_upper": upper}
        if self.needs_point:
            feeds[self.x_name] = lower
        for name, (low, high) in (bounds or {}).items():
            feeds[name + GIVEN_LOWER] = np.asarray(low, np.float32)
            feeds[name + GIVEN_UPPER] = np.asarray(high, np.float32)
        return feeds

    def _per_sample(self, array: np.ndarray, count: int) -> np.ndarray:
        return array.reshape(count, -1).astype(np.float64)

    def outputs(self, lower: np.ndarray, upper: np.ndarray, used: dict | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(M, E, N) of the model's first output over each input set: M and E flattened per sample, N [batch]
        (+inf when not tracked). Boxes [lower, upper], or for L2 the balls of centre (lower + upper) / 2 and
        radius the largest half-width. `used`: the intervals `loose_errors` used for the given values."""
        names = [self.output + MAGNITUDE, self.output + ERROR] + ([self.output + NORM] if self.has_norm else [])
        out = self.session.run(self._feeds(lower, upper, used), names)
        m = out[self.output + MAGNITUDE]
        count = len(m) if self.batched else 1
        n = out[self.output + NORM].reshape(count).astype(np.float64) if self.has_norm else np.full(count, np.inf)
        return self._per_sample(m, count), self._per_sample(out[self.output + ERROR], count), n

    def loose_errors(self, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """E of the plain |W|-product analysis, flattened per sample (what bounds a relaxation bound graph)."""
        return self._loose_run(lower, upper, None)[0]

    def _loose_run(self, lower: np.ndarray, upper: np.ndarray, given: dict | None):
        """`loose_errors` and the intervals the analysis used for the given values (their bounds `given`
        widened by 2·E, graphcert.rounding_given)."""
        if self._loose is None:
            from .export import to_proto
            from .runtime import Session
            self._loose = Session(to_proto(error_graph(self.model, self.norm, tighten=False, given=self.given,
                                                       arithmetic=self.bound_arithmetic)))
        used_names = [name + suffix for name in self.given for suffix in (USED_LOWER, USED_UPPER)]
        out = self._loose.run(self._feeds(lower, upper, given), [self.output + ERROR, *used_names])
        e = out[self.output + ERROR]
        used = {name: (out[name + USED_LOWER], out[name + USED_UPPER]) for name in self.given}
        return self._per_sample(e, len(e) if self.batched else 1), used

    def of_rows(self, lower: np.ndarray, upper: np.ndarray, rows: np.ndarray, point: bool = False,
                given: dict | None = None, model_error: bool = True) -> np.ndarray:
        """[batch, m] slack of the margin rows c (rows [batch, m, n] or [m, n]) over each input set, for a
        relaxation bound graph, or with `point` for one of POINT_BOUND_GRAPHS. `given`: {name: (lower, upper)}
        bounds over each set of the values named when constructed (real arithmetic, computed by a relaxation
        bound graph in the bound arithmetic).
        `model_error=False`: the bounds already bound the model as it runs (a bound graph of the model with its
        rounding leaves, graphcert.rounding_leaves): only the bound graph's own rounding and the final term."""
        loose, used = self._loose_run(lower, upper, given) if self.given else (None, None)
        m, e, n = self.outputs(lower, upper, used)
        rows = np.asarray(rows, dtype=np.float64)
        weights = np.broadcast_to(np.abs(rows), (len(m), *rows.shape[-2:]))
        lengths = np.sqrt((np.broadcast_to(rows, weights.shape) ** 2).sum(axis=2)) * (1 + 2 ** -40)
        model = np.minimum(np.einsum("bmn,bn->bm", weights, e), lengths * n[:, None])
        if not model_error:
            if point:
                raise ValueError("a point bound graph's own rounding is the model's: it needs model_error")
            model = np.zeros_like(model)
        if point:
            bound_graph = model
        else:
            if loose is None:
                loose = self.loose_errors(lower, upper)
            bound_graph = 2 * np.einsum("bmn,bn->bm", weights, loose)
        slack = model + bound_graph + 8 * self.bound_arithmetic.unit * np.einsum("bmn,bn->bm", weights, m)
        return slack * SAFETY + np.finfo(np.float32).tiny
