"""IBP rules of the linear and bilinear ops: the center goes through the op, the radius through |op|; a product
of two bounded tensors (MatMul, Gemm, Conv with a bounded weight, Einsum) by Rump's midpoint-radius rule."""
from __future__ import annotations

import numpy as np

from graphcert import interval as iv
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.passes.ibp_core import both_forms, rule


def _bilinear(b, op, a: Interval, w: Interval) -> Interval:
    """op(a, w) for an op linear in each argument: |ca|·rw + ra·|cw| + ra·rw bounds the deviation from op(ca, cw)."""
    radius = b.op("Add", b.op("Add", op(b.op("Abs", a.center), w.radius), op(a.radius, b.op("Abs", w.center))),
                  op(a.radius, w.radius))
    return Interval.from_center(b, op(a.center, w.center), radius)


# ---- linear ops: center through the op, radius through |op| --------------------------------------------

@rule("MatMul")
def _matmul(cx, node, a, w):
    b = cx.b
    if isinstance(a, Interval) and isinstance(w, Interval):
        return [_bilinear(b, lambda p, q: b.op("MatMul", p, q), a, w)]
    if isinstance(a, Interval):
        c, r, k = a.scaled_center_radius()
        return [Interval.from_center(b, b.op("MatMul", c, cx.scaled(w, k)), b.op("MatMul", r, cx.abs(w, k)))]
    c, r, k = w.scaled_center_radius()
    return [Interval.from_center(b, b.op("MatMul", cx.scaled(a, k), c), b.op("MatMul", cx.abs(a, k), r))]


@rule("Gemm")
def _gemm(cx, node, a, w, bias=None):
    b = cx.b
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    if isinstance(a, Interval) and not isinstance(w, Interval) and not isinstance(bias, Interval):
        c, r, k = a.scaled_center_radius()
        given = [c, w, *([bias] if bias is not None else [])]
        # At k = 1 the center is the original node itself, which onnxruntime merges with it (one product less).
        center = b.copy(node, given) if k == 1.0 else b.op("Gemm", *given, alpha=alpha * k, beta=beta,
                                                          transA=trans_a, transB=trans_b)
        radius = b.op("Gemm", r, cx.abs(w), alpha=abs(alpha) * k, transA=trans_a, transB=trans_b)
        return [Interval.from_center(b, center, radius)]
    # General case from the pieces: alpha·op(A)·op(B) + beta·C with interval products.
    def oriented(x, transpose):
        if not transpose:
            return x
        if isinstance(x, Interval):
            return both_forms(cx, x, lambda v: b.op("Transpose", v, perm=[1, 0]))
        return b.op("Transpose", x, perm=[1, 0])
    product = _matmul(cx, node, oriented(a, trans_a), oriented(w, trans_b))[0]
    result = _scale(cx, product, alpha)
    if bias is not None:
        result = iv.add(b, result, _scale(cx, iv.as_interval(b, bias), beta))
    return [result]


def _scale(cx, x: Interval, factor: float) -> Interval:
    if factor == 1.0:
        return x
    k = cx.b.const(factor)
    return Interval.from_center(cx.b, cx.b.op("Mul", x.center, k), cx.b.op("Mul", x.radius, cx.b.const(abs(factor))))


@rule("Conv", "ConvTranspose")
def _conv(cx, node, x, w, bias=None):
    b = cx.b
    if isinstance(w, Interval) or not isinstance(x, Interval):
        # A bounded (computed or perturbed) weight: the product of two intervals.
        out = _bilinear(b, lambda p, q: b.copy(node, [p, q]), iv.as_interval(b, x), iv.as_interval(b, w))
        if bias is not None:
            out = iv.add(b, out, _per_channel(cx, node, iv.as_interval(b, bias)))
        return [out]
    if isinstance(bias, Interval):
        out = _conv(cx, node, x, w)[0]
        return [iv.add(b, out, _per_channel(cx, node, bias))]
    c, r, k = x.scaled_center_radius()
    center = b.copy(node, [c, cx.scaled(w, k)] + ([bias] if bias is not None else []))
    radius = b.copy(node, [r, cx.abs(w, k)])
    return [Interval.from_center(b, center, radius)]


def _per_channel(cx, node, v: Interval) -> Interval:
    """A [C] parameter as [C, 1, ...] to broadcast against [N, C, spatial...]."""
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 4
    shape = cx.b.ints([-1] + [1] * (rank - 2))
    return both_forms(cx, v, lambda t: cx.b.op("Reshape", t, shape))


def _batchnorm_supported(node) -> bool:
    """Inference mode, or training mode with static sizes along every axis but the channel."""
    from graphcert.passes.ibp_rules_norms import batch_statistics_supported
    return attr(node, "training_mode", 0) == 0 or batch_statistics_supported(node)


@rule("BatchNormalization", accepts=_batchnorm_supported)
def _batchnorm(cx, node, x, scale, bias, mean, var):
    if attr(node, "training_mode", 0):  # the batch's own statistics: passes/ibp_rules_norms.py
        from graphcert.passes.ibp_rules_norms import batch_statistics_norm
        return batch_statistics_norm(cx, node, x, scale, bias, mean, var)
    b = cx.b
    eps = attr(node, "epsilon", 1e-5)
    params = (scale, bias, mean, var)
    if any(isinstance(p, Interval) for p in params):
        # Bounded parameters: (x - mean) · scale / sqrt(var + eps) + bias, factor by factor.
        s, bi, m, v = (_per_channel(cx, node, iv.as_interval(b, p)) for p in params)
        inv_std = Interval.from_bounds(  # decreasing in var; a negative variance is invalid (clipped to 0)
            b, b.op("Reciprocal", b.op("Sqrt", b.op("Add", b.op("Relu", v.upper), b.const(eps)))),
            b.op("Reciprocal", b.op("Sqrt", b.op("Add", b.op("Relu", v.lower), b.const(eps)))))
        gain = iv.mul(b, s, inv_std)
        return [iv.add(b, iv.mul(b, iv.sub(b, iv.as_interval(b, x), m), gain), bi)]
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 4
    per_channel = [-1] + [1] * (rank - 2)
    consts = [cx.constant(v) for v in (scale, var)]
    if all(c is not None for c in consts):
        gain = b.const(np.abs(consts[0] / np.sqrt(consts[1] + eps)).reshape(per_channel))
    else:
        gain = b.op("Reshape", b.op("Abs", b.op("Div", scale, b.op("Sqrt", b.op("Add", var, b.const(eps))))),
                    b.ints(per_channel))
    center = b.copy(node, [x.center, scale, bias, mean, var])
    return [Interval.from_center(b, center, b.op("Mul", x.radius, gain))]



@rule("DFT")
def _dft(cx, node, x, dft_length=None, axis_input=None):
    """Linear in the input with coefficients cos and sin of modulus at most 1 (1/n for the inverse): the centre
    through the op, every output's radius the sum of all input radii (real and imaginary parts), plus 4 ulps
    per term of sum(|c| + r) for the rounding of the runtime's transform."""
    from graphcert.passes.ibp_rules_elementwise import refuse
    b = cx.b
    if isinstance(dft_length, Interval) or isinstance(axis_input, Interval):
        refuse(node, "its length or axis depends on the perturbed input")
    x = iv.as_interval(b, x)
    shape = node.inputs[0].shape
    rank = len(shape) if shape is not None else None
    axis = attr(node, "axis", 1)
    if axis_input is not None:
        given = axis_input.const_value
        if given is None or rank is None:
            refuse(node, "an axis not known when converting")
        axis = int(given.numpy().reshape(-1)[0])
    if rank is None or not isinstance(shape[axis % rank], int):
        refuse(node, "a signal axis of unknown length")
    axis %= rank
    length = dft_length.const_value if dft_length is not None else None
    if dft_length is not None and length is None:
        refuse(node, "a length not known when converting")
    transform = shape[axis] if length is None else int(length.numpy().reshape(-1)[0])  # the inverse divides by it
    n = max(shape[axis], transform)
    center = b.copy(node, [x.center, dft_length, axis_input][:len(node.inputs)])
    axes = [axis, rank - 1]
    radius = b.reduce("ReduceSum", x.radius, axes)
    magnitude = b.reduce("ReduceSum", b.op("Add", b.op("Abs", x.center), x.radius), axes)
    total = b.op("Add", radius, b.op("Mul", magnitude, b.const(4.0 * n * 2.0 ** -24)))
    if attr(node, "inverse", 0) and not attr(node, "onesided", 0):
        total = b.op("Mul", total, b.const(1.0 / transform))
    return [Interval.from_center(b, center, b.op("Expand", total, b.op("Shape", center)))]


# Determinants of matrices up to this size are bounded by their permutation expansion (n! products).
DET_LIMIT = 3


@rule("Det")
def _det(cx, node, x):
    """Leibniz's sum over permutations of signed products of entries, in interval arithmetic, widened by
    16·n! ulps of the sum of |products| for the runtime's LU factorisation."""
    import itertools

    from graphcert.passes.ibp_rules_elementwise import refuse
    b = cx.b
    shape = node.inputs[0].shape
    if shape is None or len(shape) < 2 or not isinstance(shape[-1], int) or shape[-1] != shape[-2] or \
            shape[-1] > DET_LIMIT:
        refuse(node, f"determinants of static square matrices up to {DET_LIMIT}x{DET_LIMIT} only")
    n = shape[-1]
    x = iv.as_interval(b, x)

    def entry(v, i, j):
        picked = b.op("Gather", b.op("Gather", v, b.ints([i]), axis=-2), b.ints([j]), axis=-1)
        return b.op("Squeeze", picked, b.ints([-2, -1]))
    entries = {(i, j): Interval.from_bounds(b, entry(x.lower, i, j), entry(x.upper, i, j))
               for i in range(n) for j in range(n)}
    total, size = None, None
    for permutation in itertools.permutations(range(n)):
        product = entries[0, permutation[0]]
        for i in range(1, n):
            product = iv.mul(b, product, entries[i, permutation[i]])
        inversions = sum(permutation[i] > permutation[j] for i in range(n) for j in range(i + 1, n))
        total = product if total is None else (iv.sub(b, total, product) if inversions % 2 else iv.add(b, total, product))
        if total is product and inversions % 2:
            total = iv.neg(b, product)
        magnitude = iv.absolute(b, product).upper
        size = magnitude if size is None else b.op("Add", size, magnitude)
    slack = b.op("Mul", size, b.const(16.0 * len(list(itertools.permutations(range(n)))) * 2.0 ** -24))
    return [Interval.from_bounds(b, b.op("Sub", total.lower, slack), b.op("Add", total.upper, slack))]
