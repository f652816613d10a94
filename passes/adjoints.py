"""Backward rules for linear bound propagation: one rule per op type, each the adjoint of the op.

A coefficient tensor for a tensor t has shape [rows, *shape(t)]: the objective rows first, then t's own
shape including its batch dimension (a batch of 1 broadcasts until a per-sample relaxation is met). A rule
gets the coefficients of the node's output and returns (input value, coefficients of that input) pairs;
pairs for values that do not depend on the perturbed inputs (biases, constants, intercepts) become bias
terms sum(coefficients · value).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.builder import Builder
from graphcert.interpret import attr, registrar
from graphcert.model import static_shape
from graphcert.ops import WindowGeometry

ADJOINTS: dict = {}
adjoint = registrar(ADJOINTS)


def Geometry(node: ir.Node, spatial_in: list[int], kernel: list[int]) -> WindowGeometry:  # noqa: N802
    """Strides, explicit pads and dilations of a sliding-window op (graphcert.ops holds the one implementation)."""
    return WindowGeometry.of(node, spatial_in, kernel)


def trailing(value: ir.Value) -> list[int]:
    """All dimensions after the first (channels and spatial dims of a batched image tensor)."""
    return [int(d) for d in static_shape(value)[1:]]


def last_dimension(value: ir.Value) -> int | None:
    """The length of value's last axis when the shape says it (None otherwise)."""
    dims = static_shape(value) if value.shape is not None else []
    return dims[-1] if dims and isinstance(dims[-1], int) else None


def fold_leading(b: Builder, coef: ir.Value, dims: list[int]) -> ir.Value:
    """[rows, n, *dims] -> [rows·n, *dims], for ops that take one batch axis (Conv and friends)."""
    return b.op("Reshape", coef, b.ints([-1, *dims]))


def unfold_leading(b: Builder, flat: ir.Value, like: ir.Value, dims: list[int]) -> ir.Value:
    """Inverse of `fold_leading`, taking rows and batch from the coefficient tensor `like`."""
    leading = b.op("Shape", like, start=0, end=2)
    return b.op("Reshape", flat, b.op("Concat", leading, b.ints(dims), axis=0))


def swap_last_two(b: Builder, value: ir.Value) -> ir.Value:
    rank = len(value.shape)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.op("Transpose", value, perm=perm)


def unbroadcast(b: Builder, coef: ir.Value, value: ir.Value, out: ir.Value) -> ir.Value:
    """Coefficients of `out` -> of `value`, which was broadcast to out's shape: sum over broadcast axes."""
    have, want = static_shape(value), static_shape(out)
    if have == want:
        return coef
    extra = len(want) - len(have)
    if extra:
        coef = b.reduce("ReduceSum", coef, list(range(1, 1 + extra)), keepdims=0)
    axes = [1 + i for i, (h, w) in enumerate(zip(have, want[extra:])) if h == 1 and w != 1]
    return b.reduce("ReduceSum", coef, axes, keepdims=1) if axes else coef


def reshape_like(b: Builder, coef: ir.Value, value: ir.Value, batched: bool) -> ir.Value:
    """Coefficients reshaped to [rows, *shape(value)]; rows (and batch) are copied from coef."""
    dims = static_shape(value)
    sample = dims[1:] if batched else dims
    target = [0] * (2 if batched else 1) + [d if isinstance(d, int) else -1 for d in sample]
    return b.op("Reshape", coef, b.ints(target))


# ---- ops that only move elements ------------------------------------------------------------------------

@adjoint("Identity", "Dropout")
def _identity(cx, node, coef):
    return [(node.inputs[0], coef)]


@adjoint("Flatten", "Reshape")
def _reshape(cx, node, coef):
    return [(node.inputs[0], reshape_like(cx.b, coef, node.inputs[0], cx.batched))]


@adjoint("Transpose")
def _transpose(cx, node, coef):
    rank = len(node.inputs[0].shape)
    perm = attr(node, "perm", None) or list(reversed(range(rank)))
    inverse = np.argsort(perm)
    return [(node.inputs[0], cx.b.op("Transpose", coef, perm=[0] + [1 + int(i) for i in inverse]))]


def _axes(node: ir.Node, rank: int) -> list[int] | None:
    """Squeeze/Unsqueeze axes (an input since opset 13, normalised models are at 17), None when absent."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    return sorted(int(a) % rank for a in node.inputs[1].const_value.numpy())


@adjoint("Squeeze")
def _squeeze(cx, node, coef):
    x = node.inputs[0]
    dims = static_shape(x)
    axes = _axes(node, len(dims))
    if axes is None:
        axes = [i for i, d in enumerate(dims) if d == 1]
    return [(x, cx.b.op("Unsqueeze", coef, cx.b.ints([1 + a for a in axes])))]


@adjoint("Unsqueeze")
def _unsqueeze(cx, node, coef):
    axes = _axes(node, len(node.outputs[0].shape))
    return [(node.inputs[0], cx.b.op("Squeeze", coef, cx.b.ints([1 + a for a in axes])))]


def pad_mode(node: ir.Node) -> str:
    mode = attr(node, "mode", "constant")
    return mode.decode() if isinstance(mode, bytes) else mode


def pad_axes(node: ir.Node) -> tuple[list[int], list[int], list[int]]:
    """(axes, pads at their starts, pads at their ends) of a Pad node with constant pads (and axes)."""
    rank = len(node.inputs[0].shape)
    pads = [int(p) for p in node.inputs[1].const_value.numpy()]
    axes = list(range(rank))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = [int(a) % rank for a in node.inputs[3].const_value.numpy()]
    return axes, pads[:len(axes)], pads[len(axes):]


def pad_copies(size: int, begin: int, end: int, mode: str) -> np.ndarray:
    """0/1 matrix [size + begin + end, size]: which input position each output position of a reflect, edge
    or wrap Pad copies along one axis (numpy's modes of these names are ONNX's)."""
    source = np.pad(np.arange(size), (begin, end), mode=mode)
    return (source[:, None] == np.arange(size)[None, :]).astype(np.float32)


@adjoint("Pad")
def _pad(cx, node, coef):
    """Constant mode: the adjoint crops the padding away, and a non-zero pad value contributes
    value·(sum of cropped coefs). Other modes copy input elements: per padded axis, the coefficients of all
    output positions copying one input position are summed (a product with the transposed copy matrix)."""
    b = cx.b
    x = node.inputs[0]
    axes, begins, ends = pad_axes(node)
    mode = pad_mode(node)
    if mode != "constant":
        dims = static_shape(x)
        for axis, begin, end in zip(axes, begins, ends):
            if begin or end:
                copies = b.const(pad_copies(int(dims[axis]), begin, end, mode))
                coef = _along_axis(b, coef, 1 + axis, 1 + len(dims), copies)
        return [(x, coef)]
    ends_at = [-e if e > 0 else np.iinfo(np.int64).max for e in ends]
    cropped = b.op("Slice", coef, b.ints(begins), b.ints(ends_at), b.ints([1 + a for a in axes]))
    pairs = [(x, cropped)]
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is not None and value.const_value is not None and float(value.const_value.numpy().reshape(-1)[0]) != 0:
        pairs += [(value, coef), (value, b.op("Neg", cropped))]
    return pairs


def _along_axis(b: Builder, coef: ir.Value, axis: int, rank: int, matrix: ir.Value) -> ir.Value:
    """Contract `axis` of coef (of rank `rank`) with the rows of matrix [n, k]; the axis becomes k long."""
    if axis == rank - 1:
        return b.op("MatMul", coef, matrix)
    swap = list(range(rank))
    swap[axis], swap[-1] = swap[-1], swap[axis]
    return b.op("Transpose", b.op("MatMul", b.op("Transpose", coef, perm=swap), matrix), perm=swap)


@adjoint("Concat")
def _concat(cx, node, coef):
    out = node.outputs[0]
    axis = attr(node, "axis") % len(out.shape)
    sizes = [int(static_shape(v)[axis]) for v in node.inputs]
    parts = cx.b.op("Split", coef, cx.b.ints(sizes), axis=axis + 1, num_outputs=len(sizes))
    parts = parts if len(sizes) > 1 else [parts]
    return list(zip(node.inputs, parts))


# ---- linear ops ------------------------------------------------------------------------------------------

@adjoint("Gemm")
def _gemm(cx, node, coef):
    b = cx.b
    x, w = node.inputs[0], node.inputs[1]
    alpha = attr(node, "alpha", 1.0)
    rows = w if attr(node, "transB", 0) else b.op("Transpose", w, perm=[1, 0])   # [n, k]
    back = cx.identity_product(coef, rows if alpha == 1.0 else b.op("Mul", rows, b.const(alpha)))
    if back is None:
        back = cx.live_product(coef, rows, last_dimension(x))
        if alpha != 1.0:
            back = b.op("Mul", back, b.const(alpha))
    pairs = [(x, back)]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        beta = attr(node, "beta", 1.0)
        pairs.append((node.inputs[2], coef if beta == 1.0 else b.op("Mul", coef, b.const(beta))))
    return pairs


@adjoint("MatMul")
def _matmul(cx, node, coef):
    b = cx.b
    left, right = node.inputs
    if left in cx.perturbed:                       # y = x·W
        if len(right.shape) == 1:
            return [(left, b.op("Mul", b.op("Unsqueeze", coef, b.ints([-1])), right))]
        rows = swap_last_two(b, right)
        if len(right.shape) != 2:
            return [(left, b.op("MatMul", coef, rows))]
        back = cx.identity_product(coef, rows)
        return [(left, back if back is not None else cx.live_product(coef, rows, last_dimension(left)))]
    if len(right.shape) == 1:                      # y = P·u with a vector u
        return [(right, b.op("MatMul", coef, left))]
    if len(left.shape) == 1:
        return [(right, b.op("Mul", b.op("Unsqueeze", coef, b.ints([-2])), b.op("Unsqueeze", left, b.ints([-1]))))]
    return [(right, b.op("MatMul", swap_last_two(b, left), coef))]


@adjoint("Conv", "ConvTranspose")
def _convolution(cx, node, coef):
    """A convolution's adjoint is the transposed convolution with the same weights and geometry, and the
    other way round; a bias b adds b·coef summed over each channel's positions."""
    b = cx.b
    x, w = node.inputs[0], node.inputs[1]
    shape_in, shape_out = trailing(x), trailing(node.outputs[0])
    geometry = Geometry(node, shape_in[1:], [int(d) for d in static_shape(w)[2:]])
    folded = fold_leading(b, coef, shape_out)
    if node.op_type == "Conv":
        back = b.op("ConvTranspose", folded, w, group=attr(node, "group", 1),
                    output_padding=geometry.output_padding(shape_out[1:]), **geometry.attributes())
    else:
        back = b.op("Conv", folded, w, group=attr(node, "group", 1), **geometry.attributes())
    pairs = [(x, unfold_leading(b, back, coef, shape_in))]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        spatial = len(shape_in) - 1
        pairs.append((b.op("Unsqueeze", node.inputs[2], b.ints(list(range(1, 1 + spatial)))), coef))
    return pairs


@adjoint("BatchNormalization")
def _batchnorm(cx, node, coef):
    """Inference mode: y = g·x + h per channel, g = scale/sqrt(var + eps), h = bias - mean·g."""
    b = cx.b
    x, scale, bias, mean, var = node.inputs[:5]
    spatial = len(x.shape) - 2
    gain = b.op("Div", scale, b.op("Sqrt", b.op("Add", var, b.const(attr(node, "epsilon", 1e-5)))))
    shift = b.op("Sub", bias, b.op("Mul", mean, gain))
    if spatial:
        axes = b.ints(list(range(1, 1 + spatial)))
        gain, shift = b.op("Unsqueeze", gain, axes), b.op("Unsqueeze", shift, axes)
    return [(x, b.op("Mul", coef, gain)), (shift, coef)]


@adjoint("AveragePool")
def _average_pool(cx, node, coef):
    """A depthwise convolution with weights 1/count: the adjoint is its transposed convolution."""
    b = cx.b
    x = node.inputs[0]
    shape_in, shape_out = trailing(x), trailing(node.outputs[0])
    channels, kernel = shape_in[0], [int(k) for k in attr(node, "kernel_shape")]
    geometry = Geometry(node, shape_in[1:], kernel)
    ones = b.const(np.ones([channels, 1, *kernel], dtype=np.float32))
    if attr(node, "count_include_pad", 0) or not any(geometry.pads):
        scaled = b.op("Mul", coef, b.const(1.0 / float(np.prod(kernel))))
    else:
        # Border windows average over fewer inputs: count them with the same window over ones.
        count = b.op("Conv", b.const(np.ones([1, 1, *shape_in[1:]], dtype=np.float32)),
                     b.const(np.ones([1, 1, *kernel], dtype=np.float32)), **geometry.attributes())
        scaled = b.op("Div", coef, b.op("Squeeze", count, b.ints([0])))
    back = b.op("ConvTranspose", fold_leading(b, scaled, shape_out), ones, group=channels,
                output_padding=geometry.output_padding(shape_out[1:]), **geometry.attributes())
    return [(x, unfold_leading(b, back, coef, shape_in))]


@adjoint("GlobalAveragePool")
def _global_average_pool(cx, node, coef):
    spatial = trailing(node.inputs[0])[1:]
    spread = np.full(spatial, 1.0 / float(np.prod(spatial)), dtype=np.float32)
    return [(node.inputs[0], cx.b.op("Mul", coef, cx.b.const(spread)))]


def reduced_axes(node: ir.Node) -> list[int] | None:
    """ReduceMean/ReduceSum axes (attribute before opset 18, input after), None for "all" or unknown."""
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = node.inputs[1].const_value.numpy() if node.inputs[1].const_value is not None else None
    else:
        axes = attr(node, "axes", None)
    if axes is None or rank is None or len(axes) == 0:
        return None
    return sorted(int(a) % rank for a in axes)


@adjoint("ReduceMean", "ReduceSum")
def _reduce(cx, node, coef):
    """Every reduced input element gets the output's coefficient (divided by the count for a mean)."""
    b = cx.b
    x = node.inputs[0]
    dims = static_shape(x)
    axes = reduced_axes(node)
    if not attr(node, "keepdims", 1):
        coef = b.op("Unsqueeze", coef, b.ints([1 + a for a in axes]))
    spread = [int(dims[i]) if i in axes else 1 for i in range(len(dims))]
    weight = 1.0 / float(np.prod(spread)) if node.op_type == "ReduceMean" else 1.0
    return [(x, b.op("Mul", coef, b.const(np.full(spread, weight, dtype=np.float32))))]


# ---- elementwise arithmetic -------------------------------------------------------------------------------

@adjoint("Add", "Sum")
def _add(cx, node, coef):
    out = node.outputs[0]
    return [(v, cx.fit(coef, v, out)) for v in node.inputs]


@adjoint("Sub")
def _sub(cx, node, coef):
    out = node.outputs[0]
    x, y = node.inputs
    return [(x, cx.fit(coef, x, out)), (y, cx.fit(cx.b.op("Neg", coef), y, out))]


@adjoint("Neg")
def _neg(cx, node, coef):
    return [(node.inputs[0], cx.b.op("Neg", coef))]


@adjoint("Mul")
def _mul(cx, node, coef):
    x, y = node.inputs
    if x not in cx.perturbed:
        x, y = y, x
    return [(x, unbroadcast(cx.b, cx.b.op("Mul", coef, y), x, node.outputs[0]))]


@adjoint("Div")
def _div(cx, node, coef):
    x, y = node.inputs
    return [(x, unbroadcast(cx.b, cx.b.op("Div", coef, y), x, node.outputs[0]))]
