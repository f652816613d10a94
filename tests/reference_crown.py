"""A straightforward dense-numpy CROWN for ReLU MLPs, independent of the bound-graph code, for equality tests.

The network is read from a normalised model as affine layers (Gemm, MatMul + Add, and elementwise Sub/Add/
Mul/Div by constants, folded into the layers) with ReLU between them. Bounds follow Zhang et al. 2018: every
pre-activation is bounded by a backward pass with adaptive lower slopes (1 where u > -l, else 0), intersected
with interval arithmetic on the already tightened bounds, exactly as `passes.crown` promises to do.
"""
from __future__ import annotations

import numpy as np

from graphcert.interpret import attr


def affine_layers(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W [out, in], b [out])] with a ReLU after every layer but the last, from a normalised ir.Model."""
    layers: list[list[np.ndarray]] = []
    weight, bias = None, None  # the affine map accumulated since the last ReLU (None: identity so far)

    def then(w_next: np.ndarray | None, b_next: np.ndarray):
        """Compose the accumulated map with x -> w_next·x + b_next (w_next None: the identity)."""
        nonlocal weight, bias
        if w_next is not None:
            weight = w_next if weight is None else w_next @ weight
            bias = None if bias is None else w_next @ bias
        bias = b_next if bias is None else bias + b_next

    def const(value):
        return value.const_value.numpy().astype(np.float64)

    for node in model.graph:
        op = node.op_type
        if op in ("Reshape", "Flatten", "Identity"):
            continue
        if op == "Gemm":
            w = const(node.inputs[1])
            w = (w if attr(node, "transB", 0) else w.T) * attr(node, "alpha", 1.0)
            b = const(node.inputs[2]).reshape(-1) * attr(node, "beta", 1.0) if len(node.inputs) > 2 else 0.0
            then(w, np.broadcast_to(b, (w.shape[0],)).copy())
        elif op == "MatMul":
            w = const(node.inputs[1]).T
            then(w, np.zeros(w.shape[0]))
        elif op in ("Add", "Sub", "Mul", "Div"):
            c = const(node.inputs[1]).reshape(-1)
            if op == "Add":
                then(None, c)
            elif op == "Sub":
                then(None, -c)
            else:
                scale = c if op == "Mul" else 1.0 / c
                n = weight.shape[0] if weight is not None else len(scale)
                then(np.diag(np.broadcast_to(scale, (n,))), np.zeros(n))
        elif op == "Relu":
            layers.append([weight, bias])
            weight, bias = None, None
        else:
            raise ValueError(f"the reference reads ReLU MLPs only, not {op}")
    layers.append([weight, bias])
    n_in = next(w.shape[1] for w, _ in layers if w is not None)
    for layer in layers:  # a layer that is only a shift or nothing at all
        if layer[0] is None:
            n = len(layer[1]) if layer[1] is not None else n_in
            layer[0], layer[1] = np.eye(n), (layer[1] if layer[1] is not None else np.zeros(n))
        n_in = layer[0].shape[0]
    return [(w, b) for w, b in layers]


def _interval(w, b, lower, upper):
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    return w @ center + b - np.abs(w) @ radius, w @ center + b + np.abs(w) @ radius


def _relu_lines(lower, upper):
    """(lower slope, upper slope, upper intercept) per neuron."""
    active, dead = lower >= 0, upper <= 0
    unstable = ~active & ~dead
    upper_slope = np.where(active, 1.0, 0.0)
    upper_intercept = np.zeros_like(lower)
    width = np.where(unstable, upper - lower, 1.0)
    upper_slope = np.where(unstable, upper / width, upper_slope)
    upper_intercept = np.where(unstable, -upper * lower / width, upper_intercept)
    lower_slope = np.where(active, 1.0, np.where(dead, 0.0, (upper > -lower).astype(float)))
    return lower_slope, upper_slope, upper_intercept


def _backward(objective, layers, bounds, x_lower, x_upper):
    """Lower bounds of objective·z over the input box, z the output of the last of `layers`."""
    coef, bias = objective, np.zeros(objective.shape[0])
    for index in range(len(layers) - 1, -1, -1):
        w, b = layers[index]
        bias = bias + coef @ b
        coef = coef @ w
        if index == 0:
            break
        lower_slope, upper_slope, upper_intercept = _relu_lines(*bounds[index - 1])
        positive, negative = np.maximum(coef, 0), np.minimum(coef, 0)
        bias = bias + negative @ upper_intercept
        coef = positive * lower_slope + negative * upper_slope
    center, radius = (x_upper + x_lower) / 2, (x_upper - x_lower) / 2
    return coef @ center - np.abs(coef) @ radius + bias


def crown_bounds(layers, x_lower, x_upper):
    """Full CROWN (with IBP intersection) of the network output over the input box: (lower, upper)."""
    x_lower, x_upper = np.asarray(x_lower, np.float64).reshape(-1), np.asarray(x_upper, np.float64).reshape(-1)
    bounds = [_interval(*layers[0], x_lower, x_upper)]
    for k in range(1, len(layers)):
        ibp = _interval(*layers[k], np.maximum(bounds[-1][0], 0), np.maximum(bounds[-1][1], 0))
        n = layers[k][0].shape[0]
        found = _backward(np.concatenate([np.eye(n), -np.eye(n)]), layers[:k + 1], bounds, x_lower, x_upper)
        bounds.append((np.maximum(ibp[0], found[:n]), np.minimum(ibp[1], -found[n:])))
    return bounds[-1]


def with_objective(layers, matrix, offset=None):
    """The network followed by y -> matrix·y + offset, merged into its last layer (as the spec pass does)."""
    w, b = layers[-1]
    offset = np.zeros(len(matrix)) if offset is None else offset
    return layers[:-1] + [(matrix @ w, matrix @ b + offset)]
