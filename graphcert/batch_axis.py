"""Where the batch axis goes: traced from the graph inputs through ops whose batch behaviour is known.

A model exported with a batch of 1 hard-codes that 1 in shape tensors (Reshape targets, Expand shapes, zero
initial states of recurrent layers). The importer frees the batch by rewriting exactly those constants whose
axis provably *is* the batch axis: the axis is followed from each batched graph input, op by op, and every op
not described here ends the trace (its outputs are not batched, so nothing downstream of it is rewritten).
Whatever the trace misses, the load-time check against onnxruntime (`graphcert.load_check`) catches: a model
whose batch cannot be freed keeps its fixed batch instead of computing another function.
"""
from __future__ import annotations
import numpy as np
import onnx_ir as ir

from .batch_axis_ops import (BATCH, ELEMENTWISE, QUANTIZE, RECURRENT, SAMPLEWISE, OpRules,  # noqa: F401
                             _attr, _axes, _const, _constant, _dim, _expand_along, _graph_inputs, _rank,
                             _same_elements)


class Tracer(OpRules):
    """Batch axis of every value reachable from `starts` (value -> axis), applying the rewrites that free it."""

    def __init__(self, model: ir.Model, starts: dict[ir.Value, int], opset: int):
        self.model, self.opset = model, opset
        self.axis: dict[ir.Value, int] = dict(starts)
        self.rewrites: list[str] = []
        self.stopped: dict[str, str] = {}  # op type -> why the trace ends there (first node of each type)
        # Values computed from the graph inputs (grown as the trace walks; everything else is a constant).
        self.from_inputs: set[ir.Value] = set(starts) | set(_graph_inputs(model))
        # Shape tensors computed at run time, entry by entry: an int, BATCH (the batch extent) or None (unknown).
        self.shape_values: dict[ir.Value, list] = {}

    def run(self) -> dict[ir.Value, int]:
        for node in list(self.model.graph):
            if any(v in self.from_inputs for v in node.inputs if v is not None):
                self.from_inputs.update(node.outputs)
            self._shape_expression(node)
            axes_in = [self.axis.get(v) if v is not None else None for v in node.inputs]
            if all(a is None for a in axes_in) and not (
                    node.op_type == "Expand" and node.inputs[1] in self.shape_values):
                continue
            rule = getattr(self, f"_op_{node.op_type}", None)
            if node.domain not in ("", "ai.onnx"):
                rule = None
            if rule is None:
                if node.op_type in ELEMENTWISE:
                    rule = self._elementwise
                elif node.op_type in SAMPLEWISE:
                    rule = self._samplewise
                elif node.op_type in QUANTIZE:
                    rule = self._quantize
                elif node.op_type in RECURRENT:
                    rule = self._recurrent
            outs = rule(node, axes_in) if rule is not None else None
            if outs is None:
                self.stopped.setdefault(node.op_type, node.name or node.op_type)
                continue
            for value, axis in zip(node.outputs, outs):
                if axis is not None and value is not None:
                    self.axis[value] = axis
        return self.axis

    def _entries(self, value: ir.Value | None) -> list | None:
        if value is None:
            return None
        if value in self.shape_values:
            return self.shape_values[value]
        const = _const(value)
        if const is not None and const.dtype == np.int64 and const.ndim <= 1:
            return [int(x) for x in const.reshape(-1)]
        return None

    def _shape_expression(self, node: ir.Node) -> None:
        """Follow Shape -> Gather/Slice -> Unsqueeze/Squeeze -> Concat chains that build shapes at run time."""
        op, out = node.op_type, node.outputs[0] if node.outputs else None
        if node.domain not in ("", "ai.onnx") or out is None:
            return
        entries = None
        if op == "Shape" and node.inputs[0].shape is not None:
            source = node.inputs[0]
            axis = self.axis.get(source)
            dims = [BATCH if i == axis else (d if isinstance(d, int) else None) for i, d in enumerate(source.shape)]
            rank = len(dims)
            start, end = _attr(node, "start", 0), _attr(node, "end", rank)
            entries = dims[slice(start, end)]
        elif op in ("Unsqueeze", "Squeeze", "Identity", "Cast") and node.inputs[0] is not None:
            entries = self._entries(node.inputs[0]) if op != "Cast" or _attr(node, "to") == 7 else None
        elif op == "Gather" and _attr(node, "axis", 0) == 0:
            source, index = self._entries(node.inputs[0]), _const(node.inputs[1])
            if source is not None and index is not None and index.size == 1:
                entries = [source[int(index.reshape(-1)[0])]]
        elif op == "Slice" and len(node.inputs) >= 3:
            source = self._entries(node.inputs[0])
            starts, ends = _const(node.inputs[1]), _const(node.inputs[2])
            steps = _const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
            axes = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            if source is not None and starts is not None and ends is not None and starts.size == 1 and \
                    (axes is None or int(axes.reshape(-1)[0]) in (0, -1)):
                step = 1 if steps is None else int(steps.reshape(-1)[0])
                end = int(ends.reshape(-1)[0])
                entries = source[int(starts.reshape(-1)[0]):(None if end >= 2 ** 62 else end):step]
        elif op == "Concat":
            parts = [self._entries(v) for v in node.inputs]
            if all(p is not None for p in parts):
                entries = [e for p in parts for e in p]
        if entries is not None and BATCH in entries:
            self.shape_values[out] = entries

    # ---- families -----------------------------------------------------------------------------------------

    def _elementwise(self, node, axes_in):
        out_rank = _rank(node.outputs[0])
        if out_rank is None:
            return None
        position = None
        for value, axis in zip(node.inputs, axes_in):
            if value is None or axis is None:
                continue
            shifted = axis + out_rank - _rank(value)
            if position not in (None, shifted):
                return None
            position = shifted
        for value, axis in zip(node.inputs, axes_in):
            if value is None or axis is not None:
                continue
            rank = _rank(value)
            if rank is None:
                return None
            at = position - (out_rank - rank)
            if at >= 0 and _dim(value, at) != 1:
                return None  # this input has its own extent on the batch axis
        return [position] + [position if o is not None and _rank(o) == out_rank else None
                             for o in node.outputs[1:]]

    def _samplewise(self, node, axes_in):
        if axes_in[0] != 0 or any(a is not None for a in axes_in[1:]):
            return None
        return [0] * len(node.outputs) if node.op_type == "MaxPool" else [0] + [None] * (len(node.outputs) - 1)

    def _quantize(self, node, axes_in):
        if axes_in[0] is None or any(a is not None for a in axes_in[1:]):
            return None
        rank = _rank(node.inputs[0])
        scale_rank = _rank(node.inputs[1])
        if scale_rank and rank is not None and _attr(node, "axis", 1) % rank == axes_in[0]:
            return None  # per-channel parameters along the batch axis
        return [axes_in[0]]

    def _recurrent(self, node, axes_in):
        layout = _attr(node, "layout", 0)
        expected = 0 if layout else 1
        if axes_in[0] != expected or any(a is not None for a in axes_in[1:]):
            return None
        for index in (5, 6):  # initial_h, initial_c: [directions, batch, hidden] (layout 0)
            if len(node.inputs) > index and node.inputs[index] is not None:
                state = _const(node.inputs[index])
                if state is None or state.size == 0 or np.any(state != 0):
                    return None
                node.replace_input_with(index, None)  # an all-zero initial state is the ONNX default
                self.rewrites.append(f"{node.op_type} {node.name}: zero initial state dropped")
        y_axis, state_axis = (0, 0) if layout else (2, 1)
        return [y_axis, state_axis, state_axis][:len(node.outputs)]
