"""Property-test cases for the IBP rules of passes/ibp_rules_*.py (registered into test_ibp_rules.CASES, which
imports this module, so `test_every_rule_has_a_property_test` sees them). Boolean and integer results are cast
to float inside the tiny graph; `_large` scales some inputs to large magnitudes."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from onnx import TensorProto

from test_ibp_rules import Tiny, _broadcast_pair, _window, case


def _large(t: Tiny, x: str) -> str:
    """x, or x times a large factor (the box grows with it)."""
    factor = t.pick([1.0, 1.0, 1e3, 1e5])
    return x if factor == 1.0 else t.op("Mul", x, t.const(np.float32(factor)))


def _as_float(t: Tiny, x: str) -> str:
    return t.op("Cast", x, to=TensorProto.FLOAT)


@case("Round", "Cosh", "Sin", "Cos", "Tan")
def _unary(t: Tiny, op_type):
    x = t.perturbed(t.shape())
    if op_type != "Cosh":
        x = _large(t, x)
    return t.model(t.op(op_type, x))


@case("Asin", "Acos", "Atanh")
def _unit_domain(t: Tiny, op_type):
    """Inputs inside (-1, 1) (a Tanh squashes them), some boxes reaching past the ends."""
    x = t.op("Tanh", t.perturbed(t.shape()))
    return t.model(t.op(op_type, t.op("Mul", x, t.const(np.float32(t.pick([0.5, 0.999]))))))


@case("Acosh")
def _acosh(t: Tiny, op_type):
    x = t.op("Add", t.perturbed(t.shape(), positive=True), t.const(np.float32(1.0)))
    return t.model(t.op(op_type, x))


@case("Pow")
def _pow(t: Tiny, op_type):
    which = t.pick(["constant", "constant", "bounded"])
    if which == "bounded":
        base = t.perturbed(t.shape(1, 2), positive=True)
        return t.model(t.op("Pow", base, t.perturbed([1])))
    exponent = t.pick([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, -1.0, -2.0, -3.0, 0.5, 0.25, 1.5, -0.5])
    positive = not float(exponent).is_integer()
    x = t.perturbed(t.shape(), positive=positive)
    return t.model(t.op("Pow", x, t.const(np.float32(exponent))))


@case("Mod")
def _mod(t: Tiny, op_type):
    left, right = _broadcast_pair(t)
    divisor = t.rng.uniform(0.3, 3.0, right) * t.rng.choice([-1.0, 1.0], right)
    y = t.const(divisor) if t.draw(st.booleans()) else t.perturbed(right, positive=True)
    return t.model(t.op("Mod", _large(t, t.perturbed(left)), y, fmod=1))


NARROW = [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ,
          TensorProto.FLOAT8E8M0, TensorProto.BFLOAT16]


@case("Cast", "CastLike")
def _cast(t: Tiny, op_type):
    """Through an integer, half, 8-bit float, boolean or wrapping unsigned type and back."""
    middle = t.pick([TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.DOUBLE,
                     TensorProto.BOOL, TensorProto.UINT8] + (NARROW if op_type == "Cast" else []))
    x = t.perturbed(t.shape())
    if middle == TensorProto.BOOL and t.draw(st.booleans()):
        x = t.op("Relu", x)  # exact zeros
    if middle in NARROW and middle != TensorProto.BFLOAT16:
        t.opset = 24 if middle == TensorProto.FLOAT8E8M0 else 19
        attrs = {"saturate": int(t.draw(st.booleans()))}
        if middle == TensorProto.FLOAT8E8M0:
            attrs["round_mode"] = t.pick(["up", "down", "nearest"])
        return t.model(_as_float(t, t.op("Cast", _large(t, x), to=middle, **attrs)))
    if op_type == "Cast":
        return t.model(_as_float(t, t.op("Cast", _large(t, x), to=middle)))
    numpy_type = {TensorProto.INT32: np.int32, TensorProto.INT64: np.int64, TensorProto.FLOAT16: np.float16,
                  TensorProto.DOUBLE: np.float64, TensorProto.BOOL: np.bool_, TensorProto.UINT8: np.uint8}[middle]
    like = t.const(np.zeros(1), dtype=numpy_type)
    return t.model(t.op("CastLike", t.op("CastLike", x, like), t.const(np.zeros(1))))


@case("Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal")
def _compare(t: Tiny, op_type):
    left, right = _broadcast_pair(t)
    x = t.op("Round", t.perturbed(left)) if op_type == "Equal" else t.perturbed(left)
    y = t.perturbed(right) if t.draw(st.booleans()) else t.const(t.rng.integers(-2, 3, right))
    if op_type == "Equal":
        y = t.op("Round", y)
    return t.model(_as_float(t, t.op(op_type, x, y)))


@case("Not", "And", "Or", "Xor")
def _logic(t: Tiny, op_type):
    left, right = _broadcast_pair(t)
    x = t.op("Less", t.perturbed(left), t.const(np.float32(0.0)))
    if op_type == "Not":
        return t.model(_as_float(t, t.op("Not", x)))
    y = t.op("Greater", t.perturbed(right), t.const(np.float32(0.0))) if t.draw(st.booleans()) else \
        t.const(t.rng.random(right) < 0.5, dtype=np.bool_)
    return t.model(_as_float(t, t.op(op_type, x, y)))


@case("IsNaN", "IsInf")
def _is_special(t: Tiny, op_type):
    x = t.op("Reciprocal", t.perturbed(t.shape()))  # unbounded where the box holds zero
    if op_type == "IsInf":
        x = t.op("Mul", x, t.const(np.float32(1e38)))
        attrs = dict(detect_positive=int(t.draw(st.booleans())), detect_negative=int(t.draw(st.booleans())))
        return t.model(_as_float(t, t.op("IsInf", x, **attrs)))
    return t.model(_as_float(t, t.op("IsNaN", t.op("Sqrt", x))))


@case("Where")
def _where(t: Tiny, op_type):
    left, right = _broadcast_pair(t)
    if t.draw(st.booleans()):
        condition = t.op("Less", t.perturbed(t.pick([left, right])), t.const(np.float32(0.0)))
    else:
        condition = t.const(t.rng.random(t.pick([left, right])) < 0.5, dtype=np.bool_)
    which = t.pick(["x", "y", "both"])
    x = t.perturbed(left) if which != "y" else t.weights(left)
    y = t.perturbed(right) if which != "x" else t.weights(right)
    return t.model(t.op("Where", condition, x, y))


@case("ArgMax", "ArgMin")
def _arg_extreme(t: Tiny, op_type):
    shape = t.shape(1, 3)
    axis = t.draw(st.integers(-len(shape), len(shape) - 1))
    attrs = dict(axis=axis, keepdims=int(t.draw(st.booleans())), select_last_index=int(t.draw(st.booleans())))
    return t.model(_as_float(t, t.op(op_type, _large(t, t.perturbed(shape)), **attrs)))


@case("Hardmax")
def _hardmax(t: Tiny, op_type):
    shape = t.shape(1, 3)
    return t.model(t.op("Hardmax", t.perturbed(shape), axis=t.draw(st.integers(-len(shape), len(shape) - 1))))


@case("OneHot")
def _one_hot(t: Tiny, op_type):
    shape = t.shape(1, 2)
    depth = t.draw(st.integers(1, 4))
    # Integer indices with a constant depth, or float indices (cast to int64 by truncation) with a float depth
    # computed at run time (the pairs onnxruntime has kernels for).
    index = t.op("Round", t.perturbed(shape)) if t.draw(st.booleans()) else t.perturbed(shape)
    values = t.perturbed([2]) if t.draw(st.booleans()) else t.const(np.float32([-1.0, 2.0]))
    axis = t.draw(st.integers(-len(shape) - 1, len(shape)))
    if t.draw(st.booleans()):
        index, depth_input = t.op("Cast", index, to=TensorProto.INT64), t.ints([depth])
    else:
        depth_input = t.op("Add", t.const(np.float32([depth - 0.5])), t.const(np.float32([0.5])))
    return t.model(t.op("OneHot", index, depth_input, values, axis=axis))


@case("LpPool", "GlobalLpPool")
def _lp_pool(t: Tiny, op_type):
    shape = [t.draw(st.integers(1, 2)), t.draw(st.integers(1, 2))] + t.shape(1, 2, max_dim=4)
    p = t.pick([1, 2, 3])
    if op_type == "GlobalLpPool":
        return t.model(t.op(op_type, t.perturbed(shape), p=p))
    kernel, strides, pads = _window(t, shape[2:])
    return t.model(t.op(op_type, t.perturbed(shape), kernel_shape=kernel, strides=strides, pads=pads, p=p))


@case("CumSum")
def _cumsum(t: Tiny, op_type):
    shape = t.shape(1, 3)
    axis = t.draw(st.integers(-len(shape), len(shape) - 1))
    return t.model(t.op("CumSum", t.perturbed(shape), t.ints(axis), exclusive=int(t.draw(st.booleans())),
                        reverse=int(t.draw(st.booleans()))))


@case("Mean")
def _mean(t: Tiny, op_type):
    left, right = _broadcast_pair(t)
    inputs = [t.perturbed(left)] + [t.perturbed(right) if t.draw(st.booleans()) else t.weights(right)
                                    for _ in range(t.draw(st.integers(0, 2)))]
    return t.model(t.op("Mean", *inputs))


@case("Resize", "Upsample")
def _resize(t: Tiny, op_type):
    shape = [1, t.draw(st.integers(1, 2))] + t.shape(1, 2, max_dim=3)
    scales = [1.0, 1.0] + [t.pick([0.5, 1.0, 1.5, 2.0]) for _ in shape[2:]]
    mode = t.pick(["nearest", "linear"])
    if op_type == "Upsample":
        t.opset = 9
        scales = [max(s, 1.0) for s in scales]
        return t.model(t.op("Upsample", t.perturbed(shape), t.const(np.float32(scales)), mode=mode))
    transform = t.pick(["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
    if transform == "align_corners":  # fractional output sizes are refused (runtimes disagree on them)
        scales = [s if float(s * d).is_integer() else 2.0 for s, d in zip(scales, shape)]
    attrs = {}
    if t.draw(st.booleans()):  # weights of either sign: cubic, exclude_outside, antialias (opset 18)
        t.opset, mode = 18, t.pick(["cubic", "linear"])
        if mode == "cubic" and len(shape) != 4:  # onnxruntime's cubic resizes the last two axes of 4-D data
            shape, scales = shape + [2], scales + [1.0]
        attrs = dict(cubic_coeff_a=t.pick([-0.75, -0.5]), exclude_outside=int(t.draw(st.booleans())),
                     antialias=int(t.draw(st.booleans())))
        if mode == "linear" and not attrs["antialias"]:  # (onnxruntime refuses exclude_outside there)
            attrs["exclude_outside"] = 0
    return t.model(t.op("Resize", _large(t, t.perturbed(shape)), "", t.const(np.float32(scales)), mode=mode,
                        coordinate_transformation_mode=transform, **attrs))


@case("GridSample")
def _grid_sample(t: Tiny, op_type):
    """A fixed grid, or a bounded one (coordinates around [-1.2, 1.2], some boxes wide), in 2-D and 3-D; cubic
    (2-D only) at large magnitudes too."""
    volumetric = t.draw(st.booleans())
    t.opset = max(t.opset, 20 if volumetric else 16)
    spatial = [t.draw(st.integers(1, 3)) for _ in range(3 if volumetric else 2)]
    shape = [t.draw(st.integers(1, 2)), t.draw(st.integers(1, 2))] + spatial
    grid_shape = [shape[0]] + [t.draw(st.integers(1, 3)) for _ in spatial] + [len(spatial)]
    which = t.pick(["data", "grid", "both"])
    grid = t.const(t.rng.uniform(-1.2, 1.2, grid_shape)) if which == "data" else \
        t.op("Mul", t.op("Tanh", t.perturbed(grid_shape)), t.const(np.float32(1.2)))
    x = t.perturbed(shape) if which != "grid" else t.weights(shape)
    mode = t.pick(["linear", "nearest"]) if volumetric else t.pick(["bilinear", "nearest", "bicubic"])
    if volumetric or which != "data":
        mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
        t.opset = 20
    if "cubic" in mode:  # negative weights: large magnitudes too
        x = _large(t, x)
    return t.model(t.op("GridSample", x, grid, mode=mode, padding_mode=t.pick(["zeros", "border", "reflection"]),
                        align_corners=int(t.draw(st.booleans()))))


@case("Einsum")
def _einsum(t: Tiny, op_type):
    m, k, n = (t.draw(st.integers(1, 3)) for _ in range(3))
    form = t.pick(["one", "a", "b", "both"])
    if form == "one":
        return t.model(t.op("Einsum", t.perturbed([m, k]), equation="ij->ji"))
    a = t.perturbed([m, k]) if form != "b" else t.weights([m, k])
    b = t.perturbed([k, n]) if form != "a" else t.weights([k, n])
    return t.model(t.op("Einsum", a, b, equation="ij,jk->ik"))


@case("LpNormalization")
def _lp_normalization(t: Tiny, op_type):
    shape = t.shape(1, 3)
    return t.model(t.op(op_type, t.perturbed(shape), axis=t.draw(st.integers(-len(shape), len(shape) - 1)),
                        p=t.pick([1, 2])))


@case("QuantizeLinear", "DequantizeLinear")
def _quantize_dequantize(t: Tiny, op_type):
    """x -> QuantizeLinear -> DequantizeLinear (or Cast): per tensor, per axis or blocked, integer or 8-bit
    float, a constant or a bounded (positive) scale, with or without a zero point."""
    shape = t.shape(1, 3)
    axis = t.draw(st.integers(0, len(shape) - 1))
    granularity = t.pick(["tensor", "axis", "blocked"])
    target = t.pick([TensorProto.UINT8, TensorProto.INT8, TensorProto.INT16, TensorProto.FLOAT8E4M3FN])
    t.opset = 21
    attrs, param_shape = {}, []
    if granularity == "axis":
        attrs, param_shape = {"axis": axis}, [shape[axis]]
    elif granularity == "blocked":
        block = t.draw(st.integers(1, 3))
        param_shape = list(shape)
        param_shape[axis] = -(-shape[axis] // block)
        attrs = {"axis": axis, "block_size": block}
    if int(np.prod(param_shape)) == 1:  # one parameter is per-tensor quantization (onnxruntime insists)
        attrs, param_shape = {}, []
    x = _large(t, t.perturbed(shape))
    magnitude = t.pick([0.01, 0.1, 1.0, 100.0])
    if t.draw(st.booleans()):
        scale = t.const(t.rng.uniform(0.5, 2.0, param_shape) * magnitude)
    else:
        scale = t.op("Mul", t.perturbed(param_shape, positive=True), t.const(np.float32(magnitude)))
    numpy_type = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8, TensorProto.INT16: np.int16}
    inputs = [x, scale]
    if target == TensorProto.FLOAT8E4M3FN:
        inputs.append(t.const(np.zeros(param_shape), dtype=np.float32))
        import onnx.numpy_helper as numpy_helper_module  # a float8 zero point (its type names the target)
        zero = t.initializers[-1]
        zero.CopyFrom(numpy_helper_module.from_array(np.zeros(param_shape, np.float32), zero.name))
        zero.data_type = TensorProto.FLOAT8E4M3FN
        del zero.float_data[:]
        zero.raw_data = bytes(int(np.prod(param_shape, dtype=np.int64)))
    elif t.draw(st.booleans()):
        low, high = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.INT16: (-300, 300)}[target]
        inputs.append(t.const(t.rng.integers(low, high + 1, param_shape), dtype=numpy_type[target]))
    else:
        attrs["output_dtype"] = target
    q = t.op("QuantizeLinear", *inputs, **attrs)
    if op_type == "QuantizeLinear" and target != TensorProto.FLOAT8E4M3FN:
        return t.model(_as_float(t, q))
    dq_attrs = {k: v for k, v in attrs.items() if k != "output_dtype"}
    return t.model(t.op("DequantizeLinear", q, *inputs[1:], **dq_attrs))


@case("Shrink")
def _shrink(t: Tiny, op_type):
    """Shrink where it is non-decreasing (bias <= lambd)."""
    x = _large(t, t.perturbed(t.shape()))
    lambd = t.pick([0.0, 0.5, 2.0])
    return t.model(t.op("Shrink", x, lambd=lambd, bias=t.pick([0.0, lambd / 2, lambd])))


@case("InstanceNormalization")
def _instance_norm(t: Tiny, op_type):
    channels = t.draw(st.integers(1, 3))
    shape = [t.draw(st.integers(1, 2)), channels] + t.shape(1, 2, max_dim=4)
    scale = t.perturbed([channels]) if t.draw(st.booleans()) else t.weights([channels])
    bias = t.perturbed([channels]) if t.draw(st.booleans()) else t.weights([channels])
    return t.model(t.op(op_type, t.perturbed(shape), scale, bias, epsilon=t.pick([1e-5, 1e-2])))


@case("DFT")
def _dft(t: Tiny, op_type):
    """Real or complex signals, forward or inverse, one- or two-sided, a given length (padding or cutting)."""
    length = t.draw(st.integers(2, 6))
    shape = [t.draw(st.integers(1, 2)), length, t.draw(st.integers(1, 2)), t.pick([1, 2])]
    inverse = int(t.draw(st.booleans()))
    onesided = 0 if inverse or shape[-1] == 2 else int(t.draw(st.booleans()))  # one-sided: real input only
    inputs = [_large(t, t.perturbed(shape))]
    if t.draw(st.booleans()):
        inputs.append(t.ints(t.draw(st.integers(2, 8))))
    return t.model(t.op("DFT", *inputs, axis=1, inverse=inverse, onesided=onesided))


@case("ReduceProd")
def _reduce_prod(t: Tiny, op_type):
    shape = t.shape(1, 3, max_dim=3)
    axes = sorted(set(t.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=2))))
    keepdims = int(t.draw(st.booleans()))
    if t.draw(st.booleans()):
        return t.model(t.op(op_type, t.perturbed(shape), keepdims=keepdims))
    return t.model(t.op(op_type, t.perturbed(shape), axes=axes, keepdims=keepdims))


@case("Det")
def _det(t: Tiny, op_type):
    n = t.draw(st.integers(1, 3))
    return t.model(t.op(op_type, t.perturbed(t.shape(0, 2, max_dim=2) + [n, n])))


@case("LRN")
def _lrn(t: Tiny, op_type):
    shape = [t.draw(st.integers(1, 2)), t.draw(st.integers(1, 5))] + t.shape(2, 2, max_dim=3)  # 4-D (onnxruntime)
    return t.model(t.op(op_type, t.perturbed(shape), size=t.pick([1, 3, 5]), alpha=t.pick([1e-4, 0.5, 2.0]),
                        beta=t.pick([0.75, 0.5, 2.0]), bias=t.pick([1.0, 2.0, 0.1])))


@case("BitCast")
def _bitcast(t: Tiny, op_type):
    """A float's bits as int32, around zero and away from it (the result cast back to float)."""
    t.opset = 26
    return t.model(_as_float(t, t.op("BitCast", _large(t, t.perturbed(t.shape())), to=TensorProto.INT32)))


EIGHT_BIT = {TensorProto.UINT8: (np.uint8, 0, 255), TensorProto.INT8: (np.int8, -128, 127)}


def _quantized_input(t: Tiny, shape, target) -> tuple[str, str, str]:
    """A perturbed input quantized to an 8-bit type (what reaches an integer op), with its scale and zero point."""
    numpy_type, low, high = EIGHT_BIT[target]
    scale = t.const(np.float32(t.pick([0.003, 0.02, 0.1, 1.0])))
    zero = t.const(np.asarray(t.rng.integers(low, high + 1)), dtype=numpy_type)
    return t.op("QuantizeLinear", _large(t, t.perturbed(shape)), scale, zero), scale, zero


def _integer_weights(t: Tiny, shape, target, per_channel: bool) -> tuple[str, str]:
    numpy_type, low, high = EIGHT_BIT[target]
    # Mostly extreme values sometimes: long sums of 255 x 127 pass float32's exact integers.
    extreme = t.draw(st.booleans())
    values = t.rng.choice([low, high], shape) if extreme else t.rng.integers(low, high + 1, shape)
    zero_shape = [shape[0]] if per_channel else []
    zero = t.rng.integers(max(low, -10), min(high, 10) + 1, zero_shape)
    return t.const(values, dtype=numpy_type), t.const(zero, dtype=numpy_type)


def _operand_types(t: Tiny, op_type) -> tuple[int, int]:
    """onnxruntime's QLinear kernels take uint8 x with uint8 or int8 weights, or int8 with int8 (y as x)."""
    x_type = t.pick(list(EIGHT_BIT))
    if op_type.startswith("QLinear") and x_type == TensorProto.INT8:
        return x_type, x_type
    return x_type, t.pick(list(EIGHT_BIT))


def _requantized_output(t: Tiny, per_channel_size: int | None, out_type) -> tuple[str, str, str]:
    """w_scale (per tensor or per output channel), y_scale and y_zero_point of a QLinear op."""
    w_scale = t.rng.uniform(0.001, 0.05, [per_channel_size] if per_channel_size else [])
    numpy_type, low, high = EIGHT_BIT[out_type]
    return (t.const(w_scale.astype(np.float32)), t.const(np.float32(t.pick([0.01, 0.1, 2.0]))),
            t.const(np.asarray(t.rng.integers(low, high + 1)), dtype=numpy_type))


@case("QLinearConv", "ConvInteger")
def _integer_conv(t: Tiny, op_type):
    """A 1-D or 2-D convolution of a quantized input with 8-bit weights (strides, pads, dilations, groups),
    per-tensor or (QLinearConv) per-channel weight parameters, an int32 bias; the result as floats."""
    spatial = t.draw(st.integers(1, 2))
    group = t.pick([1, 1, 2])
    channels_in, channels_out = group * t.draw(st.integers(1, 3)), group * t.draw(st.integers(1, 2))
    kernel = [t.draw(st.integers(1, 3)) for _ in range(spatial)]
    sizes = [k + t.draw(st.integers(0, 3)) for k in kernel]
    wide = t.draw(st.booleans())  # many input channels: long accumulations
    if wide:
        channels_in, group = 64 * group, group
    x_type, w_type = _operand_types(t, op_type)
    x, x_scale, x_zero = _quantized_input(t, [1, channels_in] + sizes, x_type)
    per_channel = op_type == "QLinearConv" and t.draw(st.booleans())
    w, w_zero = _integer_weights(t, [channels_out, channels_in // group] + kernel, w_type, per_channel)
    attrs = {"group": group, "strides": [t.draw(st.integers(1, 2)) for _ in range(spatial)],
             "pads": [t.draw(st.integers(0, 1)) for _ in range(2 * spatial)]}
    if op_type == "ConvInteger":
        return t.model(_as_float(t, t.op("ConvInteger", x, w, x_zero, w_zero, **attrs)))
    w_scale, y_scale, y_zero = _requantized_output(t, channels_out if per_channel else None, x_type)
    inputs = [x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero]
    if t.draw(st.booleans()):
        inputs.append(t.const(t.rng.integers(-2000, 2001, [channels_out]), dtype=np.int32))
    return t.model(_as_float(t, t.op("QLinearConv", *inputs, **attrs)))


@case("QLinearMatMul", "MatMulInteger")
def _integer_matmul(t: Tiny, op_type):
    """A quantized input times 8-bit weights (per-tensor or per-column parameters), or (MatMulInteger) times a
    second quantized input; the result as floats."""
    rows, inner, cols = t.draw(st.integers(1, 3)), t.pick([1, 3, 700]), t.draw(st.integers(1, 3))
    batch = [t.draw(st.integers(1, 2))] if t.draw(st.booleans()) else []
    a_type, b_type = _operand_types(t, op_type)
    a, a_scale, a_zero = _quantized_input(t, batch + [rows, inner], a_type)
    if op_type == "MatMulInteger" and t.draw(st.booleans()):
        b, _, b_zero = _quantized_input(t, [inner, cols], b_type)
        return t.model(_as_float(t, t.op("MatMulInteger", a, b, a_zero, b_zero)))
    numpy_type, low, high = EIGHT_BIT[b_type]
    extreme = t.draw(st.booleans())
    b = t.const(t.rng.choice([low, high], [inner, cols]) if extreme else t.rng.integers(low, high + 1, [inner, cols]),
                dtype=numpy_type)
    per_column = t.draw(st.booleans())
    b_zero = t.const(t.rng.integers(-5, 6, [cols] if per_column else []).clip(low, high), dtype=numpy_type)
    if op_type == "MatMulInteger":
        return t.model(_as_float(t, t.op("MatMulInteger", a, b, a_zero, b_zero)))
    b_scale, y_scale, y_zero = _requantized_output(t, cols if per_column else None, a_type)
    return t.model(_as_float(t, t.op("QLinearMatMul", a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero)))


@case("DynamicQuantizeLinear")
def _dynamic_quantize(t: Tiny, op_type):
    """Per-tensor range, scale and zero point of a perturbed tensor (some all of one sign or exactly zero)."""
    x = _large(t, t.perturbed(t.shape(1, 3)))
    shift = t.pick(["none", "positive", "negative", "zero"])
    if shift == "positive":
        x = t.op("Relu", x)
    elif shift == "negative":
        x = t.op("Neg", t.op("Relu", x))
    elif shift == "zero":
        x = t.op("Mul", x, t.const(np.float32(0.0)))
    y, scale, zero = t.node("DynamicQuantizeLinear", [x], outputs=3)
    return t.model(_as_float(t, y), scale, _as_float(t, zero))


@case("RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike")
def _random_draw(t: Tiny, op_type):
    """A fresh draw each time the original runs, added to a perturbed tensor (ranges of either sign)."""
    shape = t.shape(1, 3)
    low = float(t.pick([-3.0, 0.0, 2.0, 1e4]))
    ranges = {"low": low, "high": low + float(t.pick([0.0, 0.5, 7.0]))} if "Uniform" in op_type else \
        {"mean": float(t.pick([0.0, -2.0, 1e3])), "scale": float(t.pick([0.1, 1.0, 30.0]))}
    x = t.perturbed(shape)
    draw = t.op(op_type, x, **ranges) if op_type.endswith("Like") else t.op(op_type, shape=shape, **ranges)
    return t.model(t.op("Add", x, draw))


@case("Bernoulli")
def _bernoulli(t: Tiny, op_type):
    """Probabilities inside [0, 1] (a Sigmoid), some boxes pinned near 0 or 1; the draw in float or int32."""
    p = t.op("Sigmoid", _large(t, t.perturbed(t.shape())))
    kind = t.pick([TensorProto.FLOAT, TensorProto.INT32])
    draw = t.op(op_type, p, dtype=kind)
    return t.model(draw if kind == TensorProto.FLOAT else _as_float(t, draw))


@case("Multinomial")
def _multinomial(t: Tiny, op_type):
    logits = t.perturbed([t.draw(st.integers(1, 3)), t.draw(st.integers(1, 5))])
    return t.model(_as_float(t, t.op(op_type, logits, sample_size=t.draw(st.integers(1, 4)))))


@case("OptionalGetElement")
def _optional_element(t: Tiny, op_type):
    t.opset = 18  # a tensor input from opset 18 on
    return t.model(t.op(op_type, t.perturbed(t.shape())))


def _with_microsoft_ops(t: Tiny, *outputs: str):
    """t.model(...) for a graph holding onnxruntime's com.microsoft ops (their domain imported too)."""
    import onnx
    from onnx import helper
    from graphcert.runtime import Session

    def build(shapes):
        infos = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes.get(o)) for o in outputs]
        graph = helper.make_graph(t.nodes, "rule", t.inputs, infos, t.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", t.opset),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return model
    # Shape inference does not know these ops: the outputs' shapes as onnxruntime computes them.
    values = Session(build({})).run(dict(t.centers))
    return onnx.shape_inference.infer_shapes(build({o: list(np.shape(values[o])) for o in outputs}), strict_mode=True)


def _microsoft(t: Tiny, op_type, *inputs, **attrs) -> str:
    return t.node(op_type, inputs, domain="com.microsoft", **attrs)[0]


def _output_parameters(t: Tiny, out_type) -> tuple[str, str]:
    numpy_type, low, high = EIGHT_BIT[out_type]
    return (t.const(np.float32(t.pick([0.005, 0.02, 0.1, 1.0]))),
            t.const(np.asarray(t.rng.integers(low, high + 1)), dtype=numpy_type))


@case("QGemm")
def _qgemm(t: Tiny, op_type):
    """A quantized input times 8-bit weights (transposed or not, per-tensor or per-column parameters), an
    optional int32 bias, requantized or (no y_scale) float output."""
    a_type, b_type = _operand_types(t, "QLinear")
    rows, inner, cols = t.draw(st.integers(1, 3)), t.pick([1, 4, 600]), t.draw(st.integers(1, 3))
    a, a_scale, a_zero = _quantized_input(t, [rows, inner], a_type)
    trans_b = int(t.draw(st.booleans()))
    numpy_type, low, high = EIGHT_BIT[b_type]
    weights = t.rng.choice([low, high], [inner, cols]) if t.draw(st.booleans()) else \
        t.rng.integers(low, high + 1, [inner, cols])
    b = t.const(weights.T if trans_b else weights, dtype=numpy_type)
    per_column = t.draw(st.booleans())
    b_zero = t.const(np.zeros([cols] if per_column else []), dtype=numpy_type)  # onnxruntime: symmetric B
    b_scale = t.const(t.rng.uniform(0.001, 0.05, [cols] if per_column else []).astype(np.float32))
    inputs = [a, a_scale, a_zero, b, b_scale, b_zero,
              t.const(t.rng.integers(-3000, 3001, [cols]), dtype=np.int32) if t.draw(st.booleans()) else ""]
    if t.draw(st.booleans()):
        inputs += list(_output_parameters(t, a_type))
    y = _microsoft(t, "QGemm", *inputs, transB=trans_b, alpha=float(t.pick([1.0, 0.5])))
    return _with_microsoft_ops(t, y if len(inputs) == 7 else _as_float(t, y))


@case("QLinearAdd", "QLinearMul")
def _qlinear_binary(t: Tiny, op_type):
    """Two quantized tensors (broadcast), or one and a constant, of the same 8-bit type."""
    left, right = _broadcast_pair(t)
    kind = t.pick(list(EIGHT_BIT))
    a, a_scale, a_zero = _quantized_input(t, left, kind)
    if t.draw(st.booleans()):
        b, b_scale, b_zero = _quantized_input(t, right, kind)
    else:
        numpy_type, low, high = EIGHT_BIT[kind]
        b = t.const(t.rng.integers(low, high + 1, right), dtype=numpy_type)
        b_scale, b_zero = _output_parameters(t, kind)
    y_scale, y_zero = _output_parameters(t, kind)
    return _with_microsoft_ops(t, _as_float(t, _microsoft(t, op_type, a, a_scale, a_zero, b, b_scale, b_zero,
                                                          y_scale, y_zero)))


@case("QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu")
def _qlinear_unary(t: Tiny, op_type):
    kind = t.pick(list(EIGHT_BIT))
    shape = [t.draw(st.integers(1, 2)), t.draw(st.integers(1, 3))] + t.shape(1, 2, max_dim=5)
    x, x_scale, x_zero = _quantized_input(t, shape, kind)
    y_scale, y_zero = _output_parameters(t, kind)
    attrs = {"alpha": float(t.pick([0.01, 0.1, 0.5]))} if op_type == "QLinearLeakyRelu" else {}
    if op_type == "QLinearGlobalAveragePool":
        attrs = {"channels_last": 0}
    return _with_microsoft_ops(t, _as_float(t, _microsoft(t, op_type, x, x_scale, x_zero, y_scale, y_zero, **attrs)))


@case("QLinearConcat")
def _qlinear_concat(t: Tiny, op_type):
    kind = t.pick(list(EIGHT_BIT))
    shape = t.shape(1, 3)
    axis = t.draw(st.integers(0, len(shape) - 1))
    triples = []
    for _ in range(t.draw(st.integers(1, 3))):
        part = list(shape)
        part[axis] = t.draw(st.integers(1, 3))
        triples += list(_quantized_input(t, part, kind))
    y_scale, y_zero = _output_parameters(t, kind)
    return _with_microsoft_ops(t, _as_float(t, _microsoft(t, op_type, y_scale, y_zero, *triples, axis=axis)))


@case("DeformConv")
def _deform_conv(t: Tiny, op_type):
    """Perturbed offsets (some boxes reaching past the input) and image, a constant or perturbed kernel."""
    t.opset = 19
    kh, kw = t.draw(st.integers(1, 2)), t.draw(st.integers(1, 3))
    height, width = t.draw(st.integers(2, 4)), t.draw(st.integers(kw, 4))
    height = max(height, kh)
    groups = t.draw(st.integers(1, 2))
    x = _large(t, t.perturbed([1, 2, height, width]))
    out = [height - kh + 1, width - kw + 1]
    offset = t.op("Mul", t.perturbed([1, groups * kh * kw * 2] + out), t.const(np.float32(t.pick([0.5, 2.0]))))
    w = t.perturbed([2, 2, kh, kw]) if t.draw(st.booleans()) else t.weights([2, 2, kh, kw])
    return t.model(t.op(op_type, x, w, offset, kernel_shape=[kh, kw], offset_group=groups))


@case("QLinearAveragePool")
def _qlinear_average_pool(t: Tiny, op_type):
    """1-D or 2-D windows: strides, pads counted or not (ceil mode is refused)."""
    kind = t.pick(list(EIGHT_BIT))
    spatial = t.draw(st.integers(1, 2))
    kernel = [t.draw(st.integers(1, 3)) for _ in range(spatial)]
    shape = [1, t.draw(st.integers(1, 3))] + [k + t.draw(st.integers(0, 3)) for k in kernel]
    x, x_scale, x_zero = _quantized_input(t, shape, kind)
    y_scale, y_zero = _output_parameters(t, kind)
    attrs = {"kernel_shape": kernel, "strides": [t.draw(st.integers(1, 2)) for _ in range(spatial)],
             "pads": [t.draw(st.integers(0, k - 1)) for k in kernel * 2],
             "count_include_pad": int(t.draw(st.booleans()))}
    return _with_microsoft_ops(t, _as_float(t, _microsoft(t, op_type, x, x_scale, x_zero, y_scale, y_zero, **attrs)))
