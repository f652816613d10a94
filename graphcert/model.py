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
from .normalise_ops import expand_functions, floor_mode_pools
from .unroll import unroll

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


def normalise(proto: onnx.ModelProto, opset: int = TARGET_OPSET, check: bool = True) -> ir.Model:
    """The model at `opset`, constants folded, shapes inferred and a batch of 1 freed where the trace proves it
    is the batch axis; with `check`, compared with the original in onnxruntime (ModelLoadError when it
    disagrees). A batch that cannot be freed stays fixed; metadata `graphcert.fixed_batch` says why."""
    proto = _copy(proto)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"invalid ONNX model: {_first_line(exc)}") from None
    if len(proto.graph.node) == 0:
        raise ModelLoadError("the model has no nodes")
    original = _copy(proto) if check else None
    proto = unroll(proto)  # recurrent and control-flow ops written out as plain ops (graphcert.unroll)
    import json

    from .dtypes import IO_META, META, io_dtypes, model_dtype, to_float32
    dtype = model_dtype(proto)
    types = json.dumps(io_dtypes(proto))
    if dtype is not None:  # bounds are computed in float32 (see graphcert.dtypes)
        proto = to_float32(proto)
    model, freed = _normalised(proto, opset, free_batch=True)
    if dtype is not None:
        model.metadata_props[META], model.metadata_props[IO_META] = dtype, types
    if not check:
        return model
    why_fixed = _compare(original, model, freed, _dynamic_batch(original))
    if why_fixed is not None:
        model, _ = _normalised(proto, opset, free_batch=False)
        _compare(original, model, set())
        model.metadata_props["graphcert.fixed_batch"] = why_fixed
        if dtype is not None:
            model.metadata_props[META], model.metadata_props[IO_META] = dtype, types
    return model


def _compare(original: onnx.ModelProto, model: ir.Model, freed: set[str],
             dynamic: frozenset[str] = frozenset()) -> str | None:
    from .load_check import Disagreement, check
    try:
        return check(original, ir.to_proto(model), freed, dynamic)
    except Disagreement as exc:
        raise ModelLoadError(f"graphcert's normalised model disagrees with the original in onnxruntime: {exc}; "
                             f"refusing to bound a different function (please report this model)") from None


def batch_note(model: ir.Model) -> str | None:
    """Why the model's batch stays fixed at its exported size (None when it runs at any batch size)."""
    return model.metadata_props.get("graphcert.fixed_batch")


def _normalised(proto: onnx.ModelProto, opset: int, free_batch: bool) -> tuple[ir.Model, set[str]]:
    proto = _copy(proto)
    _drop_initializer_inputs(proto)
    proto = expand_functions(proto)  # ops defined by an ONNX function body, where no pass has a rule
    proto = floor_mode_pools(proto)  # ceil-mode pools in the form every opset's shape inference agrees on
    proto = unroll(proto)  # a body may loop (LinearAttention's is a Scan over the sequence)
    # IR < 4 requires initializers to be listed as inputs; the newer IR lets them stand alone.
    proto.ir_version = max(proto.ir_version, 8)
    freed = _make_batch_symbolic(proto) if free_batch else set()
    if not any(o.domain in ("", "ai.onnx") for o in proto.opset_import):
        # No default-domain op (an ai.onnx.ml model alone): nothing to convert, the target opset is declared.
        proto.opset_import.append(onnx.helper.make_opsetid("", opset))
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
    batched = freed | (_dynamic_batch(proto) if free_batch else set())
    if batched:
        from .batch_axis import Tracer
        starts = {v: 0 for v in model_inputs(model) if v.name in batched}
        tracer = Tracer(model, starts, model.opset_imports.get("", opset))
        axes = tracer.run()
        if tracer.rewrites:
            for out in model.graph.outputs:  # inference ran while a rewritten Reshape still said 1
                if axes.get(out) == 0 and out.shape is not None:
                    out.shape = ir.Shape([BATCH, *list(out.shape)[1:]])
            model = _infer_shapes(model, fresh=True)
    common_passes.RemoveUnusedNodesPass()(model)
    return model, freed


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


def _dynamic_batch(proto: onnx.ModelProto) -> frozenset[str]:
    """Inputs of rank >= 2 whose leading dimension is symbolic: exported with a dynamic batch."""
    initializers = {init.name for init in proto.graph.initializer}
    return frozenset(v.name for v in proto.graph.input if v.name not in initializers
                     and len(v.type.tensor_type.shape.dim) >= 2
                     and not v.type.tensor_type.shape.dim[0].HasField("dim_value"))


def _make_batch_symbolic(proto: onnx.ModelProto) -> set[str]:
    """A leading dimension of 1 on inputs of rank >= 2 becomes the symbolic `batch`, so graphs run batched;
    returns the inputs so freed."""
    freed = set()
    for is_input, values in ((True, proto.graph.input), (False, proto.graph.output)):
        for value in values:
            dims = value.type.tensor_type.shape.dim
            if len(dims) >= 2 and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
                dims[0].dim_param = BATCH
                if is_input:
                    freed.add(value.name)
    if freed:
        del proto.graph.value_info[:]
    return freed


def _infer_shapes(model: ir.Model, fresh: bool = False) -> ir.Model:
    proto = ir.to_proto(model)
    if fresh:
        del proto.graph.value_info[:]  # re-derived: a rewrite has freed a dimension recorded as 1
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:
        raise ModelLoadError(f"shape inference failed: {_first_line(exc)}") from None
    return ir.from_proto(proto)


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
