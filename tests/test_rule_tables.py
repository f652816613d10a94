"""A rule carries its own precondition (graphcert.interpret.RuleTable): the pass's support check, the error
listing every unsupported node and `graphcert inspect` read the same table, so they cannot disagree."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import arch_zoo
import zoo
from graphcert import api
from graphcert.errors import UnsupportedOpError
from graphcert.inspect import describe
from graphcert.interface import perturbed_inputs
from graphcert.interpret import NO_RULE, perturbed_nodes
from graphcert.model import static_shape
from graphcert.passes import gloro, ibp, lipschitz, orthogonal


def table_verdicts(model, method: str) -> dict[str, str]:
    """{node: why} for the nodes a table-driven pass refuses, asked of its table directly (not by converting)."""
    sources = perturbed_inputs(model)
    nodes = perturbed_nodes(model.graph, set(sources))
    tainted = set(sources) | {out for node in nodes for out in node.outputs}
    dims = static_shape(sources[0])
    support = lipschitz.Support(lipschitz.Geometry(len(dims) >= 2 and not isinstance(dims[0], int)), tainted)
    table, context = {"ibp": (ibp.RULES, None), "lipschitz": (lipschitz.RULES, support),
                      "gloro": (gloro.RULES, tainted), "orthogonal": (orthogonal.RULES, support)}[method]
    verdicts = {node.name: table.verdict(node, context) for node in nodes}
    return {name: why for name, why in verdicts.items() if why}


def _zoo_model(name: str, folder) -> str:
    if name in arch_zoo.ARCHITECTURES:   # real architectures, as TorchScript exports them at opset 17
        return arch_zoo.export(name, str(folder), "torchscript", 17)
    path = folder / "model.onnx"
    onnx.save((zoo.ZOO.get(name) or zoo.ATTENTION_ZOO[name])(), path)
    return str(path)


@pytest.mark.parametrize("name", sorted(zoo.ZOO) + sorted(zoo.ATTENTION_ZOO) + sorted(arch_zoo.ARCHITECTURES))
def test_inspect_says_per_node_what_the_table_and_converting_say(name, tmp_path):
    path = _zoo_model(name, tmp_path)
    info = describe(path)
    model = api.load(onnx.load(path))
    for method in ("ibp", "lipschitz", "gloro", "orthogonal"):
        refused, reason = info["refused"][method], info["reasons"].get(method)
        if reason and not refused:
            continue  # a model-level limit (one input only, an output that is not a linear layer...)
        assert refused == table_verdicts(model, method), (name, method)
        if method in ("ibp", "lipschitz"):   # converting takes exactly the models inspect calls supported
            try:
                api.bound_graph(model, method, norm="linf" if method == "ibp" else "l2")
                converted = {}
            except UnsupportedOpError as error:
                converted = {n: error.reasons.get(n, NO_RULE) for names in error.nodes_by_op.values() for n in names}
            assert converted == refused, (name, method)


def _leaky_model(alpha: float) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
             helper.make_node("LeakyRelu", ["h"], ["y"], name="leaky", alpha=alpha)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_precondition_registered_beside_its_rule_reaches_the_error_and_inspect(tmp_path):
    """IBP's monotone rule takes LeakyRelu only with a non-negative slope: the refusal names the node and the
    precondition's own words, in the error and in inspect alike."""
    path = tmp_path / "leaky.onnx"
    onnx.save(_leaky_model(-0.5), path)
    with pytest.raises(UnsupportedOpError) as caught:
        api.bound_graph(api.load(onnx.load(path)), "ibp")
    expected = "outside its rule's precondition: Non-negative slopes"
    assert caught.value.reasons["leaky"].startswith(expected)
    assert "leaky: " + expected in str(caught.value)
    info = describe(path)
    assert info["refused"]["ibp"] == {"leaky": caught.value.reasons["leaky"]}
    onnx.save(_leaky_model(0.5), path)
    assert describe(path)["refused"]["ibp"] == {}


def test_a_precondition_added_later_is_read_by_check_inspect_and_accepts(tmp_path):
    """A new precondition registered once (here: refuse every MatMul) shows up everywhere the table is read."""
    path = tmp_path / "leaky.onnx"
    onnx.save(_leaky_model(0.5), path)
    saved = dict(ibp.CONDITIONS)

    @ibp.condition("MatMul")
    def _never(node) -> bool:
        """Refused by this test."""
        return False
    try:
        info = describe(path)
        assert info["refused"]["ibp"] == {"dense": "outside its rule's precondition: Refused by this test"}
        assert info["methods"]["ibp"] == ["MatMul"]
        model = api.load(onnx.load(path))
        assert not ibp.accepts(next(n for n in model.graph if n.op_type == "MatMul"))
        json.dumps(info)
    finally:
        ibp.CONDITIONS.clear()
        ibp.CONDITIONS.update(saved)
    assert describe(path)["refused"]["ibp"] == {}


def test_every_lipschitz_rule_without_a_precondition_is_a_map_of_slope_at_most_its_constant():
    """Rules with no precondition take every node of their op: only element-wise maps whose rule reads no
    attribute it could not handle are allowed to go without one."""
    unconditional = set(lipschitz.RULES) - set(lipschitz.RULES.preconditions)
    assert unconditional <= {"Abs", "Elu", "HardSigmoid", "Identity", "LeakyRelu", "Neg", "Relu", "Selu", "Sigmoid",
                             "Softplus", "Softsign", "Tanh"}


def test_bound_passes_share_one_skeleton():
    """requires() is the table's support check (its refusal goes out unwrapped, before `call` builds anything);
    ensures() holds every graph to the bound-graph interface."""
    import onnx_ir as ir
    from graphcert.interface import BoundPass, clone
    for cls, method in ((ibp.IntervalPass, "ibp"), (lipschitz.LipschitzPass, "lipschitz"),
                        (gloro.GloroPass, "gloro"), (orthogonal.OrthogonalPass, "orthogonal")):
        assert issubclass(cls, BoundPass) and cls.rules.method == method
    model = api.load(_leaky_model(-0.5))
    called = []

    class Watched(ibp.IntervalPass):
        def call(self, model):
            called.append(True)
            return super().call(model)
    with pytest.raises(UnsupportedOpError, match="leaky"):
        Watched()(model)
    assert not called

    class Forgetful(ibp.IntervalPass):
        def call(self, model):   # stamps the method but builds no bounds
            result = clone(model)
            result.metadata_props["graphcert.method"] = "ibp"
            return ir.passes.PassResult(result, modified=True)
    healthy = api.load(_leaky_model(0.5))
    with pytest.raises(ir.passes.PostconditionError):
        Forgetful()(healthy)
    assert {v.name for v in ibp.IntervalPass()(healthy).model.graph.outputs} >= {"y_lower", "y_upper"}


def test_a_graph_with_nothing_to_bound_converts_without_bound_outputs():
    """Shape and Size of the perturbed input do not depend on its values: IBP passes them through (the
    graph records them as unbounded) instead of failing its own postcondition."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["x"], ["n"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("s", TensorProto.INT64, [2]),
                               helper.make_tensor_value_info("n", TensorProto.INT64, [])])
    model = api.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    bound = ibp.IntervalPass()(model).model
    assert not any(v.name.endswith(("_lower", "_upper")) for v in bound.graph.outputs)
    assert sorted(json.loads(bound.metadata_props["graphcert.unbounded_outputs"])) == ["n", "s"]


def test_an_op_stated_once_shows_up_in_support_inspect_and_the_torch_executor(tmp_path):
    """Softsign taken out of every table is refused by name in inspect; one def_elementwise call (a precondition
    included) makes IBP and lipschitz take it where the precondition holds, and the torch executor run it."""
    import torch
    from graphcert import ops, torch_exec
    from graphcert.torch_exec import TorchGraph
    nodes = [helper.make_node("Softsign", ["x"], ["y"], name="soft")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    path = tmp_path / "softsign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    tables = (ibp.RULES, ibp.CONDITIONS, lipschitz.RULES, lipschitz.RULES.preconditions, torch_exec.KERNELS,
              ops.ELEMENTWISE)
    saved, monotone = [dict(t) for t in tables], list(ibp.MONOTONE)
    try:
        ops.forget_elementwise("Softsign", [ibp.RULES, lipschitz.RULES, torch_exec.KERNELS])
        refused = describe(path)["refused"]
        assert refused["ibp"] == refused["lipschitz"] == {"soft": NO_RULE}

        def softsign_slope(node):
            """Test precondition: bounded only while the node is named 'soft'."""
            return 1.0 if node.name == "soft" else None
        ops.def_elementwise("Softsign", torch=lambda node: torch.nn.functional.softsign, lipschitz=softsign_slope)
        info = describe(path)
        assert info["refused"]["ibp"] == info["refused"]["lipschitz"] == {}
        model = api.load(onnx.load(path))
        x = np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)
        with torch.no_grad():
            y = TorchGraph(model)({"x": x})["y"].numpy()
        assert np.allclose(y, x / (1 + np.abs(x)), atol=1e-6)
        node = next(iter(model.graph))
        node.name = "other"
        assert lipschitz.RULES.verdict(node, lipschitz.Support(lipschitz.Geometry(True), set(node.inputs))) \
            .startswith("outside its rule's precondition: One input and a slope bounded")
    finally:
        for table, content in zip(tables, saved):
            table.clear()
            table.update(content)
        ibp.MONOTONE[:] = monotone
