"""What a model is made of, and which bound methods can rewrite it."""
from __future__ import annotations

import os
from collections import Counter

from . import api
from . import methods as method_registry
from .interface import perturbed_inputs
from .interpret import perturbed_nodes
from .model import read_proto, static_shape


def describe(path: str | os.PathLike) -> dict:
    proto = read_proto(path)
    model = api.load(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    nodes = perturbed_nodes(model.graph, set(perturbed_inputs(model)))
    methods = {}
    for name, record in sorted(method_registry.all_methods().items()):
        if record.supports is None:  # a ladder: it runs whichever of its stages take the model
            continue
        missing = sorted({n.op_type for n in nodes if n.domain not in ("", "ai.onnx") or not record.supports(n)})
        methods[name] = missing
    for name, record in sorted(method_registry.all_methods().items()):
        if record.supports is None:
            stages = [methods[stage] for stage in record.stages_of("linf") if stage in methods]
            methods[name] = sorted(set.intersection(*map(set, stages))) if stages else []
    return {
        "path": os.fspath(path),
        "producer": proto.producer_name,
        "opset": opset,
        "inputs": [{"name": v.name, "shape": static_shape(v)} for v in perturbed_inputs(model)],
        "outputs": [{"name": v.name, "shape": static_shape(v)} for v in model.graph.outputs],
        "ops": dict(Counter(n.op_type for n in proto.graph.node).most_common()),
        "methods": methods,
    }
