"""How each op moves the batch axis (graphcert.batch_axis's per-op rules), and the helpers they share.

Each `_op_<Type>(node, axes_in)` returns the batch axis of every output (None: not batched), or None when the
op ends the trace; rules that free a hard-coded batch of 1 rewrite the node and say so in `self.rewrites`.
`OpRules` is a mixin of `graphcert.batch_axis.Tracer`, which walks the graph and holds the state they read.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Ops applied element by element with numpy broadcasting (the batch axis of any full-rank input carries over).
ELEMENTWISE = frozenset("""
Abs Acos Acosh Add And Asin Asinh Atan Atanh BitShift Cast CastLike Ceil Celu Clip Cos Cosh Div Dropout Elu Equal
Erf Exp Floor Gelu Greater GreaterOrEqual HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Less LessOrEqual Log
Max Mean Min Mish Mod Mul Neg Not Or Pow PRelu Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softplus
Softsign Sqrt Sub Sum Swish Tan Tanh ThresholdedRelu Where Xor BitwiseAnd BitwiseOr BitwiseXor BitwiseNot
""".split())
# Ops on [batch, channels, spatial...] tensors that treat every sample alone (batch axis 0 in, 0 out).
SAMPLEWISE = frozenset("""
Conv ConvTranspose MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool BatchNormalization
InstanceNormalization LRN GroupNormalization DepthToSpace SpaceToDepth MaxRoiPool
""".split())
# Elementwise ops whose extra inputs are per-channel parameters along an `axis` attribute.
QUANTIZE = frozenset({"QuantizeLinear", "DequantizeLinear"})
RECURRENT = frozenset({"LSTM", "GRU", "RNN"})
BATCH = "batch"  # a run-time shape entry that is the batch extent


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _dim(value: ir.Value, axis: int):
    # A constant's own tensor is the truth; its value's recorded shape may have lost static dims.
    shape = list(value.const_value.shape) if value.const_value is not None else value.shape
    return shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _axes(node: ir.Node, input_index: int = 1) -> tuple[bool, list[int] | None]:
    """(known, axes) from an `axes` attribute or constant input; known=False when they are computed at run time."""
    if "axes" in node.attributes:
        return True, [int(a) for a in node.attributes["axes"].value]
    if len(node.inputs) > input_index and node.inputs[input_index] is not None:
        axes = _const(node.inputs[input_index])
        return (axes is not None), (None if axes is None else [int(a) for a in axes.reshape(-1)])
    return True, None


class OpRules:
    """The per-op rules of `Tracer` (a mixin: `self` is the tracer)."""

    def _normalized_axis(self, node, rank, default):
        return _attr(node, "axis", default) % rank

    def _op_Softmax(self, node, axes_in):
        rank = _rank(node.inputs[0])
        if rank is None:
            return None
        axis = self._normalized_axis(node, rank, -1 if self.opset >= 13 else 1)
        a = axes_in[0]
        ok = axis != a if self.opset >= 13 else a < axis
        return [a] if ok else None

    _op_LogSoftmax = _op_Softmax
    _op_Hardmax = _op_Softmax

    def _op_LayerNormalization(self, node, axes_in):
        rank = _rank(node.inputs[0])
        if rank is None or any(a is not None for a in axes_in[1:]) or axes_in[0] >= _attr(node, "axis", -1) % rank:
            return None
        return [axes_in[0]] * len(node.outputs)

    _op_RMSNormalization = _op_LayerNormalization

    def _op_Transpose(self, node, axes_in):
        rank = _rank(node.inputs[0])
        perm = _attr(node, "perm") or (list(range(rank))[::-1] if rank is not None else None)
        return None if perm is None else [list(perm).index(axes_in[0])]

    def _op_Reshape(self, node, axes_in):
        a, data = axes_in[0], node.inputs[0]
        target = _const(node.inputs[1])
        if a is None or axes_in[1] is not None:
            return None
        if target is None:
            target = self._computed_target(node, a)
            if target is None:
                return None
        # allowzero=1 (the dynamo exporter's default) reads 0 as an empty dimension instead of "copy"; without
        # zeros in the target both readings agree, so the copy below may switch it off.
        if _attr(node, "allowzero", 0) and np.any(target == 0):
            return None
        dims = data.shape
        if dims is None or len(target) <= a:
            return None
        # The dims before the batch axis are kept as they are (same numbers, or 0 = copy).
        for i in range(a):
            if not (target[i] == 0 or (isinstance(dims[i], int) and target[i] == dims[i])):
                return None
        if target[a] == 0:
            return [a]
        if target[a] == 1 and not any(t == -1 for t in target[:a]):
            # A batch of 1 written as a number: copy the batch dimension instead (0 = copy, allowzero is 0).
            fixed = target.copy()
            fixed[a] = 0
            if -1 not in fixed and not _same_elements(dims, a, fixed):
                return None
            node.replace_input_with(1, _constant(self.model.graph, f"{node.inputs[1].name}_batched", fixed))
            if "allowzero" in node.attributes:
                node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
            self.rewrites.append(f"Reshape {node.name}: batch dimension copied instead of 1")
            return [a]
        if target[a] == -1 and _same_elements(dims, a, target):
            return [a]
        return None

    def _computed_target(self, node, a) -> np.ndarray | None:
        """A target computed from the batch extent and constants becomes a constant with 0 (copy) there."""
        entries = self.shape_values.get(node.inputs[1])
        if entries is None or len(entries) <= a or entries[a] is not BATCH or _attr(node, "allowzero", 0):
            return None
        if any(e is None or (e is BATCH and i != a) for i, e in enumerate(entries)):
            return None
        target = np.array([0 if e is BATCH else e for e in entries], dtype=np.int64)
        node.replace_input_with(1, _constant(self.model.graph, f"{node.inputs[1].name}_folded", target))
        self.rewrites.append(f"Reshape {node.name}: target computed from the batch extent folded")
        return target

    def _op_Flatten(self, node, axes_in):
        dims = node.inputs[0].shape
        if axes_in[0] != 0 or dims is None:
            return None
        axis = _attr(node, "axis", 1)
        axis = axis % len(dims) if axis < 0 else axis
        # Output axis 0 is the product of the dims before `axis`: the batch alone when the others are 1.
        return [0] if axis >= 1 and all(d == 1 for d in list(dims)[1:axis]) else None

    def _op_Squeeze(self, node, axes_in):
        known, axes = _axes(node)
        rank = _rank(node.inputs[0])
        if not known or axes is None or rank is None:
            return None  # without axes, the batch of 1 would be squeezed away
        axes = [x % rank for x in axes]
        a = axes_in[0]
        return None if a in axes else [a - sum(x < a for x in axes)]

    def _op_Unsqueeze(self, node, axes_in):
        known, axes = _axes(node)
        rank = _rank(node.outputs[0])
        if not known or axes is None or rank is None:
            return None
        a = axes_in[0]
        for x in sorted(x % rank for x in axes):
            if x <= a:
                a += 1
        return [a]

    def _op_Gemm(self, node, axes_in):
        if axes_in[0] != 0 or _attr(node, "transA", 0) or axes_in[1] is not None:
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if axes_in[2] is not None or (_rank(c) == 2 and _dim(c, 0) != 1):
                return None
        return [0]

    def _op_MatMul(self, node, axes_in):
        ra, rb = _rank(node.inputs[0]), _rank(node.inputs[1])
        out = _rank(node.outputs[0])
        if None in (ra, rb, out) or ra < 2 or rb < 2:
            return None
        a, b = axes_in
        position = None
        if a is not None:
            if a == ra - 1:
                return None  # the contracted axis
            position = a + out - ra
        if b is not None:
            if b >= rb - 2:
                return None  # a matrix axis of the right operand
            if position not in (None, b + out - rb):
                return None
            position = b + out - rb
        if position < out - 2:  # a broadcast batch dimension: the other operand must not have its own extent
            for value, axis in zip(node.inputs, axes_in):
                if axis is None:
                    at = position - (out - _rank(value))
                    if at >= 0 and _dim(value, at) != 1:
                        return None
        elif b is not None:
            return None
        return [position]

    def _op_Concat(self, node, axes_in):
        axis = _attr(node, "axis", 0)
        # Concat keeps the rank; an input's shape may be known where the output's is not yet (before a rewrite
        # upstream is re-inferred).
        rank = _rank(node.outputs[0]) or next((_rank(v) for v in node.inputs if _rank(v)), None)
        batched = [a for a in axes_in if a is not None]
        if rank is None or len(set(batched)) != 1 or batched[0] == axis % rank:
            return None
        a = batched[0]
        source = next(v for v, x in zip(node.inputs, axes_in) if x is not None)
        for index, (value, axis_in) in enumerate(zip(node.inputs, axes_in)):
            if axis_in is not None:
                continue
            if value in self.from_inputs or _rank(value) != rank or _dim(value, a) != 1:
                return None
            # A constant of batch 1 (a class token) beside batched tensors: repeat it along the batch.
            node.replace_input_with(index, _expand_along(self.model.graph, node, value, source, a))
            self.rewrites.append(f"Concat {node.name}: constant input {value.name} repeated along the batch")
        return [a]

    def _op_Split(self, node, axes_in):
        rank = _rank(node.inputs[0])
        if rank is None or _attr(node, "axis", 0) % rank == axes_in[0] or any(a is not None for a in axes_in[1:]):
            return None
        return [axes_in[0]] * len(node.outputs)

    def _op_Slice(self, node, axes_in):
        rank = _rank(node.inputs[0])
        axes = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if rank is None or any(a is not None for a in axes_in[1:]):
            return None
        if axes is None:
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                return None
            starts = _const(node.inputs[1])
            if starts is None:
                return None
            axes = np.arange(len(starts))
        return None if axes_in[0] in [int(x) % rank for x in axes] else [axes_in[0]]

    def _op_Gather(self, node, axes_in):
        data, indices = node.inputs
        rank, idx_rank = _rank(data), _rank(indices)
        if rank is None or idx_rank is None:
            return None
        axis = _attr(node, "axis", 0) % rank
        a, b = axes_in
        if a is not None and b is None:
            if a == axis:
                return None
            return [a if a < axis else a - 1 + idx_rank]
        if a is None and b is not None:
            return [axis + b]
        return None

    def _op_Pad(self, node, axes_in):
        rank = _rank(node.inputs[0])
        pads = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        if rank is None or pads is None or any(a is not None for a in axes_in[1:]):
            return None
        known, axes = _axes(node, 3)
        if not known:
            return None
        axes = list(range(rank)) if axes is None else [x % rank for x in axes]
        a = axes_in[0]
        if a in axes:
            i = axes.index(a)
            if pads[i] != 0 or pads[i + len(axes)] != 0:
                return None
        return [a]

    def _op_Resize(self, node, axes_in):
        a = axes_in[0]
        if any(x is not None for x in axes_in[1:]) or "axes" in node.attributes:
            return None
        scales = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if scales is not None and scales.size and scales[a] == 1:
            return [a]
        return None

    def _op_Expand(self, node, axes_in):
        shape = _const(node.inputs[1])
        out = _rank(node.outputs[0])
        entries = self.shape_values.get(node.inputs[1])
        if axes_in[0] is None and entries is not None and entries.count(BATCH) == 1 and out == len(entries):
            # A constant broadcast to the batch extent (a class token): batched where that extent goes, when
            # the constant itself has extent 1 there.
            position = entries.index(BATCH)
            at = position - (out - (_rank(node.inputs[0]) or 0))
            return [position] if at < 0 or _dim(node.inputs[0], at) == 1 else None
        if axes_in[0] is None or shape is None or out is None:
            return None
        position = axes_in[0] + out - _rank(node.inputs[0])
        at = position - (out - len(shape))
        return [position] if at < 0 or shape[at] == 1 else None

    def _op_Tile(self, node, axes_in):
        repeats = _const(node.inputs[1])
        return [axes_in[0]] if repeats is not None and axes_in[1] is None and repeats[axes_in[0]] == 1 else None

    def _reduce(self, node, axes_in, axes_input):
        rank = _rank(node.inputs[0])
        known, axes = _axes(node, axes_input)
        if rank is None or not known or any(a is not None for a in axes_in[1:]):
            return None
        if axes is None:
            if _attr(node, "noop_with_empty_axes", 0):
                return [axes_in[0]]
            return None
        axes = [x % rank for x in axes]
        a = axes_in[0]
        if a in axes:
            return None
        return [a if _attr(node, "keepdims", 1) else a - sum(x < a for x in axes)]

    def _op_ArgMax(self, node, axes_in):
        rank = _rank(node.inputs[0])
        axis = _attr(node, "axis", 0) % rank
        a = axes_in[0]
        return None if a == axis else [a if _attr(node, "keepdims", 1) or a < axis else a - 1]

    _op_ArgMin = _op_ArgMax

    def _op_CumSum(self, node, axes_in):
        axis = _const(node.inputs[1])
        rank = _rank(node.inputs[0])
        return None if axis is None or rank is None or int(axis) % rank == axes_in[0] else [axes_in[0]]

    def _op_TopK(self, node, axes_in):
        rank = _rank(node.inputs[0])
        return None if rank is None or _attr(node, "axis", -1) % rank == axes_in[0] else [axes_in[0]] * 2


for _op in ("ReduceMax ReduceMin ReduceSum ReduceMean ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp "
            "ReduceSumSquare").split():
    setattr(OpRules, f"_op_{_op}", lambda self, node, axes_in: self._reduce(node, axes_in, 1))


def _graph_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _same_elements(dims, a, target) -> bool:
    """Whether target[a+1:] holds exactly the elements of dims[a+1:] per batch element (all static)."""
    rest = list(dims)[a + 1:]
    if not all(isinstance(d, int) for d in rest):
        return False
    tail = [int(t) for t in target[a + 1:]]
    if any(t <= 0 for t in tail):
        return False
    return int(np.prod(rest)) == int(np.prod(tail))


def _expand_along(graph: ir.Graph, before: ir.Node, value: ir.Value, source: ir.Value, axis: int) -> ir.Value:
    """`value` (extent 1 on `axis`) broadcast to the extent of `source` on that axis."""
    rank = len(value.shape)
    nodes = []

    def add(op, inputs, **attrs):
        node = ir.node(op, inputs, attributes=attrs)
        nodes.append(node)
        return node.outputs[0]

    extent = add("Shape", [source], start=axis, end=axis + 1)
    ones = _constant(graph, f"{value.name}_ones", np.ones(rank, np.int64))
    where = _constant(graph, f"{value.name}_axis", np.array([axis], np.int64))
    shape = add("ScatterElements", [ones, where, extent])
    out = add("Expand", [value, shape])
    graph.insert_before(before, nodes)
    return out


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new int64 initializer under a name no other initializer has."""
    unique, n = name, 1
    while unique in graph.initializers:
        unique, n = f"{name}_{n}", n + 1
    value = ir.Value(name=unique, const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.INT64))
    graph.register_initializer(value)
    return value
