"""Loading and normalising ONNX models: one opset, folded constants, a symbolic batch dimension."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer

from .errors import ModelLoadError

TARGET_OPSET = 17
BATCH = "batch"
# Elements up to which a constant fill (ConstantOfShape) is folded into an initializer.
FILL_FOLD_LIMIT = 4096


def read_proto(path: str | os.PathLike) -> onnx.ModelProto:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}; check the path")
    if os.path.isdir(path):
        raise ModelLoadError(f"model path is a directory, not an ONNX file: {path}")
    try:
        return onnx.load(path)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelLoadError(f"cannot read {path} as ONNX ({type(exc).__name__}); is it an .onnx model file?") from None


def load(source: str | os.PathLike | onnx.ModelProto | ir.Model, opset: int = TARGET_OPSET) -> ir.Model:
    """Read and normalise a model from a path, a ModelProto or an onnx_ir model (which is not modified)."""
    if isinstance(source, ir.Model):
        proto = ir.to_proto(source)
    elif isinstance(source, onnx.ModelProto):
        proto = source
    else:
        proto = read_proto(source)
    return normalise(proto, opset)


def normalise(proto: onnx.ModelProto, opset: int = TARGET_OPSET) -> ir.Model:
    proto = _copy(proto)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"invalid ONNX model: {_first_line(exc)}") from None
    if len(proto.graph.node) == 0:
        raise ModelLoadError("the model has no nodes")
    _drop_initializer_inputs(proto)
    # IR < 4 requires initializers to be listed as inputs; the newer IR lets them stand alone.
    proto.ir_version = max(proto.ir_version, 8)
    made_symbolic = _make_batch_symbolic(proto)
    current = _default_opset(proto)
    if current < opset:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as exc:
            raise ModelLoadError(f"cannot convert the model from opset {current} to {opset}: {_first_line(exc)}") from None
    elif current > opset:
        proto = _downgraded(proto, opset)
    model = ir.from_proto(proto)
    try:
        onnxscript.optimizer.optimize(model, num_iterations=2, input_size_limit=1 << 26, output_size_limit=1 << 26)
        # The optimizer keeps ConstantOfShape, so torch's Pad keeps pads computed at run time (and unknown shapes).
        onnxscript.optimizer.fold_constants(model, should_fold=_small_fill, input_size_limit=1 << 26,
                                            output_size_limit=1 << 26)
    except Exception as exc:
        raise ModelLoadError(f"constant folding failed: {_first_line(exc)}") from None
    model = _infer_shapes(model)
    if made_symbolic and _unlock_reshapes(model):
        # Shapes inferred through a locked Reshape say 1 where the batch now goes: infer them again, or graphs
        # that declare such a value as an input (ReLU split bounds) would accept only one sample.
        for node in model.graph:
            for value in node.outputs:
                if not value.is_graph_output():
                    value.shape = None
        model = _infer_shapes(model)
    common_passes.RemoveUnusedNodesPass()(model)
    return model


def _small_fill(node: ir.Node) -> bool | None:
    """Fold ConstantOfShape with a small constant shape; leave every other decision to the optimizer."""
    if node.op_type != "ConstantOfShape" or node.inputs[0] is None or node.inputs[0].const_value is None:
        return None
    return int(np.prod(node.inputs[0].const_value.numpy())) <= FILL_FOLD_LIMIT or None


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(proto)
    return clone


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _downgraded(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Newer models come down to the target opset where the converter can take them; where it cannot,
    they keep their opset (passes and the builder read the opset of the graph they rewrite)."""
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted)
    except Exception:  # the converter has no down-adapter for one of the model's ops
        return proto
    return converted


def _drop_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Old exporters list initializers among the inputs; they are constants, not model inputs."""
    names = {init.name for init in proto.graph.initializer}
    keep = [inp for inp in proto.graph.input if inp.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)


def _make_batch_symbolic(proto: onnx.ModelProto) -> bool:
    """A leading dimension of 1 on inputs of rank >= 2 becomes the symbolic `batch`, so graphs run batched."""
    changed = False
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = BATCH
            changed = True
    if changed:
        del proto.graph.value_info[:]
    return changed


def _infer_shapes(model: ir.Model) -> ir.Model:
    proto = ir.to_proto(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:
        raise ModelLoadError(f"shape inference failed: {_first_line(exc)}") from None
    return ir.from_proto(proto)


def _unlock_reshapes(model: ir.Model) -> int:
    """A Reshape folded from a batch-1 export carries shape [1, ...]; copy the batch dimension instead.
    Returns how many were unlocked."""
    unlocked = 0
    for node in model.graph:
        if node.op_type != "Reshape" or node.inputs[1] is None or node.inputs[1].const_value is None:
            continue
        target = node.inputs[1].const_value.numpy()
        data_shape = node.inputs[0].shape
        if target.ndim != 1 or len(target) == 0 or target[0] != 1 or data_shape is None or len(data_shape) == 0:
            continue
        if isinstance(data_shape[0], int):
            continue
        fixed = target.copy()
        fixed[0] = 0
        if node.attributes.get("allowzero") is not None and node.attributes["allowzero"].as_int() == 1:
            continue
        new_value = ir.Value(name=f"{node.inputs[1].name}_batched", const_value=ir.tensor(fixed),
                             shape=ir.Shape(fixed.shape), type=ir.TensorType(ir.DataType.INT64))
        model.graph.register_initializer(new_value)
        node.replace_input_with(1, new_value)
        unlocked += 1
    return unlocked


def is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def constant(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def model_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def static_shape(value: ir.Value) -> list[int | str | None]:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else (d.value if d.value is not None else None) for d in value.shape]
