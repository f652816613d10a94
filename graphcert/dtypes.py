"""Models in float16, bfloat16 and float64: bounds are computed in float32, the graph's interface keeps the
model's type.

float16 and bfloat16 models are widened to float32 when loaded: float32 holds every float16 and bfloat16 value
exactly, so the widened model has the same weights; the bounds then go back to the model's type rounded
outward (lower bounds down, upper bounds up). float64 models are narrowed to float32 when loaded (the passes
compute in float32): the radius is rounded up, but the weights are rounded to nearest, so bounds hold for the
float32-rounded model (relative error about 6e-8 on each weight); README says so.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

WIDENED = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
           onnx.TensorProto.DOUBLE: "float64"}
IR_TYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16, "float64": ir.DataType.DOUBLE}
ONNX_TYPES = {name: code for code, name in WIDENED.items()}
# Relative and absolute steps that move a float32 value past one rounding of the narrower type: half an ulp is
# 2^-11 (float16) or 2^-8 (bfloat16) relative for normal numbers, and at most half the smallest subnormal.
OUTWARD = {"float16": (2.0 ** -10, 2.0 ** -24), "bfloat16": (2.0 ** -7, 2.0 ** -126)}
LARGEST = {"float16": 65504.0, "bfloat16": 3.38e38}
META = "graphcert.dtype"


def model_dtype(proto: onnx.ModelProto) -> str | None:
    """The float type of the model's first float input, when it is one graphcert widens or narrows."""
    initializers = {init.name for init in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name not in initializers:
            code = value.type.tensor_type.elem_type
            if code in WIDENED:
                return WIDENED[code]
            if code == onnx.TensorProto.FLOAT:
                return None
    return None


IO_META = "graphcert.io_dtypes"


def io_dtypes(proto: onnx.ModelProto) -> dict[str, str]:
    """Each float graph input's and output's own type ("float32" or one graphcert widens or narrows): a model
    may mix them (a CastLike from double to float), and each keeps its type at the bound graph's interface."""
    types = {}
    for value in list(proto.graph.input) + list(proto.graph.output):
        code = value.type.tensor_type.elem_type
        if code in WIDENED:
            types[value.name] = WIDENED[code]
        elif code == onnx.TensorProto.FLOAT:
            types[value.name] = "float32"
    return types


def to_float32(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every float16/bfloat16/float64 tensor, type and cast made float32; ModelLoadError
    for a BitCast (it reads its input's bits, which computing in float32 changes)."""
    from .errors import ModelLoadError
    for node in proto.graph.node:
        if node.op_type == "BitCast":
            raise ModelLoadError(f"cannot load BitCast node {node.name or '(unnamed)'} of a float16/bfloat16/float64 "
                                 f"model: it reads the bits of its input, and graphcert computes such models in float32")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    for init in graph.initializer:
        if init.data_type in WIDENED:
            init.CopyFrom(numpy_helper.from_array(_as_float32(init), init.name))
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type in WIDENED:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i in WIDENED:
                attr.i = onnx.TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in WIDENED:
                attr.t.CopyFrom(numpy_helper.from_array(_as_float32(attr.t), attr.t.name))
    return out


def _as_float32(tensor: onnx.TensorProto) -> np.ndarray:
    array = numpy_helper.to_array(tensor)
    return np.asarray(array, dtype=np.float32) if tensor.data_type != onnx.TensorProto.BFLOAT16 else \
        np.asarray(array.astype(np.float32), dtype=np.float32)


def restore_interface(model: ir.Model, dtype: str, epsilon_names: set[str],
                      io_types: dict[str, str] | None = None) -> None:
    """Give a bound graph built in float32 the interface of a `dtype` model: inputs (and epsilon) of that type
    cast to float32 on entry (epsilon rounded up for float64), the model's outputs cast back, bounds cast
    outward. `io_types` (see `io_dtypes`) gives inputs and outputs of other types their own (float32 ones
    stay); names it does not hold (the single `epsilon`, spec margins) take `dtype`."""
    graph = model.graph
    io_types = io_types or {}

    def type_of(name: str) -> str:
        for suffix in ("_epsilon", "_lower", "_upper"):
            if name.endswith(suffix) and name[:-len(suffix)] in io_types:
                return io_types[name[:-len(suffix)]]
        return io_types.get(name, dtype)
    new_nodes = []

    def node(op, inputs, **attrs):
        made = ir.node(op, inputs, attributes=attrs)
        new_nodes.append(made)
        return made.outputs[0]

    def const(value):
        constant = ir.Value(name=f"graphcert_dtype_c{len(graph.initializers)}", const_value=ir.tensor(
            np.array(value, dtype=np.float32)), shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
        graph.register_initializer(constant)
        return constant

    for position, value in enumerate(list(graph.inputs)):
        if value.is_initializer() or value.type is None or value.type.dtype != ir.DataType.FLOAT:
            continue
        own = type_of(value.name)
        if own == "float32":
            continue
        outer = ir.Value(name=value.name, type=ir.TensorType(IR_TYPES[own]), shape=value.shape)
        value.name = f"{value.name}_float32"
        if own == "float64" and outer.name in epsilon_names:
            up = node("Mul", [outer, node("Cast", [const(1.0 + 2.0 ** -22)], to=ONNX_TYPES[own])])
            inner = node("Cast", [up], to=onnx.TensorProto.FLOAT)
        else:
            inner = node("Cast", [outer], to=onnx.TensorProto.FLOAT)
        value.replace_all_uses_with(inner)
        graph.inputs[position] = outer
    for position, value in enumerate(list(graph.outputs)):
        if value.type is None or value.type.dtype != ir.DataType.FLOAT:
            continue
        name = value.name
        own = type_of(name)
        if own == "float32":
            continue
        if name.endswith(("_lower", "_upper")) and own in OUTWARD:
            relative, absolute = OUTWARD[own]
            down = name.endswith("_lower")
            step = node("Add", [node("Mul", [node("Abs", [value]), const(relative)]), const(absolute)])
            moved = node("Sub" if down else "Add", [value, step])
            limit = LARGEST[own]
            clipped = node("Clip", [moved, None, const(limit)]) if down else node("Clip", [moved, const(-limit)])
            cast = node("Cast", [clipped], to=ONNX_TYPES[own])
        else:
            cast = node("Cast", [value], to=ONNX_TYPES[own])
        value.name = f"{name}_float32"
        cast.name = name
        cast.shape = value.shape
        cast.type = ir.TensorType(IR_TYPES[own])
        graph.outputs[position] = cast
    for made in new_nodes:
        graph.append(made)
    graph.sort()
    model.metadata_props[META] = dtype


def narrowed(proto: onnx.ModelProto, dtype: str = "float16") -> onnx.ModelProto:
    """The float32 model as a half-precision deployment ships it: every float32 weight, constant, type and cast
    in `dtype` ("float16" or "bfloat16"), weights rounded to nearest (a different model, with its own answers)."""
    code = ONNX_TYPES[dtype]
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph

    def narrow(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float16), tensor.name) if dtype == "float16"
                            else onnx.helper.make_tensor(tensor.name, code, array.shape, array.reshape(-1).tolist()))

    for init in graph.initializer:
        narrow(init)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = code
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == onnx.TensorProto.FLOAT:
                attr.i = code
            elif attr.type == onnx.AttributeProto.TENSOR:
                narrow(attr.t)
    return out
