"""Unrolling recurrent and control-flow ops at import: LSTM, GRU, RNN, Scan, Loop and If become plain ops.

Bound passes rewrite straight-line graphs of tensor ops. A recurrent layer over a sequence of static length,
a Scan over a static axis, a Loop whose trip count and condition are computable from constants and an If
whose condition is, compute the same function as their bodies written out step by step; this module writes
them out (one-way, before version conversion and constant folding, so the rest of the importer sees plain
ops at the model's own opset). Bodies are copied with onnx_ir's Cloner: body inputs map to the values of the
iteration, values a body reads from an enclosing scope stay the enclosing values, and every copied value is
renamed with a prefix unique to its iteration. A node that cannot be written out (its length, trip count or
condition depends on the inputs) is refused with one line naming the node and why.

The cell maths of LSTM/GRU/RNN lives in `graphcert.unroll_rnn`.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir._cloner import Cloner

from .errors import GraphcertError, UnsupportedOpError

RECURRENT = {"LSTM", "GRU", "RNN"}
CONTROL_FLOW = {"Scan", "Loop", "If"}
UNROLLED = RECURRENT | CONTROL_FLOW
# A model unrolled into more nodes than this is refused: bound graphs grow with it, and a loop this long is
# better bounded by a rule of its own than copied.
MAX_NODES = 200_000
MAX_ITERATIONS = 10_000
MAX_ROUNDS = 32  # nesting depth of control flow (each round unrolls the outermost level)
RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


class Refused(Exception):
    """A node that cannot be unrolled; `pending` when it waits for an enclosing node unrolled in this round."""

    def __init__(self, why: str, pending: bool = False):
        super().__init__(why)
        self.pending = pending


class UnrollError(UnsupportedOpError):
    """A recurrent or control-flow node that cannot be written out as plain ops (one line: which and why)."""

    def __init__(self, node: ir.Node, why: str):
        GraphcertError.__init__(self, f"cannot unroll {node.op_type} node {node.name or '(unnamed)'}: {why}; "
                                      f"graphcert writes LSTM/GRU/RNN, Scan, Loop and If out as plain ops when "
                                      f"their sequence length, trip count and condition are known before the run")
        self.nodes_by_op, self.reasons = {node.op_type: [node.name or "(unnamed)"]}, {node.name or "(unnamed)": why}


def has_unrolled_ops(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in UNROLLED and n.domain in ("", "ai.onnx") for n in proto.graph.node)


def unroll(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with every LSTM/GRU/RNN/Scan/Loop/If of its main graph written out as plain ops (the proto
    itself when it has none); UnsupportedOpError naming the node when one cannot be."""
    if not has_unrolled_ops(proto):
        return proto
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    for round_ in range(MAX_ROUNDS):
        model = ir.from_proto(_with_shapes(proto))
        todo = [n for n in model.graph if n.op_type in UNROLLED and n.domain in ("", "ai.onnx")]
        if not todo:
            break
        refused, progress, layouts = {}, False, []
        for k, node in enumerate(todo):
            try:
                layouts += _unroll_node(model.graph, node, opset, f"{node.op_type.lower()}{round_}_{k}_")
                progress = True
            except Refused as why:
                if not why.pending:
                    refused[node] = str(why)
        if refused or not progress:
            node, why = next(iter(refused.items())) if refused else (todo[0], "it depends on a node not unrolled")
            raise UnrollError(node, why)
        _sink_transposes(model.graph, layouts, opset)
        if model.graph.num_nodes() > MAX_NODES:
            raise UnrollError(todo[0], f"unrolled, the model has more than {MAX_NODES} nodes")
        proto = ir.to_proto(model)
    else:
        raise UnrollError(todo[0], f"control flow nested deeper than {MAX_ROUNDS} levels")
    del proto.graph.value_info[:]  # shapes are inferred afresh by the importer (the batch may be freed)
    return proto


def _with_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # unknown shapes: lengths that need them are refused by the node's unroller
        return proto


def _unroll_node(graph: ir.Graph, node: ir.Node, opset: int, prefix: str) -> None:
    from .unroll_rnn import unroll_recurrent
    emit = Emitter(graph, node, opset, prefix)
    if node.op_type in RECURRENT:
        values = unroll_recurrent(emit, node)
    elif node.op_type == "If":
        values = _unroll_if(emit, node)
    elif node.op_type == "Loop":
        values = _unroll_loop(emit, node)
    else:
        values = _unroll_scan(emit, node) if opset >= 9 else _unroll_scan8(emit, node)
    emit.replace(values)
    return emit.layouts


def _sink_transposes(graph: ir.Graph, transposes: list[ir.Node], opset: int) -> None:
    """Move the Transposes that give unrolled outputs their sequence-first layout past the Squeeze that reads
    them and into the Transpose after it, where they cancel: torch's exports undo the layout right away, and
    bound passes (CROWN) need the batch axis to stay first in between."""
    for node in transposes:
        while node.graph is graph and len(node.outputs[0].uses()) == 1 and node.outputs[0] not in graph.outputs:
            user = next(iter(node.outputs[0].uses())).node
            perm = list(_attr(node, "perm"))
            emit = Emitter(graph, user, opset, f"{node.name}_sunk")
            if user.op_type == "Identity" and user.outputs[0] not in graph.outputs:
                ir.convenience.replace_all_uses_with(user.outputs[0], node.outputs[0])
                graph.remove(user, safe=True)
                continue
            if user.op_type == "Transpose":
                composite = [perm[q] for q in _attr(user, "perm")]
                result = node.inputs[0] if composite == sorted(composite) else \
                    emit.op("Transpose", node.inputs[0], perm=composite)
            elif user.op_type == "Squeeze":
                axes = _attr(user, "axes") if len(user.inputs) < 2 or user.inputs[1] is None else \
                    _evaluate(user.inputs[1], opset, {})
                if axes is None or isinstance(axes, str):
                    break
                axes = {int(a) % len(perm) for a in np.asarray(axes).reshape(-1)}
                removed = sorted(perm[a] for a in axes)
                left = [p for p in range(len(perm)) if p not in removed]
                squeezed = emit.squeeze(node.inputs[0], removed)
                result = emit.op("Transpose", squeezed, perm=[left.index(p) for i, p in enumerate(perm)
                                                              if i not in axes])
            else:
                break
            if user.outputs[0] in graph.outputs:  # keep the graph output's name
                result = emit.op("Identity", result)
            ir.convenience.replace_all_uses_with(user.outputs[0], result, replace_graph_outputs=True)
            graph.remove(user, safe=True)
            if not node.outputs[0].uses():
                graph.remove(node, safe=True)
            if result.producer() is None or result.producer().op_type != "Transpose":
                break
            node = result.producer()


class Emitter:
    """Writes nodes into `graph` just before `anchor` (the node being unrolled), at the model's opset."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, opset: int, prefix: str):
        self.graph, self.anchor, self.opset, self.prefix = graph, anchor, opset, prefix
        self.count = 0
        self.constants: dict = {}
        self.layouts: list[ir.Node] = []  # Transposes that give outputs a sequence-first layout

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes, name=self._name(op_type))
        node.outputs[0].name = node.name
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def const(self, array) -> ir.Value:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            self.constants[key] = self.op("Constant", value=ir.tensor(array))
        return self.constants[key]

    def ints(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64))

    def squeeze(self, x: ir.Value, axes: list[int]) -> ir.Value:
        return self.op("Squeeze", x, self.ints(axes)) if self.opset >= 13 else self.op("Squeeze", x, axes=axes)

    def unsqueeze(self, x: ir.Value, axes: list[int]) -> ir.Value:
        return self.op("Unsqueeze", x, self.ints(axes)) if self.opset >= 13 else self.op("Unsqueeze", x, axes=axes)

    def pick(self, x: ir.Value, index: int, axis: int) -> ir.Value:
        """x at `index` along `axis` (the axis removed)."""
        return self.op("Gather", x, self.const(np.asarray(index, np.int64)), axis=axis)

    def stack(self, values: list[ir.Value], axis: int) -> ir.Value:
        """The values stacked along a new axis `axis` (non-negative)."""
        expanded = [self.unsqueeze(v, [axis]) for v in values]
        return expanded[0] if len(expanded) == 1 else self.op("Concat", *expanded, axis=axis)

    def inline(self, body: ir.Graph, actuals: list[ir.Value], tag: str) -> list[ir.Value]:
        """The body's nodes copied before the anchor with its inputs bound to `actuals`; its outputs."""
        value_map: dict = dict(zip(body.inputs, actuals))
        for init in body.initializers.values():
            value_map[init] = self.op("Constant", value=init.const_value)
        prefix = f"{self.prefix}{tag}_"

        def rename(node: ir.Node) -> None:
            node.name = prefix + (node.name or node.op_type)
            for out in node.outputs:
                out.name = prefix + (out.name or "v")
        cloner = Cloner(attr_map={}, value_map=value_map, metadata_props={}, post_process=rename,
                        resolve_ref_attrs=False, allow_outer_scope_values=True)
        for node in body:
            self.graph.insert_before(self.anchor, cloner.clone_node(node))
        return [value_map.get(v, v) for v in body.outputs]

    def replace(self, values: list[ir.Value | None]) -> None:
        """The anchor's outputs replaced by `values` (graph outputs keep their names) and the anchor removed."""
        for old, new in zip(self.anchor.outputs, values):
            if not old.uses() and old not in self.graph.outputs:
                continue
            if new is None:
                raise Refused(f"its output {old.name!r} is used but has no unrolled value")
            name = old.name
            old.name = f"{name}__replaced"
            copy = self.op("Identity", new)
            copy.name, copy.type, copy.shape = name, old.type, old.shape
            ir.convenience.replace_all_uses_with(old, copy, replace_graph_outputs=True)
        for out in self.anchor.outputs:  # unused outputs: nothing refers to them any more
            assert not out.uses(), out
        self.graph.remove(self.anchor, safe=True)

    def constant_value(self, value: ir.Value | None, what: str) -> np.ndarray:
        """The value of a tensor computable from constants alone; Refused naming `what` otherwise."""
        result = _evaluate(value, self.opset, {})
        if isinstance(result, str):
            raise Refused(f"{what} {result}", pending=result == PENDING)
        return result


PENDING = "depends on a control-flow node not unrolled yet"


def _evaluate(value: ir.Value, opset: int, memo: dict):
    """The value's array when computable from constants, else why not (a string)."""
    if value in memo:
        return memo[value]
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None:
        return "depends on the input"
    if node.op_type in UNROLLED:
        return PENDING
    if node.op_type in RANDOM or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                     for a in node.attributes.values()):
        return "depends on a random or control-flow op"
    arrays = []
    for v in node.inputs:
        if v is None:
            arrays.append(None)
            continue
        got = _evaluate(v, opset, memo)
        if isinstance(got, str):
            memo[value] = got
            return got
        arrays.append(got)
    outputs = _run_node(node, arrays, opset)
    for out, array in zip(node.outputs, outputs):
        memo[out] = array
    return memo[value]


def _run_node(node: ir.Node, arrays: list, opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator
    names = [f"in{k}" if a is not None else "" for k, a in enumerate(arrays)]
    outs = [f"out{k}" for k in range(len(node.outputs))]
    proto = ir.serde.serialize_node(node)
    del proto.input[:], proto.output[:]
    proto.input.extend(names)
    proto.output.extend(outs)
    graph = onnx.helper.make_graph([proto], "constant", [onnx.helper.make_tensor_value_info(n, 0, None)
                                                         for n in names if n],
                                   [onnx.helper.make_tensor_value_info(n, 0, None) for n in outs])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {n: a for n, a in zip(names, arrays) if n}
    return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


# ---- If, Loop, Scan ------------------------------------------------------------------------------------

def _unroll_if(emit: Emitter, node: ir.Node) -> list[ir.Value]:
    condition = bool(np.asarray(emit.constant_value(node.inputs[0], "the condition")).reshape(-1)[0])
    branch = _attr(node, "then_branch" if condition else "else_branch")
    return emit.inline(branch, [], "then" if condition else "else")


def _unroll_loop(emit: Emitter, node: ir.Node) -> list[ir.Value]:
    trip_input = node.inputs[0] if len(node.inputs) > 0 else None
    cond_input = node.inputs[1] if len(node.inputs) > 1 else None
    carried = list(node.inputs[2:])
    body = _attr(node, "body")
    trips = None if trip_input is None else int(np.asarray(emit.constant_value(trip_input, "the trip count")))
    going = True if cond_input is None else bool(np.asarray(emit.constant_value(cond_input, "the condition")))
    n_scan = len(body.outputs) - 1 - len(carried)
    scans: list[list[ir.Value]] = [[] for _ in range(n_scan)]
    step = 0
    while going and (trips is None or step < trips):
        if step >= MAX_ITERATIONS:
            raise Refused(f"more than {MAX_ITERATIONS} iterations")
        iteration = emit.const(np.asarray(step, np.int64))
        outs = emit.inline(body, [iteration, emit.const(np.asarray(True)), *carried], f"it{step}")
        if cond_input is not None:  # without a condition input, the body's condition output is ignored
            going = bool(np.asarray(emit.constant_value(outs[0], "the loop condition")))
        carried = outs[1:1 + len(carried)]
        for k in range(n_scan):
            scans[k].append(outs[1 + len(node.inputs[2:]) + k])
        step += 1
    if n_scan and step == 0:
        raise Refused("no iteration runs, so its scan outputs have no static shape")
    return carried + [emit.stack(s, 0) for s in scans]


def _scan_length(inputs: list[ir.Value], axes: list[int]) -> int:
    lengths = set()
    for x, axis in zip(inputs, axes):
        dims = list(x.shape) if x.shape is not None else None
        if dims is None or not isinstance(dims[axis], int):
            raise Refused("the length of its scan axis is not static")
        lengths.add(dims[axis])
    if len(lengths) != 1:
        raise Refused(f"its scan inputs have different lengths {sorted(lengths)}")
    return lengths.pop()


def _ranks(values: list[ir.Value]) -> list[int]:
    if any(v.shape is None for v in values):
        raise Refused("the rank of a scan input is not known")
    return [len(v.shape) for v in values]


def _unroll_scan(emit: Emitter, node: ir.Node) -> list[ir.Value]:
    body = _attr(node, "body")
    m = _attr(node, "num_scan_inputs")
    states, xs = list(node.inputs[:len(node.inputs) - m]), list(node.inputs[len(node.inputs) - m:])
    axes = [a % r for a, r in zip(_attr(node, "scan_input_axes", [0] * m), _ranks(xs))]
    directions = _attr(node, "scan_input_directions", [0] * m)
    length = _scan_length(xs, axes)
    n_out = len(body.outputs) - len(states)
    scans: list[list[ir.Value]] = [[] for _ in range(n_out)]
    for t in range(length):
        slices = [emit.pick(x, length - 1 - t if rev else t, a) for x, a, rev in zip(xs, axes, directions)]
        outs = emit.inline(body, states + slices, f"it{t}")
        states = outs[:len(states)]
        for k in range(n_out):
            scans[k].append(outs[len(states) + k])
    if n_out and length == 0:
        raise Refused("its scan axis is empty, so its scan outputs have no static shape")
    out_axes = _attr(node, "scan_output_axes", [0] * n_out)
    out_dirs = _attr(node, "scan_output_directions", [0] * n_out)
    stacked = []
    for k in range(n_out):
        rank = _ranks([scans[k][0]])[0] + 1 if out_axes[k] < 0 else 0
        axis = out_axes[k] % rank if out_axes[k] < 0 else out_axes[k]
        stacked.append(emit.stack(scans[k][::-1] if out_dirs[k] else scans[k], axis))
    return states + stacked


def _unroll_scan8(emit: Emitter, node: ir.Node) -> list[ir.Value]:
    """Scan before opset 9: every input has a leading batch axis, the scan axis is 1, the body runs per batch
    element; its optional first input holds per-element sequence lengths."""
    body = _attr(node, "body")
    m = _attr(node, "num_scan_inputs")
    lengths_input, rest = node.inputs[0], list(node.inputs[1:])
    states, xs = rest[:len(rest) - m], rest[len(rest) - m:]
    directions = _attr(node, "directions", [0] * m)
    length = _scan_length(xs, [1] * m)
    batch = _scan_length(xs, [0] * m)
    if lengths_input is not None:
        given = np.asarray(emit.constant_value(lengths_input, "sequence_lens")).reshape(-1)
        if np.any(given != length):
            raise Refused("sequence_lens shorter than the scan axis is not unrolled")
    n_out = len(body.outputs) - len(states)
    finals: list[list[ir.Value]] = [[] for _ in states]
    scans: list[list[ir.Value]] = [[] for _ in range(n_out)]
    for b in range(batch):
        carried = [emit.pick(s, b, 0) for s in states]
        per_step: list[list[ir.Value]] = [[] for _ in range(n_out)]
        rows = [emit.pick(x, b, 0) for x in xs]
        for t in range(length):
            slices = [emit.pick(x, length - 1 - t if rev else t, 0) for x, rev in zip(rows, directions)]
            outs = emit.inline(body, carried + slices, f"b{b}_it{t}")
            carried = outs[:len(states)]
            for k in range(n_out):
                per_step[k].append(outs[len(states) + k])
        for k, value in enumerate(carried):
            finals[k].append(value)
        for k in range(n_out):
            scans[k].append(emit.stack(per_step[k], 0))
    return [emit.stack(f, 0) for f in finals] + [emit.stack(s, 0) for s in scans]
