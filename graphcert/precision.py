"""Bound graphs run in float64, so that their own rounding all but vanishes from the float32 slack.

A bound graph bounds the model in real arithmetic but computes in some arithmetic of its own; graphcert.rounding
bounds that computation's error by the plain |W|-product analysis in the bound graph's arithmetic
(`RoundingSlack(bound_arithmetic=...)`). Run in float32 that error is about twice the model's own and dominates
the slack of `verify --rounding float32`; in float64 it is 2^-29 times smaller. Everything else stays float32:

- the graph is built in float32 by the passes and widened here (`to_float64`): every float32 tensor, type and
  cast becomes float64, which holds every float32 value exactly, so it is the same computation done wider;
- onnxruntime runs it where its CPU kernels cover every op in double (no Conv, ConvTranspose or AveragePool
  there: `onnxruntime_runs_double` says so before a `DoubleSession` is made);
- its outputs come back as float32 rounded outward: names whose first part ends with "lower" (`y_lower`,
  `margins_lower`, `clamped_lower.z`) round down, "upper" up, others to nearest, so callers keep their float32
  arrays and every bound stays a bound.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from .arithmetic import ARITHMETICS

log = logging.getLogger(__name__)
FLOAT64 = ARITHMETICS["float64"]
_FLOAT, _DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE


def to_float64(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every float32 tensor, type and cast made float64."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    _widen_graph(out.graph)
    return out


def _widen_tensor(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == _FLOAT:
        wide = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float64), tensor.name)
        tensor.CopyFrom(wide)


def _widen_type(type_proto: onnx.TypeProto) -> None:
    if type_proto.HasField("tensor_type") and type_proto.tensor_type.elem_type == _FLOAT:
        type_proto.tensor_type.elem_type = _DOUBLE


# onnxruntime has no float64 kernel for these; each takes its input through an exact cast that keeps what it
# reads (NonZero: which elements are non-zero).
_READ_THROUGH = {"NonZero": onnx.TensorProto.BOOL}


def _widen_graph(graph: onnx.GraphProto) -> None:
    _read_through(graph)
    for tensor in graph.initializer:
        _widen_tensor(tensor)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        _widen_type(value.type)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                _widen_tensor(attribute.t)
            elif attribute.type == onnx.AttributeProto.GRAPH:
                _widen_graph(attribute.g)
            elif attribute.name == "to" and attribute.i == _FLOAT and node.op_type in ("Cast", "RandomNormal"):
                attribute.i = _DOUBLE
        if node.op_type == "Constant":
            _constant_as_tensor(node)


def _read_through(graph: onnx.GraphProto) -> None:
    nodes = []
    for node in graph.node:
        if node.op_type in _READ_THROUGH and node.input:
            cast = f"{node.name or node.output[0]}_read_through"
            nodes.append(onnx.helper.make_node("Cast", [node.input[0]], [cast], to=_READ_THROUGH[node.op_type]))
            node.input[0] = cast
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _constant_as_tensor(node: onnx.NodeProto) -> None:
    """Constant nodes given by value_float(s) produce float32: rewrite them as float64 tensors."""
    for k, attribute in enumerate(node.attribute):
        if attribute.name in ("value_float", "value_floats"):
            values = np.float64(attribute.f) if attribute.name == "value_float" else \
                np.asarray(attribute.floats, dtype=np.float64)
            del node.attribute[k]
            node.attribute.append(onnx.helper.make_attribute("value", onnx.numpy_helper.from_array(values)))
            return


def outward(name: str, array: np.ndarray) -> np.ndarray:
    """A float64 output as float32, rounded in the direction its name says it bounds (see the module doc)."""
    if array.dtype != np.float64:
        return array
    narrow = array.astype(np.float32)
    kind = name.split(".")[0]
    if kind.endswith("lower"):
        return np.where(narrow > array, np.nextafter(narrow, np.float32(-np.inf)), narrow)
    if kind.endswith("upper"):
        return np.where(narrow < array, np.nextafter(narrow, np.float32(np.inf)), narrow)
    return narrow


# The session `onnxruntime_runs_double` made to find out, for the `DoubleSession` that usually follows (making
# one for a wide graph takes seconds): (the graph it was made for, the session).
_tried: tuple | None = None


def onnxruntime_runs_double(proto: onnx.ModelProto) -> bool:
    """Whether onnxruntime's CPU kernels cover every op of the graph in float64."""
    global _tried
    from .runtime import Session
    try:
        _tried = (proto, Session(to_float64(proto), log_severity=4))
    except Exception as refusal:   # onnxruntime raises its own NotImplemented/Fail types for a missing kernel
        log.info("onnxruntime cannot run the graph in float64: %s", str(refusal).splitlines()[0][:200])
        return False
    return True


class DoubleSession:
    """A bound graph run in float64 by onnxruntime, with the interface of graphcert.runtime.Session: float32
    feeds in (widened exactly), float32 outputs rounded outward."""

    def __init__(self, proto: onnx.ModelProto, threads: int = 0):
        global _tried
        from .runtime import Session
        if _tried is not None and _tried[0] is proto and not threads:
            self.session, _tried = _tried[1], None
        else:
            self.session = Session(to_float64(proto), threads=threads)
        self.output_names = self.session.output_names

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        found = self.session.run(feeds, outputs or self.output_names)
        return {name: outward(name, np.asarray(value)) for name, value in found.items()}
