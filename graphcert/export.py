"""Turning rewritten graphs into ONNX that runtimes load: names, IR version, full check, atomic writes."""
from __future__ import annotations

import os

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from .errors import GraphcertError
from .files import atomic_write, refuse_overwrite  # noqa: F401  (atomic_write: re-exported)

# onnxruntime 1.31 loads IR <= 13 and onnxruntime-training 1.19 IR <= 10; the newest onnx writes 14.
IR_VERSION = 10


def to_proto(model: ir.Model, check: bool = True) -> onnx.ModelProto:
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.NameFixPass()(model)
    model.ir_version = IR_VERSION
    proto = ir.to_proto(model)
    if check:
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:
            raise GraphcertError(f"internal error: the generated graph fails the ONNX checker: "
                                 f"{str(exc).splitlines()[0]}") from None
    return proto


def save(model: ir.Model | onnx.ModelProto, path: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    refuse_overwrite([path], [source])
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    atomic_write(proto.SerializeToString(), path)
