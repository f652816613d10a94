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
    missing: dict[str, list[str]] = {}
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in rules or (accepts and not accepts(node)):
            missing.setdefault(node.op_type, []).append(node.name or "(unnamed)")
    if missing:
        raise UnsupportedOpError(method, missing)


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
