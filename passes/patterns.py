"""Graph patterns that passes recognise as one op: GroupSort2 written as MaxPool/Neg/Concat, and max pools over
disjoint windows. Shared by the lipschitz, orthogonal and CROWN passes."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.interpret import attr


def group_sort_input(node: ir.Node) -> ir.Value | None:
    """The tensor P when `node` is Concat(-MaxPool(-P), MaxPool(P)) (either order) over the same disjoint,
    unpadded windows of at least 2 elements each: every window's min and max (GroupSort2 for windows of 2).
    Else None.

    The min and max of a window are two entries of the window sorted, and sorting is 1-Lipschitz in L2; each
    window's min and max appear once in the output, so the map is 1-Lipschitz in P, where the generic Concat
    rule would say sqrt(2).
    """
    if node.op_type != "Concat" or len(node.inputs) != 2:
        return None
    for high_value, low_value in (node.inputs, node.inputs[::-1]):
        high, low = _max_pool(high_value), _max_pool(_negation_of(low_value))
        if high is None or low is None:
            continue
        source = high.inputs[0]
        if _negation_of(low.inputs[0]) is source and _window(high) == _window(low) and disjoint_windows(high):
            return source
    return None


def _negation_of(value: ir.Value | None) -> ir.Value | None:
    """x when value = Neg(x)."""
    node = value.producer() if value is not None else None
    return node.inputs[0] if node is not None and node.op_type == "Neg" and node.domain in ("", "ai.onnx") else None


def _max_pool(value: ir.Value | None) -> ir.Node | None:
    """The MaxPool producing value, when its indices output is unused."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx"):
        return None
    return node if all(not out.uses() for out in node.outputs[1:]) else None


def _window(pool: ir.Node) -> tuple:
    kernel = tuple(attr(pool, "kernel_shape", None) or ())
    ones, zeros = (1,) * len(kernel), (0,) * (2 * len(kernel))
    auto_pad = attr(pool, "auto_pad", "NOTSET")
    return (kernel, tuple(attr(pool, "strides", None) or ones), tuple(attr(pool, "dilations", None) or ones),
            tuple(attr(pool, "pads", None) or zeros), auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad,
            attr(pool, "ceil_mode", 0), attr(pool, "storage_order", 0))


def disjoint_windows(pool: ir.Node) -> bool:
    """Windows that never overlap or reach into padding, each of at least 2 elements."""
    kernel, strides, dilations, pads, auto_pad, ceil_mode, _ = _window(pool)
    return (len(kernel) > 0 and int(np.prod(kernel)) >= 2 and all(d == 1 for d in dilations)
            and all(p == 0 for p in pads) and auto_pad in ("NOTSET", "VALID") and ceil_mode == 0
            and all(s >= k for s, k in zip(strides, kernel)))
