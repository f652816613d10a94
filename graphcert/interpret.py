"""The walk every rewrite pass shares: visit a graph in order, one rule per op type for perturbed tensors.

Abstract values are a domain object (an `Interval`, or a pass's own type) for tensors that depend on the
perturbed inputs, and plain `ir.Value`s for tensors that do not (constants and shape computations), which
the rewritten graph reads from the original nodes it still contains.
"""
from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from .errors import UnsupportedOpError

# Ops whose output depends on the shape of their input only, never on its values.
SHAPE_ONLY_OPS = {"Shape", "Size"}


def perturbed_nodes(graph: ir.Graph, sources: set[ir.Value]) -> list[ir.Node]:
    """Nodes that read a tensor depending on the values of `sources`, in graph order."""
    tainted = set(sources)
    found = []
    for node in graph:
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        if any(v in tainted for v in node.inputs if v is not None):
            found.append(node)
            tainted.update(node.outputs)
    return found


def check_supported(nodes: list[ir.Node], rules: dict[str, Callable], method: str, accepts=None) -> None:
    """An UnsupportedOpError listing every node without a rule, that `accepts` refuses, or that no method can
    bound (`refusal`, with its reason)."""
    missing: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for node in nodes:
        reason = refusal(node)
        if reason or node.domain not in ("", "ai.onnx") or node.op_type not in rules or (accepts and not accepts(node)):
            missing.setdefault(node.op_type, []).append(node.name or "(unnamed)")
            if reason:
                reasons[node.name or "(unnamed)"] = reason
    if missing:
        raise UnsupportedOpError(method, missing, reasons)


def refusal(node: ir.Node) -> str | None:
    """Why no bound method takes this node whatever its op's rule says, or None: an output that depends on the
    perturbed values in a way no interval captures, or randomness."""
    op = node.op_type
    if op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
        return "its Indices output is used (argmax positions of perturbed values are not bounded)"
    if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = node.inputs[2].const_value
        if mode is None or bool(mode.numpy().reshape(-1)[0]):
            return "training_mode may be true (dropout in training mode is random)"
    return None


def attr(node: ir.Node, name: str, default=None):
    found = node.attributes.get(name)
    if found is None:
        return default
    return found.value


def registrar(table: dict):
    """A decorator factory filling `table`: `@rule("Relu", "Sigmoid")` maps both op types to the function."""
    def register_for(*op_types):
        def register(fn):
            for op_type in op_types:
                table[op_type] = fn
            return fn
        return register
    return register_for
