"""What a model is made of, and which bound methods can rewrite it.

Support is not guessed from op names: each method builds its graph for the model (alpha-CROWN also its PyTorch
executor), so `inspect` says exactly what `convert` and `certify` will do.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from . import api
from . import methods as method_registry
from .errors import GraphcertError, UnsupportedOpError
from .interface import perturbed_inputs
from .interpret import NO_RULE
from .model import batch_note, read_proto, static_shape


def describe(path: str | os.PathLike) -> dict:
    proto = read_proto(path)
    model = api.load(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    methods, reasons, refused, fallback = {}, {}, {}, {}
    registry = method_registry.all_methods()
    for name, record in sorted(registry.items()):
        if record.combines == "ladder":
            continue
        missing, reason, refused[name], fallback[name] = support(model, record, methods)
        methods[name] = missing
        if reason:
            reasons[name] = reason
    for name, record in sorted(registry.items()):
        if record.combines == "ladder":  # it runs whichever of its stages take the model
            stages = [stage for stage in record.stages_of("linf") if stage in methods]
            methods[name] = sorted(set.intersection(*(set(methods[s]) for s in stages))) if stages else []
            if methods[name]:
                reasons[name] = "no stage bounds the model: " + "; ".join(f"{s}: {reasons[s]}" for s in stages)
    return {
        "path": os.fspath(path),
        "producer": proto.producer_name,
        "opset": opset,
        "inputs": [{"name": v.name, "shape": static_shape(v)} for v in perturbed_inputs(model)],
        "outputs": [{"name": v.name, "shape": static_shape(v)} for v in model.graph.outputs],
        "batch": batch_note(model) or "any",
        "ops": dict(Counter(n.op_type for n in proto.graph.node).most_common()),
        "methods": methods,
        "reasons": reasons,
        "refused": refused,
        # Nodes a method bounds by another's rule (CROWN through IBP: passes/crown_fallback.py), and why.
        "fallback": {name: notes for name, notes in fallback.items() if notes},
    }


def support(model, record, known: dict) -> tuple[list[str], str | None, dict[str, str], dict[str, str]]:
    """([unsupported op types], one-line reason, {refused node: why}, {node bounded by a fallback: how}) for one
    method: the first three empty when it bounds the model. A refusal that names no op (a model-level limit) is
    listed by its reason. The per-node verdicts are the pass's own (its rule table's `verdict`, see
    graphcert.interpret.RuleTable); the fallback notes are the graph's `graphcert.fallback` metadata."""
    try:
        if record.combines == "refine":
            base = record.stages_of("linf")[0]
            if known.get(base):
                return known[base], f"needs {base}, which cannot bound the model", {}, {}
            from .alpha import AlphaCrown
            graph = AlphaCrown(model, "linf", spec=None)._tuned
        elif record.role == "trains":
            graph = api.bound_graph(model, record.name, spec="runtime", trainable=True, norm=record.norms[0])
        else:
            graph = api.bound_graph(model, record.name, norm=record.norms[0])
    except UnsupportedOpError as refusal:
        per_node = {name: refusal.reasons.get(name, NO_RULE) for names in refusal.nodes_by_op.values()
                    for name in names}
        return sorted(refusal.nodes_by_op), str(refusal), per_node, {}
    except GraphcertError as refusal:
        return [str(refusal)], str(refusal), {}, {}
    return [], None, {}, json.loads(graph.metadata_props.get("graphcert.fallback", "{}"))
