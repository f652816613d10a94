"""Emitting nodes and constants into an onnx_ir graph while a pass rewrites it."""
from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir


# Constants of at most this many elements are shared within a graph (`Builder.const`).
SHARED_CONSTANT_SIZE = 16


class Builder:
    """Appends nodes to `graph`; constants become initializers with unique names."""

    def __init__(self, graph: ir.Graph, prefix: str = "gc"):
        self.graph = graph
        self.opset = graph.opset_imports.get("", 17)
        self.tape = ir.tape.Tape(graph)
        self.prefix = prefix
        self._ids = itertools.count()
        self._abs_cache: dict[int, ir.Value] = {}
        self._small_constants: dict[tuple, ir.Value] = {}

    def fresh(self, hint: str = "t") -> str:
        return f"{self.prefix}_{hint}_{next(self._ids)}"

    def op(self, op_type: str, *inputs: ir.Value | None, num_outputs: int = 1, **attrs):
        attrs = {k: v for k, v in attrs.items() if v is not None}
        if num_outputs == 1:
            out = self.tape.op(op_type, list(inputs), attrs)
            out.name = self.fresh(op_type.lower())
            return out
        outs = self.tape.op_multi_out(op_type, list(inputs), attrs, num_outputs=num_outputs)
        for out in outs:
            out.name = self.fresh(op_type.lower())
        return outs

    def const(self, array, dtype=np.float32, hint: str = "c") -> ir.Value:
        """An initializer holding `array`; small ones (shapes, axes, scalars) are made once per graph and shared:
        CROWN's backward passes ask for the same few thousands of times, and each costs more to build than a node."""
        array = np.asarray(array, dtype=dtype)
        if array.size > SHARED_CONSTANT_SIZE:
            return self._new_const(array, hint)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._small_constants:
            self._small_constants[key] = self._new_const(array, hint)
        return self._small_constants[key]

    def _new_const(self, array: np.ndarray, hint: str) -> ir.Value:
        value = ir.Value(name=self.fresh(hint), const_value=ir.tensor(array),
                         shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        self.graph.register_initializer(value)
        return value

    def ints(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64), dtype=np.int64, hint="i")

    def copy(self, node: ir.Node, inputs, num_outputs: int = 1):
        """Emit `node` again with other inputs and the same attributes."""
        new = ir.Node(node.domain, node.op_type, list(inputs), attributes=list(node.attributes.values()),
                      num_outputs=num_outputs, graph=self.graph, name=self.fresh(node.op_type.lower()))
        for out in new.outputs:
            out.name = self.fresh(node.op_type.lower())
        return new.outputs[0] if num_outputs == 1 else list(new.outputs)

    def reduce(self, op_type: str, x: ir.Value, axes, keepdims: int = 1) -> ir.Value:
        """Reductions took `axes` as an attribute until opset 18 (ReduceSum: 13)."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, x, self.ints(list(axes)), keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)
