"""Norm-wise rounding error: N, a per-sample bound on the L2 norm ||fl(v) - v||_2 of a value's error, carried
next to graphcert.rounding's elementwise bound E so that orthogonal and Lipschitz layers do not amplify it.

Why: the elementwise rule of a linear layer, |W·e| <= |W|·E, loses the cancellation in W. For an orthonormal
256-wide layer the row sums of |W| are about 16, so E grows 16-fold per layer although ||W·e||_2 = ||e||_2.
Norm-wise, with e the error arriving and δ the rounding the layer adds (|δ| <= γ·(|W|·|x~| + |b|), x~ = x + e
the computed input):

    ||fl(W·x~ + b) - (W·x + b)||_2 <= ||W||_2·||e||_2 + ||δ||_2,   ||δ||_2 <= || γ·(|W|·(M + E) + |b|) ||_2

with ||W||_2 the operator norm that the lipschitz pass computes for the op (graphcert.operator_norms, float64,
rounded up) and the right-hand norm computed in the graph from the elementwise M and E. Ops that do not round
(ReLU, reshapes, disjoint max pooling, selections) map ||e||_2 through their Lipschitz constant, the lipschitz
pass's rule with K = 1; Concat(-MaxPool(-P), MaxPool(P)) (GroupSort) is 1-Lipschitz in P. Additions add the
norms of their terms (times the broadcast replication) and their own rounding. Every other op, and every op the
lipschitz pass does not take, gets N = ||E||_2, always true since |e| <= E.

Both bounds then tighten each other: |e_i| <= ||e||_2, so E <- min(E, N) elementwise before the next op, and a
margin row c sees |c·e| <= min(|c|·E, ||c||_2·N).

The graph computing N rounds too: every N is pushed up by (1 + γ_{n+2}) for the n terms of its L2 norm and by
the SAFETY factor of graphcert.rounding.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .model import static_shape


def gamma(n: int) -> float:
    from .rounding import UNIT
    return n * UNIT / (1.0 - n * UNIT)


class NormTracker:
    """N of every perturbed value that has one, built next to a rounding.Walk (which calls `after`)."""

    def __init__(self, walk, batched: bool, tainted: set):
        from .passes import lipschitz
        self.walk, self.b = walk, walk.b
        self.geo = lipschitz.Geometry(batched)
        self.accepts = lipschitz.acceptor(self.geo, tainted)
        self.lipschitz_rules = lipschitz.RULES
        self.norms: dict[ir.Value, ir.Value] = {}

    # ---- graph helpers -------------------------------------------------------------------------------------

    def l2(self, elementwise: ir.Value, like: ir.Value) -> ir.Value | None:
        """[batch] L2 norms per sample of a nonnegative tensor shaped like `like`, rounded up (None when the
        per-sample size is not static)."""
        count = self.geo.sample_size(like)
        if count is None:
            return None
        b = self.b
        rows = b.op("Reshape", elementwise, b.ints([0 if self.geo.batched else 1, -1]))
        norm = b.reduce("ReduceL2", rows, [1], keepdims=0)
        return b.op("Mul", norm, self.walk.c((1.0 + gamma(count + 2)) * _safety()))

    def spread(self, norm: ir.Value, like: ir.Value) -> ir.Value:
        """N [batch] broadcast against a tensor shaped like `like`."""
        rank = len(static_shape(like))
        return self.b.op("Reshape", norm, self.b.ints([-1, *([1] * (rank - 1))]))

    def gain(self, node: ir.Node) -> float | None:
        """The op's L2 Lipschitz constant in its single perturbed input (the lipschitz pass's rule), or None."""
        perturbed = [v for v in node.inputs if v is not None and v in self.walk.errors]
        if len(perturbed) != 1 or node.op_type not in self.lipschitz_rules:
            return None
        try:
            if not self.accepts(node):
                return None
            ks = [1.0 if v is perturbed[0] else None for v in node.inputs]
            found = self.lipschitz_rules[node.op_type](self.geo, node, *ks)
        except (TypeError, IndexError, ValueError, AttributeError, KeyError):
            return None
        return float(found[0]) if found and np.isfinite(found[0]) else None

    # ---- per node --------------------------------------------------------------------------------------------

    def after(self, node: ir.Node, results: list) -> list[ir.Value]:
        """Record N of the node's outputs from the rule's results (an E, or (E, N) from rules that bound N
        themselves) and return each output's E tightened by its N."""
        errors = []
        for value, found in zip(node.outputs, results):
            error, norm = found if isinstance(found, tuple) else (found, None)
            if norm is None:
                norm = self._carried(node, value)
            own = self.l2(error, value)
            if norm is None:
                norm = own
            elif own is not None:
                norm = self.b.op("Min", norm, own)
            if norm is not None:
                self.norms[value] = norm
                error = self.b.op("Min", error, self.spread(norm, value))
            errors.append(error)
        return errors

    def _carried(self, node: ir.Node, value: ir.Value) -> ir.Value | None:
        """N through an op that does not round: its Lipschitz constant times the input's N."""
        from .rounding import EXACT_OPS
        if node.op_type not in EXACT_OPS:
            return None
        if node.op_type == "Concat":
            return self._concat(node)
        gain = self.gain(node)
        source = next(v for v in node.inputs if v is not None and v in self.walk.errors)
        if gain is None or source not in self.norms:
            return None
        return self.b.op("Mul", self.norms[source], self.walk.c(gain * _safety()))

    def _concat(self, node: ir.Node) -> ir.Value | None:
        from .passes.patterns import group_sort_input
        source = group_sort_input(node)
        if source is not None:
            return self.norms.get(source)
        if not self.accepts(node):
            return None
        parts = [v for v in node.inputs if v is not None and v in self.walk.errors]
        if any(v not in self.norms for v in parts):
            return None
        total = None
        for v in parts:
            square = self.b.op("Mul", self.norms[v], self.norms[v])
            total = square if total is None else self.b.op("Add", total, square)
        return self.b.op("Mul", self.b.op("Sqrt", total), self.walk.c((1.0 + gamma(len(parts) + 2)) * _safety()))

    def linear(self, node: ir.Node, x: ir.Value, fresh: ir.Value) -> ir.Value | None:
        """N of a linear op's output: gain·N(x) + ||fresh||_2, fresh the elementwise bound on what it rounds."""
        gain = self.gain(node)
        if gain is None or x not in self.norms:
            return None
        fresh_norm = self.l2(fresh, node.outputs[0])
        if fresh_norm is None:
            return None
        carried = self.b.op("Mul", self.norms[x], self.walk.c(gain))
        return self.b.op("Mul", self.b.op("Add", carried, fresh_norm), self.walk.c(_safety()))

    def add(self, node: ir.Node, fresh: ir.Value) -> ir.Value | None:
        """N of a sum: the replicated norms of its perturbed terms plus ||fresh||_2."""
        out = node.outputs[0]
        perturbed = [v for v in node.inputs if v is not None and v in self.walk.errors]
        try:
            ok = node.op_type in ("Add", "Sub") and self.accepts(node) and all(v in self.norms for v in perturbed)
        except (TypeError, IndexError, ValueError):
            ok = False
        fresh_norm = self.l2(fresh, out) if ok else None
        if fresh_norm is None:
            return None
        total = fresh_norm
        for v in perturbed:
            total = self.b.op("Add", total, self.b.op("Mul", self.norms[v],
                                                      self.walk.c(self.geo.replication(v, out) * _safety())))
        return self.b.op("Mul", total, self.walk.c(_safety()))


def _safety() -> float:
    from .rounding import SAFETY
    return SAFETY


# ---- magnitudes over L2 balls, per element -------------------------------------------------------------------

ELEMENTWISE_1_LIPSCHITZ = ("Relu", "Identity", "Neg", "Abs", "Dropout", "Clip")


def element_spreads(node: ir.Node, lipschitz: dict, spreads: dict, batched: bool, reach: dict) -> list:
    """For each output of `node`, how far each element can move over an L2 ball of radius 1 around the centre
    (a float64 array of the per-sample shape, rounded up), or None. graphcert.rounding's magnitudes over a
    ball are |v(centre)| + radius·spread; without an array the spread is v's Lipschitz constant K[v], the same
    for every element. A linear output z_j = w_j·h + b_j moves by at most ||w_j||_2·K[h]·radius, usually far
    less than K[z] = ||W||_2·K[h]; element-wise 1-Lipschitz ops and reshapes keep their input's arrays.
    For linear ops `reach[z]` gets ||w_j||_2·K[h] itself: it also bounds sum_i |w_ji|·|h_i(x) - h_i(centre)|,
    which is what the rounding of the sum w_j·h scales with (graphcert.rounding._linear).
    Disjoint max pooling takes each window's largest spread, Concat concatenates."""
    out = node.outputs[0]
    dims = static_shape(out)
    dims = dims[1:] if batched else dims
    if len(node.outputs) != 1 or not all(isinstance(d, int) for d in dims):
        return [None] * len(node.outputs)
    op, x = node.op_type, node.inputs[0]
    found = None
    try:
        weight = node.inputs[1].const_value.numpy().astype(np.float64) if op in ("Gemm", "MatMul", "Conv") \
            and node.inputs[1].const_value is not None else None
        k = lipschitz.get(x.name)
        if op == "Gemm" and weight is not None and k is not None and weight.ndim == 2 \
                and not _attr(node, "transA", 0):
            axis = 1 if _attr(node, "transB", 0) else 0
            found = abs(_attr(node, "alpha", 1.0)) * np.sqrt((weight ** 2).sum(axis=axis)) * k
        elif op == "MatMul" and weight is not None and k is not None and weight.ndim == 2 \
                and node.inputs[1].const_value is not None and x.const_value is None:
            found = np.sqrt((weight ** 2).sum(axis=0)) * k
        elif op == "Conv" and weight is not None and k is not None and batched:
            channels = np.sqrt((weight.reshape(weight.shape[0], -1) ** 2).sum(axis=1)) * k
            found = channels.reshape(-1, *([1] * (len(dims) - 1)))
        elif op == "MaxPool" and x in spreads:
            found = _pooled(node, spreads[x])
        elif op == "Concat" and all(v in spreads for v in node.inputs):
            axis = _attr(node, "axis", 0) % len(static_shape(out)) - (1 if batched else 0)
            found = np.concatenate([np.broadcast_to(spreads[v], _dims(v, batched)) for v in node.inputs], axis=axis) \
                if axis >= 0 else None
        elif op in ELEMENTWISE_1_LIPSCHITZ or (op == "LeakyRelu" and abs(_attr(node, "alpha", 0.01)) <= 1):
            found = spreads.get(x)
        elif op in ("Flatten", "Reshape") and batched and x in spreads:
            found = spreads[x].reshape(-1) if spreads[x].size == int(np.prod(dims)) else None
            found = None if found is None else found.reshape(dims)
    except (AttributeError, TypeError, ValueError):
        found = None
    if found is None:
        return [None]
    found = np.broadcast_to(found, dims).astype(np.float64) * (1 + 1e-6) + np.finfo(np.float64).tiny
    if op in ("Gemm", "MatMul", "Conv"):
        reach[out] = found
    known = lipschitz.get(out.name)
    return [np.minimum(found, known) if known is not None else found]


def _dims(value: ir.Value, batched: bool) -> list:
    dims = static_shape(value)
    return dims[1:] if batched else dims


def _pooled(node: ir.Node, spread: np.ndarray) -> np.ndarray | None:
    """The largest spread of each window of an unpadded, undilated, floor-mode MaxPool (None otherwise)."""
    kernel = list(_attr(node, "kernel_shape", None) or [])
    strides = list(_attr(node, "strides", None) or [1] * len(kernel))
    pads, dilations = _attr(node, "pads", None), _attr(node, "dilations", None)
    if (not kernel or (pads and any(pads)) or (dilations and any(d != 1 for d in dilations))
            or _attr(node, "ceil_mode", 0) or _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
        return None
    axes = tuple(range(spread.ndim - len(kernel), spread.ndim))
    windows = np.lib.stride_tricks.sliding_window_view(spread, kernel, axis=axes)
    picked = windows[(slice(None),) * (spread.ndim - len(kernel)) + tuple(slice(None, None, s) for s in strides)]
    return picked.max(axis=tuple(range(spread.ndim, picked.ndim)))


def _attr(node: ir.Node, name: str, default):
    from .interpret import attr
    return attr(node, name, default)
