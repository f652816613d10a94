"""IBP rules of resampling: Resize on a fixed grid, GridSample on a fixed or bounded grid.

Nearest and linear sampling take each output from input elements with non-negative weights that sum to one, so
an output lies between the smallest and the largest element it can read. With a fixed grid those are fixed
elements and the bounds map through the op; with a bounded grid, every element any grid point in the box can
reach (and the zero padding, where the box reaches outside) is a candidate.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert import interval as iv
from graphcert import ops
from graphcert.interpret import attr
from graphcert.interval import Interval
from graphcert.passes.ibp_core import constant_array, rule, sane, widened
from graphcert.passes.ibp_rules_elementwise import refuse

# A bounded grid compares every output position with every input position: beyond this many elements per
# bound, refuse rather than build it.
GRID_WINDOW_LIMIT = 1 << 25


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@rule("Resize", "Upsample")
def _resize(cx, node, x, *rest):
    """Nearest picks elements; linear interpolation weights are non-negative: bounds map to bounds."""
    if any(isinstance(r, Interval) for r in rest):
        refuse(node, "its roi, scales or sizes depend on the perturbed input (the output shape would vary)")
    mode = _text(attr(node, "mode", "nearest"))
    _check_align_corners(node, rest)
    if mode == "cubic" or (attr(node, "exclude_outside", 0) and mode != "nearest"):
        return [_by_matrices(cx, node, iv.as_interval(cx.b, x), rest)]
    if mode not in ("nearest", "linear", "bilinear"):
        refuse(node, f"mode {mode} is not one ONNX defines")
    x = iv.as_interval(cx.b, x)
    return [iv.monotone(cx.b, x, lambda v: cx.b.copy(node, [v, *rest]))]


def _check_align_corners(node, rest) -> None:
    """align_corners maps x_out to x_out·(in - 1)/(out - 1): with scales whose output size in·scale is not a
    whole number, runtimes disagree on `out` (onnxruntime floors it, onnx's reference keeps the fraction), so
    which elements are read is not defined: refuse rather than bound one reading."""
    if node.op_type != "Resize" or _text(attr(node, "coordinate_transformation_mode", "half_pixel")) != "align_corners":
        return
    sizes = constant_array(rest[2]) if len(rest) > 2 and rest[2] is not None else None
    if sizes is not None and sizes.size:
        return
    scales = constant_array(rest[1]) if len(rest) > 1 and rest[1] is not None else None
    shape = node.inputs[0].shape
    axes = attr(node, "axes")
    if scales is None or shape is None:
        refuse(node, "align_corners with scales or an input shape not known when converting (runtimes disagree "
                     "on fractional output sizes)")
    axes = list(axes) if axes is not None else list(range(len(shape)))
    for axis, scale in zip(axes, np.asarray(scales, dtype=np.float64).reshape(-1)):
        size = shape[axis]
        if scale == 1.0:
            continue
        if not isinstance(size, int) or not float(size * np.float32(scale)).is_integer():
            refuse(node, "align_corners with scales that give a fractional output size (runtimes disagree)")


def _by_matrices(cx, node, x: Interval, rest) -> Interval:
    """Resize with weights of either sign (cubic, or renormalised by exclude_outside) as the linear map it is:
    along each resized axis a constant matrix W (read off onnxruntime's own op on the identity, so the
    coordinate maps and weights are the runtime's), the centre through W, the radius through |W|, and a slack
    of 4 ulps per tap times |W|(|c| + r) for the rounding of both the runtime's sum and this one."""
    b = cx.b
    shape = node.inputs[0].shape
    matrices = _axis_matrices(node, shape, rest)
    taps = 1
    center, radius, magnitude = x.center, x.radius, b.op("Add", b.op("Abs", x.center), x.radius)
    rank = len(shape)
    for axis, w in matrices.items():
        perm = list(range(rank))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        taps *= int(np.count_nonzero(w, axis=1).max(initial=1))
        signed, absolute = b.const(w.T.astype(np.float32)), b.const(np.abs(w).T.astype(np.float32))
        along = lambda v, m: b.op("Transpose", b.op("MatMul", b.op("Transpose", v, perm=perm), m), perm=perm)  # noqa: E731
        center, radius, magnitude = along(center, signed), along(radius, absolute), along(magnitude, absolute)
    slack = b.op("Mul", magnitude, b.const(4.0 * taps * 2.0 ** -24))
    return Interval.from_center(b, center, b.op("Add", radius, slack))


def _axis_matrices(node, shape, rest) -> dict[int, np.ndarray]:
    """{axis: W [out, in]} for every axis the Resize changes, from onnxruntime's op on identity matrices."""
    if shape is None or attr(node, "axes") is not None or \
            _text(attr(node, "keep_aspect_ratio_policy", "stretch")) != "stretch" or \
            _text(attr(node, "coordinate_transformation_mode", "half_pixel")) == "tf_crop_and_resize":
        refuse(node, "cubic weights need a known input shape, no axes, stretch and no cropping")
    scales = constant_array(rest[1]) if len(rest) > 1 and rest[1] is not None else None
    sizes = constant_array(rest[2]) if len(rest) > 2 and rest[2] is not None else None
    if (sizes is None or not sizes.size) and (scales is None or not scales.size):
        refuse(node, "cubic weights need constant scales or sizes")
    matrices = {}
    for axis, extent in enumerate(shape):
        if sizes is not None and sizes.size:
            target = int(sizes.reshape(-1)[axis])
            changed = not isinstance(extent, int) or target != extent
        else:
            target = None
            changed = float(scales.reshape(-1)[axis]) != 1.0
        if not changed:
            continue
        if not isinstance(extent, int):
            refuse(node, "cubic weights along an axis of unknown length")
        matrices[axis] = _probe(node, extent, target, None if target is not None else float(scales.reshape(-1)[axis]))
    return matrices


def _probe(node, extent: int, size: int | None, scale: float | None) -> np.ndarray:
    try:
        return ops.resize_matrix(node, extent, size, scale)
    except RuntimeError as exc:  # attributes onnxruntime does not take
        refuse(node, f"onnxruntime cannot resize with these attributes ({str(exc)[:80]})")


# The cubic convolution kernel GridSample uses (Keys, A = -0.75): 4 taps per axis, weights summing to 1.
CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """[len(t), 4] weights of the taps at distances 1 + t, t, 1 - t, 2 - t for fractions t in [0, 1]."""
    def near(d):
        return ((CUBIC_A + 2) * d - (CUBIC_A + 3)) * d * d + 1

    def far(d):
        return ((CUBIC_A * d - 5 * CUBIC_A) * d + 8 * CUBIC_A) * d - 4 * CUBIC_A
    return np.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=-1)


def cubic_absolute_sum() -> float:
    """An upper bound on sum |w| of the 4 cubic weights over every fraction (1.375, at t = 1/2): the maximum
    on a grid of 2^14 fractions plus a margin larger than the sum's slope (< 4) times half the grid step."""
    t = np.linspace(0.0, 1.0, 2 ** 14 + 1)
    return float(np.abs(_cubic_weights(t)).sum(axis=1).max()) + 4.0 * 2.0 ** -14


@rule("GridSample")
def _grid_sample(cx, node, x, grid):
    mode = _text(attr(node, "mode", "linear"))
    if mode not in ("nearest", "linear", "bilinear", "cubic", "bicubic"):
        refuse(node, f"mode {mode} is not one ONNX defines")
    if isinstance(grid, Interval) or mode in ("cubic", "bicubic"):
        return [_bounded_grid(cx, node, iv.as_interval(cx.b, x), iv.as_interval(cx.b, grid))]
    x = iv.as_interval(cx.b, x)
    return [iv.monotone(cx.b, x, lambda v: cx.b.copy(node, [v, grid]))]


def _bounded_grid(cx, node, x: Interval, grid: Interval) -> Interval:
    """Each output between the least lower and the greatest upper bound of the input elements its grid box can
    read: per spatial axis the grid coordinates' box gives a range of element indices (a few ulps wider for the
    runtime's arithmetic), the ranges' product a mask over the input, and zero joins where padding can be read.

    Cubic weights w (4 taps per axis) sum to 1 but some are negative, with sum |w| <= S (S = 1.375 per axis, its
    power over the axes): for values in [m, M], sum w·v = c + sum w·(v - c) with c = (m + M)/2, so the output
    lies within S·(M - m)/2 of c, i.e. in [m - (S - 1)/2·(M - m), M + (S - 1)/2·(M - m)]."""
    b = cx.b
    shape, grid_shape = node.inputs[0].shape, node.inputs[1].shape
    if shape is None or grid_shape is None or not all(isinstance(d, int) for d in list(shape[2:]) + list(grid_shape[1:-1])):
        refuse(node, "a bounded grid needs static spatial sizes of the input and the grid")
    spatial, out = [int(d) for d in shape[2:]], [int(d) for d in grid_shape[1:-1]]
    k = len(spatial)
    channels = shape[1] if isinstance(shape[1], int) else 1
    if channels * int(np.prod(out)) * int(np.prod(spatial)) > GRID_WINDOW_LIMIT:
        refuse(node, "a bounded grid over this many input and output positions (the window mask is too large)")
    padding = _text(attr(node, "padding_mode", "zeros"))
    align = bool(attr(node, "align_corners", 0))
    cubic = _text(attr(node, "mode", "linear")) in ("cubic", "bicubic")
    grid = sane(cx, grid, node.inputs[1].dtype)
    lower, upper = (b.op("Cast", v, to=ir.DataType.FLOAT) for v in (grid.lower, grid.upper))
    mask, outside = None, None
    for a, size in enumerate(spatial):
        component = b.ints([k - 1 - a])  # grid[..., 0] is x, the last spatial axis
        first, last, out_a = _index_range(b, b.op("Squeeze", b.op("Gather", lower, component, axis=-1), b.ints([-1])),
                                          b.op("Squeeze", b.op("Gather", upper, component, axis=-1), b.ints([-1])),
                                          size, align, padding, (1, 2) if cubic else (0, 1))
        # [N, O...] -> [N, 1, O..., 1 (input axes before a), S_a, 1 (after)]
        index_shape = [size if j == a else 1 for j in range(k)]
        indices = b.const(np.arange(size, dtype=np.float32).reshape(index_shape))
        first, last = (b.op("Unsqueeze", v, b.ints([1] + [2 + k + j for j in range(k)])) for v in (first, last))
        axis_mask = b.op("And", b.op("GreaterOrEqual", indices, first), b.op("LessOrEqual", indices, last))
        mask = axis_mask if mask is None else b.op("And", mask, axis_mask)
        outside = out_a if outside is None else b.op("Or", outside, out_a)
    inf = b.const(np.inf)
    dtype = node.inputs[0].dtype or ir.DataType.FLOAT
    spread = [2 + k + j for j in range(k)]
    values = [b.op("Unsqueeze", b.op("Cast", v, to=ir.DataType.FLOAT), b.ints(list(range(2, 2 + k))))
              for v in (x.lower, x.upper)]
    low = b.reduce("ReduceMin", b.op("Where", mask, values[0], inf), spread, keepdims=0)
    high = b.reduce("ReduceMax", b.op("Where", mask, values[1], b.op("Neg", inf)), spread, keepdims=0)
    zero = b.const(0.0)
    outside = b.op("Unsqueeze", outside, b.ints([1]))
    low = b.op("Where", outside, b.op("Min", low, zero), low)
    high = b.op("Where", outside, b.op("Max", high, zero), high)
    if cubic:
        overshoot = b.op("Mul", b.op("Sub", high, low), b.const((cubic_absolute_sum() ** k - 1) / 2))
        # The runtime's weights and 4^k-term sum round: a few dozen ulps of the largest term, S^k·max|v|.
        rounding = b.op("Mul", b.op("Max", b.op("Abs", low), b.op("Abs", high)),
                        b.const(2.0 ** -17 * cubic_absolute_sum() ** k))
        overshoot = b.op("Add", overshoot, rounding)
        low, high = b.op("Sub", low, overshoot), b.op("Add", high, overshoot)
    # The weighted sum the runtime computes may pass its largest term by an ulp or two.
    result = widened(cx, Interval.from_bounds(b, low, high), ir.DataType.FLOAT)
    return Interval.from_bounds(b, b.op("Cast", result.lower, to=dtype), b.op("Cast", result.upper, to=dtype))


def _index_range(b, low, high, size: int, align: bool, padding: str, taps=(0, 1)):
    """First and last input index (as floats) that grid coordinates in [low, high] can read along an axis of
    `size`, and whether padding can be read (zeros): `taps` before and after floor(position) are read (0 and 1
    for linear or nearest sampling, 1 and 2 for cubic)."""
    half, one = b.const(0.5), b.const(1.0)
    if align:  # -1 and 1 are the centres of the corner elements
        position = lambda g: b.op("Mul", b.op("Mul", b.op("Add", g, one), half), b.const(float(size - 1)))  # noqa: E731
    else:  # -1 and 1 are the outer edges of the corner elements
        position = lambda g: b.op("Mul", b.op("Sub", b.op("Mul", b.op("Add", g, one), b.const(float(size))), one),  # noqa: E731
                                  half)
    p_low, p_high = position(low), position(high)
    slack = lambda p: b.op("Add", b.op("Mul", b.op("Abs", p), b.const(2.0 ** -16)), b.const(1e-4))  # noqa: E731
    p_low, p_high = b.op("Sub", p_low, slack(p_low)), b.op("Add", p_high, slack(p_high))
    first = b.op("Sub", b.op("Floor", p_low), b.const(float(taps[0])))
    last = b.op("Add", b.op("Floor", p_high), b.const(float(taps[1])))
    zero, top = b.const(0.0), b.const(float(size - 1))
    if padding == "border":
        return b.op("Min", b.op("Max", first, zero), top), b.op("Min", b.op("Max", last, zero), top), \
            b.op("And", b.op("Less", first, first), b.op("Less", first, first))  # never outside
    reaches_out = b.op("Or", b.op("Less", first, zero), b.op("Greater", last, top))
    if padding == "reflection":  # inside the axis nothing is reflected; beyond it, any element (and zero) may be read
        return (b.op("Where", reaches_out, zero, first), b.op("Where", reaches_out, top, last), reaches_out)
    return first, last, reaches_out
