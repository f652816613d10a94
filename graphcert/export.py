"""Turning rewritten graphs into ONNX that runtimes load: names, IR version, full check, atomic writes."""
from __future__ import annotations

import os
import tempfile

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from .errors import GraphcertError

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


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GraphcertError(f"output folder does not exist: {folder}; create it first")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".graphcert-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: ir.Model | onnx.ModelProto, path: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    if source is not None and os.path.exists(path) and os.path.samefile(source, path):
        raise GraphcertError(f"refusing to overwrite the input model {path}; choose another output path")
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    atomic_write(proto.SerializeToString(), path)
