"""Textbook interval bound propagation in numpy, independent of graphcert, to check the IBP pass against.

It reads the ONNX graph as the exporter wrote it (initializers and attributes straight from the protobuf) and
carries every perturbed tensor as a (lower, upper) pair in float64. Affine layers split their weights by sign,
W = W+ + W-, so that lower' = W+ lower + W- upper + b and upper' = W+ upper + W- lower + b; convolutions go
through im2col; non-decreasing activations and max pooling apply to each end; BatchNormalization is the
per-channel affine map it computes at inference.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def reference_bounds(proto: onnx.ModelProto, lower: np.ndarray, upper: np.ndarray) -> dict[str, tuple]:
    """Bounds of every graph output when the model's single input ranges over the box [lower, upper]."""
    constants = {init.name: _widened(numpy_helper.to_array(init)) for init in proto.graph.initializer}
    (data_input,) = [v.name for v in proto.graph.input if v.name not in constants]
    boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {
        data_input: (np.asarray(lower, np.float64), np.asarray(upper, np.float64))}
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            constants[node.output[0]] = _widened(numpy_helper.to_array(attrs["value"]))
            continue
        args = [boxes.get(name, constants.get(name)) if name else None for name in node.input]
        if node.op_type not in _RULES:
            raise NotImplementedError(f"the reference has no rule for {node.op_type}")
        boxes[node.output[0]] = _RULES[node.op_type](attrs, *args)
    return {out.name: boxes[out.name] for out in proto.graph.output}


def _widened(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if array.dtype.kind == "f" else array


def _is_box(x) -> bool:
    return isinstance(x, tuple)


def _split(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(w, 0.0), np.minimum(w, 0.0)


def _right_affine(box, w: np.ndarray, bias=0.0):
    """x @ w + bias for x in the box."""
    (lo, hi), (pos, neg) = box, _split(w)
    return lo @ pos + hi @ neg + bias, hi @ pos + lo @ neg + bias


def _scale(box, k):
    """Elementwise x * k for a constant k."""
    lo, hi = box
    return np.minimum(lo * k, hi * k), np.maximum(lo * k, hi * k)


def _each_end(function):
    return lambda attrs, box, *rest: (function(attrs, box[0], *rest), function(attrs, box[1], *rest))


def _gemm(attrs, a, b, c=None):
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if not _is_box(a) or _is_box(b) or _is_box(c):
        raise NotImplementedError("the reference bounds Gemm with a perturbed first input only")
    if attrs.get("transA", 0):
        a = (a[0].T, a[1].T)
    weight = alpha * (b.T if attrs.get("transB", 0) else b)
    return _right_affine(a, weight, 0.0 if c is None else beta * c)


def _matmul(attrs, a, b):
    if not _is_box(a) or _is_box(b):
        raise NotImplementedError("the reference bounds MatMul with a perturbed first input only")
    return _right_affine(a, b)


def _add(attrs, x, y):
    if _is_box(x) and _is_box(y):
        return x[0] + y[0], x[1] + y[1]
    box, k = (x, y) if _is_box(x) else (y, x)
    return box[0] + k, box[1] + k


def _sub(attrs, x, y):
    return _add(attrs, x, (-y[1], -y[0]) if _is_box(y) else -y)


def _mul(attrs, x, y):
    box, k = (x, y) if _is_box(x) else (y, x)
    return _scale(box, k)


def _div(attrs, x, y):
    if _is_box(y):
        raise NotImplementedError("the reference divides by constants only")
    return _scale(x, 1.0 / y)


def _im2col(x: np.ndarray, kernel, strides, pads, dilations, fill: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Patches of an [N, C, H, W] tensor as [N, C*kh*kw, out_h*out_w]."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    n, c, h, w = x.shape
    padded = np.full((n, c, h + pads[0] + pads[2], w + pads[1] + pads[3]), fill, dtype=x.dtype)
    padded[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + w] = x
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    columns = np.empty((n, c, kh, kw, out_h, out_w), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            columns[:, :, i, j] = padded[:, :, i * dh:i * dh + sh * out_h:sh, j * dw:j * dw + sw * out_w:sw]
    return columns.reshape(n, c * kh * kw, out_h * out_w), (out_h, out_w)


def _geometry(attrs):
    """Strides, pads (top, left, bottom, right) and dilations of a 2-D window op."""
    return attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0]), attrs.get("dilations", [1, 1])


def _conv(attrs, x, w, bias=None):
    if attrs.get("group", 1) != 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("the reference convolves with group 1 and explicit pads only")
    out_channels = w.shape[0]
    pos, neg = _split(w.reshape(out_channels, -1))
    lo_cols, shape = _im2col(x[0], w.shape[2:], *_geometry(attrs), fill=0.0)
    hi_cols, _ = _im2col(x[1], w.shape[2:], *_geometry(attrs), fill=0.0)
    bias = 0.0 if bias is None else bias.reshape(1, -1, 1)
    lower = pos @ lo_cols + neg @ hi_cols + bias
    upper = pos @ hi_cols + neg @ lo_cols + bias
    n = x[0].shape[0]
    return lower.reshape(n, out_channels, *shape), upper.reshape(n, out_channels, *shape)


def _max_pool_end(attrs, x):
    if attrs.get("ceil_mode", 0):
        raise NotImplementedError("the reference pools with ceil_mode 0 only")
    channels_apart = x.reshape(-1, 1, *x.shape[2:])
    columns, shape = _im2col(channels_apart, attrs["kernel_shape"], *_geometry(attrs), fill=-np.inf)
    return columns.max(axis=1).reshape(*x.shape[:2], *shape)


def _batch_norm(attrs, x, scale, bias, mean, var):
    gain = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
    per_channel = (1, -1) + (1,) * (x[0].ndim - 2)
    lo, hi = _scale(x, gain.reshape(per_channel))
    shift = (bias - gain * mean).reshape(per_channel)
    return lo + shift, hi + shift


def _flatten_end(attrs, x):
    axis = attrs.get("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape_end(attrs, x, shape):
    target = [x.shape[i] if d == 0 else d for i, d in enumerate(shape.tolist())]
    return x.reshape(target)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _elu(attrs, v):
    return np.where(v > 0, v, attrs.get("alpha", 1.0) * (np.exp(np.minimum(v, 0.0)) - 1.0))


_RULES = {
    "Gemm": _gemm, "MatMul": _matmul, "Add": _add, "Sub": _sub, "Mul": _mul, "Div": _div, "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "MaxPool": _each_end(_max_pool_end),
    "Flatten": _each_end(_flatten_end),
    "Reshape": _each_end(_reshape_end),
    "Transpose": _each_end(lambda attrs, v: v.transpose(attrs.get("perm"))),
    "Relu": _each_end(lambda attrs, v: np.maximum(v, 0.0)),
    "Sigmoid": _each_end(lambda attrs, v: _sigmoid(v)),
    "Tanh": _each_end(lambda attrs, v: np.tanh(v)),
    "LeakyRelu": _each_end(lambda attrs, v: np.where(v >= 0, v, attrs.get("alpha", 0.01) * v)),
    "Elu": _each_end(_elu),
    "Softplus": _each_end(lambda attrs, v: np.logaddexp(0.0, v)),
}
