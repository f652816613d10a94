"""The float32 rounding slack of graphcert.rounding, computed inside a certificate graph, so that the radius a
certificate graph returns holds for the model as it runs in float32 (as `certify` does by default).

The error graph of graphcert.rounding (M, E and N of the model's output over each input set) is spliced into
the certificate graph: its inputs are the certificate's own input sets (each rung's box, clipped to the domain,
or each L2 ball), and the slack of every margin row c is computed from its outputs in float32,

    slack = model + bound graph + 8u·|c|·M,   model = min(|c|·E, ||c||_2·N),
    bound graph = model (lipschitz) or 2·|c|·E_plain (IBP, CROWN family)      (graphcert.rounding)

from non-negative terms only (sums of at most n + 8 of them, n the classes), so pushing the result up by
(1 + γ_{n+8}) and graphcert.rounding's SAFETY covers the float32 evaluation. A margin is certified when its
lower bound minus the slack is > 0; the sign of a float32 difference is exact.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from graphcert.builder import Builder
from graphcert.errors import InputError, UnsupportedOpError
from graphcert.interface import FLOAT, perturbed_inputs


class GraphSlack:
    """Builds the error graphs of one model once; `emit` adds a slack computation to a graph under
    construction, `splice` wires the error graphs into the finished model."""

    def __init__(self, model: ir.Model, method: str, norm: str):
        from graphcert.export import to_proto
        from graphcert.rounding import MAGNITUDE, NORM, error_graph
        from graphcert.arithmetic import FLOAT32
        from graphcert.rounding_slack import POINT_BOUND_GRAPHS
        try:
            tight = error_graph(model, norm)
            # The certificate graph computes in float32, whatever the model's own arithmetic.
            loose = None if method in POINT_BOUND_GRAPHS else error_graph(model, norm, tighten=False,
                                                                         arithmetic=FLOAT32)
        except UnsupportedOpError as refusal:
            raise InputError(f"{str(refusal).split('; run')[0]}: certificate graphs for the float32 model need "
                             f"it") from None
        self.norm, self.point = norm, method in POINT_BOUND_GRAPHS
        self.tight, self.loose = to_proto(tight), (to_proto(loose) if loose is not None else None)
        self.x_name = perturbed_inputs(model)[0].name
        self.output = next(o.name for o in self.tight.graph.output if o.name.endswith(MAGNITUDE))[:-len(MAGNITUDE)]
        self.has_norm = any(o.name == self.output + NORM for o in self.tight.graph.output)
        self.requests: list[tuple[onnx.ModelProto, dict, dict]] = []

    def emit(self, b: Builder, graph: ir.Graph, point: ir.Value, eps: ir.Value, rows: ir.Value, domain,
             classes: int) -> ir.Value:
        """slack [B, m] of rows [B, m, n] (n = `classes`) over the input sets around `point` [B, ...] of radius
        `eps` ([B, 1, ...]): boxes clipped to `domain` (norm linf) or L2 balls."""
        from graphcert.rounding import ERROR, MAGNITUDE, NORM, SAFETY, UNIT, gamma
        if self.norm == "l2":
            radius = b.op("Mul", b.op("Reshape", eps, b.ints([-1])), b.const(np.float32(1 + 2 ** -20)))
            feeds = {self.x_name: point, f"{self.x_name}_radius": radius}
        else:
            low, high = b.op("Sub", point, eps), b.op("Add", point, eps)
            if domain is not None:
                low = b.op("Max", low, b.const(np.float32(domain[0])))
                high = b.op("Min", high, b.const(np.float32(domain[1])))
            feeds = {f"{self.x_name}_lower": low, f"{self.x_name}_upper": high, self.x_name: point}

        def placeholder(name, shape):
            value = ir.Value(name=b.fresh(name), type=FLOAT, shape=ir.Shape(shape))
            graph.inputs.append(value)
            return value

        tag = len(self.requests)
        wanted = {MAGNITUDE: ["B", "n"], ERROR: ["B", "n"]}
        if self.has_norm:
            wanted[NORM] = ["B"]
        tight = {suffix: placeholder(f"slack{tag}{suffix}", shape) for suffix, shape in wanted.items()}
        self.requests.append((self.tight, feeds, {self.output + k: v for k, v in tight.items()}))
        if self.loose is not None:
            plain = placeholder(f"slack{tag}_plain", ["B", "n"])
            self.requests.append((self.loose, feeds, {self.output + ERROR: plain}))

        absolute = b.op("Abs", rows)

        def weighted(per_class):   # |c|·v per row: [B, m]
            return b.op("Squeeze", b.op("MatMul", absolute, b.op("Unsqueeze", per_class, b.ints([-1]))),
                        b.ints([-1]))

        model = weighted(tight[ERROR])
        if self.has_norm:
            lengths = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", rows, rows), [-1], keepdims=0))
            model = b.op("Min", model, b.op("Mul", lengths, b.op("Unsqueeze", tight[NORM], b.ints([-1]))))
        own = model if self.point else b.op("Mul", weighted(plain), b.const(np.float32(2.0)))
        total = b.op("Add", b.op("Add", model, own),
                     b.op("Mul", weighted(tight[MAGNITUDE]), b.const(np.float32(8 * UNIT))))
        up = np.float32((1 + gamma(classes + 8)) * SAFETY * (1 + 2 ** -20))
        return b.op("Add", b.op("Mul", total, b.const(up)), b.const(np.float32(np.finfo(np.float32).tiny)))

    def splice(self, model: ir.Model) -> ir.Model:
        """The model with every requested error graph wired in (its placeholders become computed values)."""
        from graphcert.export import to_proto
        for _, feeds, _ in self.requests:   # kept alive through export (which drops unused nodes), removed below
            for value in feeds.values():
                if value not in model.graph.outputs and value not in model.graph.inputs:
                    if value.type is None:
                        value.type = FLOAT
                    model.graph.outputs.append(value)
        proto = to_proto(model, check=False)   # the whole spliced graph is checked when it is exported
        graph = proto.graph
        placeholders = set()
        for tag, (error_proto, feeds, outputs) in enumerate(self.requests):
            prefixed = onnx.compose.add_prefix(error_proto, f"float32_slack{tag}/")
            inner = prefixed.graph
            for value in inner.input:
                source = value.name[len(f"float32_slack{tag}/"):]
                if source not in feeds:
                    raise InputError(f"the float32 error graph needs an input '{source}' a certificate cannot give")
                graph.node.append(helper.make_node("Identity", [feeds[source].name], [value.name]))
            graph.initializer.extend(inner.initializer)
            graph.node.extend(inner.node)
            for name, value in outputs.items():
                graph.node.append(helper.make_node("Identity", [f"float32_slack{tag}/{name}"], [value.name]))
                placeholders.add(value.name)
        kept = [v for v in graph.input if v.name not in placeholders]
        del graph.input[:]
        graph.input.extend(kept)
        fed = {value.name for _, feeds, _ in self.requests for value in feeds.values()}
        shown = [v for v in graph.output if v.name not in fed]
        del graph.output[:]
        graph.output.extend(shown)
        # Shapes inside are dropped: the tiled copies and the error graphs' values would otherwise share the
        # symbolic "batch" of the input with different sizes (runtimes warn when reusing buffers).
        del graph.value_info[:]
        spliced = ir.from_proto(proto)
        spliced.graph.sort()
        return spliced
