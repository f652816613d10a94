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
# Ops whose output is a random draw: another run draws again, so a bound graph cannot copy their value from the
# model; they are perturbed whatever they read (a pass bounds them by the set every draw lies in, or refuses).
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})


def perturbed_nodes(graph: ir.Graph, sources: set[ir.Value]) -> list[ir.Node]:
    """Nodes that read a tensor depending on the values of `sources`, and random draws, in graph order."""
    tainted = set(sources)
    found = []
    for node in graph:
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        if any(v in tainted for v in node.inputs if v is not None) or node.op_type in RANDOM_OPS:
            found.append(node)
            tainted.update(node.outputs)
    return found


def check_supported(nodes: list[ir.Node], rules: dict[str, Callable], method: str, accepts=None) -> None:
    """An UnsupportedOpError listing every node without a rule, that `accepts` refuses, or that no method can
    bound (`refusal`, with its reason). Tables that are a `RuleTable` check their own preconditions too."""
    table = rules if isinstance(rules, RuleTable) else RuleTable(method, rules)
    verdicts = {}
    for node in nodes:
        reason = table.verdict(node)
        if reason is None and accepts is not None and not accepts(node):
            reason = UNMET
        verdicts[node] = reason
    raise_refused(method, verdicts)


NO_RULE = "no rule for this op type"
UNMET = "outside what its rule bounds (attributes, shapes or which inputs are perturbed)"


def raise_refused(method: str, verdicts: dict[ir.Node, str | None]) -> None:
    """Raise one UnsupportedOpError naming every refused node (verdict not None) and why, if there is one."""
    missing: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for node, reason in verdicts.items():
        if reason is None:
            continue
        name = node.name or "(unnamed)"
        missing.setdefault(node.op_type, []).append(name)
        if reason != NO_RULE:
            reasons[name] = reason
    if missing:
        raise UnsupportedOpError(method, missing, reasons)


class RuleTable(dict):
    """One pass's rules: op type -> rule function (a dict, so `RULES[op]` and `op in RULES` read as they
    always did), with each rule's precondition registered beside it (`@table.rule("Gemm", accepts=...)`).

    The pass's support check, `graphcert inspect` and the error listing every unsupported node all ask
    `verdict`, so they cannot disagree. A precondition takes the node, plus the pass's support context (what
    is perturbed, whether there is a batch axis...) when the pass gives one; it answers True or False, and its
    docstring's first line says what it requires (the reason shown when it answers False).
    """

    def __init__(self, method: str, rules: dict | None = None):
        super().__init__(rules or {})
        self.method = method
        self.preconditions: dict[str, Callable] = {}
        # (domain, op type) of the ops of other domains this table has rules for (onnxruntime's com.microsoft
        # quantized ops); their names are unlike every default-domain op's, so they share the op-type keys.
        self.other_domains: set[tuple[str, str]] = set()

    def rule(self, *op_types: str, accepts: Callable | None = None, domain: str = ""):
        """Decorator: the function is the rule of every op type named (of `domain`, the default one unless
        given), accepted where `accepts` holds."""
        def register(fn):
            for op_type in op_types:
                self[op_type] = fn
                if domain:
                    self.other_domains.add((domain, op_type))
                if accepts is not None:
                    self.preconditions[op_type] = accepts
            return fn
        return register

    def precondition(self, *op_types: str):
        """Decorator: a precondition alone, for rules a family registered (graphcert.ops) or a shared rule."""
        def register(check):
            for op_type in op_types:
                self.preconditions[op_type] = check
            return check
        return register

    def verdict(self, node: ir.Node, context=None) -> str | None:
        """None when this table bounds the node, else why not, in one line."""
        reason = refusal(node)
        if reason:
            return reason
        if node.domain not in ("", "ai.onnx") and (node.domain, node.op_type) not in self.other_domains:
            return f"no rules for ops of domain '{node.domain}'"
        if node.op_type not in self:
            return NO_RULE
        return self._unmet(node, context)

    def meets_precondition(self, node: ir.Node, context=None) -> bool:
        """Whether no method refuses the node and its op's precondition (if it has one) holds, whether or not
        this table has a rule for the op (for a pass that asks another's table about ops they share)."""
        return refusal(node) is None and self._unmet(node, context) is None

    def _unmet(self, node: ir.Node, context) -> str | None:
        check = self.preconditions.get(node.op_type)
        if check is None:
            return None
        try:
            accepted = check(node) if context is None else check(node, context)
        except (TypeError, IndexError, ValueError):
            accepted = False  # attributes or shapes the precondition cannot read
        return None if accepted else requirement(check)

    def check(self, nodes: list[ir.Node], context=None, method: str | None = None) -> None:
        """Raise an UnsupportedOpError listing every node `verdict` refuses, with its reason."""
        raise_refused(method or self.method, {node: self.verdict(node, context) for node in nodes})


def requirement(check: Callable) -> str:
    """What a precondition requires (its docstring's first line), for a node it refuses."""
    doc = (getattr(check, "__doc__", None) or "").strip()
    return f"outside its rule's precondition: {doc.splitlines()[0].rstrip('.')}" if doc else UNMET


# Ops no method bounds when they read perturbed values, and why (a method that gains a rule drops the entry):
# output shapes that depend on the values themselves (no fixed-shape box bounds them), and kernels that are not
# the function the spec states.
NO_SOUND_RULE = {
    "Unique": "its output's shape depends on the input's values (how many are distinct)",
    "NonZero": "its output's shape depends on the input's values (how many are non-zero)",
    "Range": "its start, limit or delta depends on the perturbed input, so the output's length would vary",
    "Swish": "onnxruntime's kernel is not x·sigmoid(alpha·x) in its negative tail (far from it and not monotone "
             "there), so no rule of the formula is sound for it",
}
SEQUENCE_OPS = frozenset({"SplitToSequence", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
                          "SequenceAt", "SequenceLength", "SequenceMap", "ConcatFromSequence"})


def refusal(node: ir.Node) -> str | None:
    """Why no bound method takes this node whatever its op's rule says, or None: an output that depends on the
    perturbed values in a way no interval captures, or randomness."""
    op = node.op_type
    if op in NO_SOUND_RULE:
        return NO_SOUND_RULE[op]
    if op in SEQUENCE_OPS:
        return "it makes or reads a sequence, and bound passes carry tensors (boxes) only"
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
    """A decorator factory filling `table`: `@rule("Relu", "Sigmoid")` maps both op types to the function (for
    a `RuleTable`, `@rule("Gemm", accepts=check)` registers the rule's precondition beside it)."""
    if isinstance(table, RuleTable):
        return table.rule

    def register_for(*op_types):
        def register(fn):
            for op_type in op_types:
                table[op_type] = fn
            return fn
        return register
    return register_for
