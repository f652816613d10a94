"""Normalising op types before rewriting: ops that ONNX defines by a function body are expanded into it.

ONNX gives many ops (Gelu, Mish, HardSwish, Swish, RMSNormalization, GroupNormalization, Attention, Celu,
Shrink, ...) a function body in the spec: the op *is* that subgraph of primitive ops. Where no bound pass has
a rule of its own for the op (a tighter one), the node is replaced by its body (instantiated for the node's
attributes and input types, then inlined by onnx's inliner), so every pass bounds it through the primitives.
"""
from __future__ import annotations

import onnx
import onnx.defs
import onnx.inliner

EXPANDED_DOMAIN = "graphcert.expanded"
# Bodies that loop, draw random numbers or build sequences: expanding them gains nothing for bounding. Swish's
# body is x·sigmoid(alpha·x), which onnxruntime's kernel is not in its negative tail: bounds of the body do not
# hold the kernel's outputs there (graphcert.interpret.NO_SOUND_RULE).
NOT_EXPANDED = {"Range", "Bernoulli", "SequenceMap", "BlackmanWindow", "HammingWindow", "HannWindow", "Swish"}
ROUNDS = 3  # a body may use ops that have bodies themselves


def _kept(node: onnx.NodeProto) -> bool:
    """Ops with a rule of their own in IBP (the pass with the widest op coverage) keep their node; so do ops of
    domains without schemas (custom ops: nothing to expand)."""
    from graphcert.passes import ibp
    if node.domain not in DEFAULT_DOMAINS:
        return not onnx.defs.has(node.op_type, node.domain)
    return node.op_type in ibp.RULES or node.op_type in NOT_EXPANDED


DEFAULT_DOMAINS = ("", "ai.onnx")


def _versions(proto: onnx.ModelProto) -> dict[str, int]:
    """The model's opset version of each domain it imports (the default domain under "")."""
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}


def expand_functions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with every node that has a function body and no bound rule expanded (default domain, and other
    domains with a schema, at their own version)."""
    for _ in range(ROUNDS):
        versions = _versions(proto)
        opset = versions.get("")
        if opset is None:
            return proto
        # Ops of other domains with a schema (ai.onnx.preview's FlexAttention) expand at their domain's version.
        candidates = [n for n in proto.graph.node if not _kept(n) and
                      (n.domain in DEFAULT_DOMAINS or n.domain in versions)]
        if not candidates:
            return proto
        types = _value_types(proto)
        functions = []
        for k, node in enumerate(candidates):
            domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
            body = _body(node, versions[domain], types, domain, opset)
            if body is None:
                continue
            _spell_out_defaults(node, versions[domain], domain)
            body.name, body.domain = f"{node.op_type}_{k}", EXPANDED_DOMAIN
            node.op_type, node.domain = body.name, EXPANDED_DOMAIN
            functions.append(body)
        if not functions:
            return proto
        proto.functions.extend(functions)
        proto.opset_import.append(onnx.helper.make_opsetid(EXPANDED_DOMAIN, 1))
        proto = onnx.inliner.inline_local_functions(proto)
        kept = [o for o in proto.opset_import if o.domain != EXPANDED_DOMAIN]
        del proto.opset_import[:]
        proto.opset_import.extend(kept)
    return proto


def _spell_out_defaults(node: onnx.NodeProto, opset: int, domain: str = "") -> None:
    """Give the node every attribute the schema defaults: the inliner drops references to unset ones."""
    schema = onnx.defs.get_schema(node.op_type, opset, domain)
    given = {a.name for a in node.attribute}
    for name, spec in schema.attributes.items():
        if name not in given and spec.default_value is not None and spec.default_value.type != 0:
            default = onnx.AttributeProto()
            default.CopyFrom(spec.default_value)
            default.name = name
            node.attribute.append(default)


def _value_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # types stay unknown; context-dependent bodies are then not expanded
        inferred = proto
    graph = inferred.graph
    types = {v.name: v.type for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    for init in graph.initializer:
        types[init.name] = onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return types


def _body(node: onnx.NodeProto, opset: int, types: dict, domain: str = "",
          default_opset: int | None = None) -> onnx.FunctionProto | None:
    """The node's function body at `opset` of its `domain` (the model's default-domain opset `default_opset`)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None
    raw = None
    try:
        if schema.has_function:
            versions = [v for v in schema.function_opset_versions if v <= opset]
            if versions:
                raw = schema.get_function_with_opset_version(max(versions))
        if raw is None and schema.has_context_dependent_function:
            versions = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
            if not versions or any(name and name not in types for name in node.input):
                return None
            input_types = [types[name].SerializeToString() if name else onnx.TypeProto().SerializeToString()
                           for name in node.input]
            raw = schema.get_context_dependent_function_with_opset_version(
                max(versions), node.SerializeToString(), input_types)
    except Exception:  # the body cannot be built for this node (unknown types, unsupported attributes)
        return None
    if not raw:
        return None
    body = onnx.FunctionProto()
    body.ParseFromString(raw)
    return _at_opset(body, opset if default_opset is None else default_opset) if len(body.node) else None


def _at_opset(body: onnx.FunctionProto, opset: int) -> onnx.FunctionProto | None:
    """The body declared at the model's opset (the inliner refuses a function whose default opset differs from
    the model's), when every op in it means the same at both versions; None (no expansion) otherwise."""
    declared = next((o.version for o in body.opset_import if o.domain in ("", "ai.onnx")), opset)
    if declared == opset:
        return body
    try:
        same = all(onnx.defs.get_schema(n.op_type, declared, "").since_version ==
                   onnx.defs.get_schema(n.op_type, opset, "").since_version
                   for n in body.node if n.domain in ("", "ai.onnx"))
    except onnx.defs.SchemaError:
        return None
    if not same:
        return None
    for entry in body.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    return body


POOLS = ("MaxPool", "AveragePool")


def floor_mode_pools(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Ceil-mode pools whose last window would start in the end padding, written as the floor-mode pools that
    read the same windows. onnxruntime (and onnx's shape inference from opset 22 on) drops such a window, while
    shape inference before opset 22 counts it: a model converted to an older opset would declare an output shape
    that is not the one computed. The end padding becomes whatever makes floor mode count exactly onnxruntime's
    windows; where that pads past the original end padding, only pools whose padding reads nothing (MaxPool,
    AveragePool without count_include_pad) keep their values and are rewritten, and only while the padding stays
    smaller than the kernel (onnxruntime's limit). Others are left as they are (the bound passes refuse them)."""
    import onnx_ir as ir

    from .ops import WindowGeometry
    if not any(n.op_type in POOLS and n.domain in DEFAULT_DOMAINS for n in proto.graph.node):
        return proto
    try:
        inferred = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    except Exception:  # shapes unknown: the pool's precondition decides later
        return proto
    model = ir.from_proto(proto)  # rewritten without the inferred shapes (those counted the dropped window)
    changed = False
    for node, known in zip(model.graph, inferred.graph):
        if node.op_type not in POOLS or node.domain not in DEFAULT_DOMAINS:
            continue
        shape = known.inputs[0].shape
        if not node.attributes.get("ceil_mode") or not node.attributes["ceil_mode"].value or shape is None or \
                not all(isinstance(d, int) for d in shape[2:]):
            continue
        geometry = WindowGeometry.of(node, shape[2:])
        counted = WindowGeometry(geometry.spatial, geometry.kernel, geometry.strides, geometry.dilations,
                                 geometry.begin, geometry.end, True, count_padding_starts=True)
        if geometry.out == counted.out:
            continue
        ends = [max(0, (out - 1) * s + x - n - b) for out, s, x, n, b in
                zip(geometry.out, geometry.strides, geometry.extents, geometry.spatial, geometry.begin)]
        floor = WindowGeometry(geometry.spatial, geometry.kernel, geometry.strides, geometry.dilations,
                               geometry.begin, tuple(ends))
        pads_read = node.op_type == "AveragePool" and node.attributes.get("count_include_pad") is not None and \
            node.attributes["count_include_pad"].value
        if floor.out != geometry.out or any(e >= k for e, k in zip(ends, geometry.kernel)) or \
                (pads_read and any(e > old for e, old in zip(ends, geometry.end))):  # onnxruntime: pads < kernel
            continue
        for name in ("auto_pad", "ceil_mode"):
            node.attributes.pop(name, None)
        node.attributes["pads"] = ir.AttrInt64s("pads", [*geometry.begin, *ends])
        changed = True
    return ir.to_proto(model) if changed else proto
