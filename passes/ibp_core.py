"""What every IBP rule module shares: the one rule table, per-node preconditions, the rule context and the
helpers rules are built from. `passes/ibp.py` is the pass; the rules live in `ibp.py` and `ibp_rules_*.py`,
all registering into `RULES` here (one table).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphcert.interpret import RuleTable, attr
from graphcert.interval import Interval

# The one IBP table: op type -> rule, with each rule's precondition beside it (graphcert.interpret.RuleTable).
RULES = RuleTable("ibp")


class Context:
    """What rules share: the builder and whether weights stay trainable (|W| computed in-graph)."""

    def __init__(self, b: Builder, trainable: bool = False):
        self.b = b
        self.trainable = trainable
        self._abs: dict[str, ir.Value] = {}

    def abs(self, value: ir.Value, scale: float = 1.0) -> ir.Value:
        """scale·|W|, precomputed as an initializer for constant weights."""
        return self._derived(value, scale, np.abs, "Abs")

    def scaled(self, value: ir.Value, scale: float) -> ir.Value:
        return value if scale == 1.0 else self._derived(value, scale, None, None)

    def _derived(self, value: ir.Value, scale: float, fn, op_type):
        if value.const_value is None or self.trainable:
            out = self.b.op(op_type, value) if op_type else value
            return out if scale == 1.0 else self.b.op("Mul", out, self.b.const(scale))
        key = (value.name, scale, op_type)
        if key not in self._abs:
            array = value.const_value.numpy()
            self._abs[key] = self.b.const((fn(array) if fn else array) * scale, dtype=array.dtype)
        return self._abs[key]

    def constant(self, value: ir.Value) -> np.ndarray | None:
        if isinstance(value, ir.Value) and value.const_value is not None and not self.trainable:
            return value.const_value.numpy()
        return None




def both_forms(cx: Context, x: Interval, apply) -> Interval:
    """Apply a selection-like op (one that only moves or copies elements) to whichever form x has."""
    if x.has_center_form:
        return Interval.from_center(cx.b, apply(x.center), apply(x.radius))
    return Interval.from_bounds(cx.b, apply(x.lower), apply(x.upper))




def widened(cx, x: Interval, dtype: ir.DataType | None, non_negative: bool = False) -> Interval:
    """x widened by 2^-20 of |lower| + |upper|, about eight ulps of the larger end.

    Bounds carry the float error of earlier rules (centre-radius conversions cancel: c - r for c ~ r keeps
    only the ulps of c). Most ops pass that on at its size; ops that round (a step) or have an unbounded
    slope (1/x, log, sqrt at 0) can turn it into a whole jump or a large error, so their rules widen first.
    `non_negative` clips the lower end at 0 for ops defined on x >= 0 only. Half-precision inputs are left as
    they are: onnxruntime computes half arithmetic in float32 and drops the rounding casts around it.
    """
    if dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
        return x
    b = cx.b
    factor = b.const(2.0 ** -20, dtype=dtype.numpy())
    slack = b.op("Mul", b.op("Add", b.op("Abs", x.lower), b.op("Abs", x.upper)), factor)
    lower = b.op("Sub", x.lower, slack)
    if non_negative:
        lower = b.op("Relu", lower)
    return Interval.from_bounds(b, lower, b.op("Add", x.upper, slack))



rule = RULES.rule                   # @rule("Gemm", accepts=check): a rule and its precondition, one place
# Per-node conditions beyond the op type (a node failing its check is reported as unsupported), by op type.
CONDITIONS = RULES.preconditions
condition = RULES.precondition     # a precondition alone, for a rule registered by a family


def constant_array(value) -> np.ndarray | None:
    """The value of a constant input (an initializer or folded tensor), else None."""
    if isinstance(value, ir.Value) and value.const_value is not None:
        return value.const_value.numpy()
    return None


def sane(cx, x: Interval, dtype: ir.DataType | None) -> Interval:
    """x with NaN bounds (inf - inf after an overflow upstream) read as unbounded: comparisons, casts and
    periodic functions of a NaN would otherwise answer as if the bound were tight."""
    if dtype is None or not dtype.is_floating_point():
        return x
    b = cx.b
    inf = b.op("CastLike", b.const(np.inf), x.lower)
    return Interval.from_bounds(b, b.op("Where", b.op("IsNaN", x.lower), b.op("Neg", inf), x.lower),
                                b.op("Where", b.op("IsNaN", x.upper), inf, x.upper))
