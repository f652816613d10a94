"""CROWN's backward passes within a memory budget, leaves where the batch axis moves, shared small constants.

A pass bounding a tensor of n elements holds coefficients [2n, batch, *t] for every tensor t it walks through;
one whose largest such tensor would exceed `crown.MAX_PASS_BYTES` per sample is not built (the tensor keeps its
IBP interval), decided from the shapes before any node is emitted. The tests lower the budget to small shapes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphcert import api
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.passes import crown
from graphcert.runtime import Session


def largest_tensor(proto: onnx.ModelProto) -> int:
    """Elements of the largest tensor onnx's shape inference sizes in the graph (free dimensions count 1)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    largest = 0
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        largest = max(largest, int(np.prod([d.dim_value if d.HasField("dim_value") else 1 for d in dims])))
    return largest


def softmax_network(seed: int = 0) -> onnx.ModelProto:
    """x [16, 24] (no batch axis) -> Softmax over 24 (rewritten pairwise: a [16, 24, 24] step) -> MatMul 24x8
    -> Relu -> y [16, 8]. A pass from the Relu's input has 256 rows, few, but walks through the 9,216-element
    pairwise step: 256 x 9,216 coefficients, 9.4 MB."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(24, 8)).astype(np.float32), "w")]
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1), helper.make_node("MatMul", ["s", "w"], ["m"]),
             helper.make_node("Relu", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 24])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _bounds(proto, lower, upper):
    out = Session(proto).run({"x_lower": lower, "x_upper": upper})
    return out["y_lower"], out["y_upper"]


def _sampled_outputs(model, lower, upper, rng, count=200):
    session = Session(model)
    return np.stack([session.run({"x": rng.uniform(lower, upper).astype(np.float32)})["y"] for _ in range(count)])


def test_a_pass_through_a_widening_step_is_sized_by_its_widest_tensor(monkeypatch):
    """The budget counts the widest tensor a pass walks through, not the rows it starts from: at 4 MB no pass
    through the pairwise softmax is built (with the budget 64 MB, they are: 256 x 9,216 coefficients), and the
    bounds still hold every sampled output."""
    model = softmax_network()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 24)).astype(np.float32) * 2
    lower, upper = x - np.float32(0.3), x + np.float32(0.3)

    def graph():
        return to_proto(api.bound_graph(api.load(model), "crown", InputSet("box")))

    monkeypatch.setattr(crown, "MAX_PASS_BYTES", 64 << 20)
    roomy = graph()
    assert largest_tensor(roomy) >= 256 * 9216
    monkeypatch.setattr(crown, "MAX_PASS_BYTES", 4 << 20)
    tight = graph()
    assert largest_tensor(tight) <= (4 << 20) // 4
    outputs = _sampled_outputs(model, lower, upper, rng)
    for proto in (roomy, tight):
        low, high = _bounds(proto, lower, upper)
        assert np.all(low <= outputs.min(axis=0) + 1e-5) and np.all(outputs.max(axis=0) <= high + 1e-5)
    # the skipped passes only loosen: the bounds with them are inside those without
    low_roomy, high_roomy = _bounds(roomy, lower, upper)
    low_tight, high_tight = _bounds(tight, lower, upper)
    assert np.all(low_tight <= low_roomy + 1e-6) and np.all(high_roomy <= high_tight + 1e-6)


def test_an_output_pass_over_the_budget_keeps_the_output_interval(monkeypatch):
    """An output bounded by a pass that would not fit gets IBP's interval (here that of the whole graph, since
    every intermediate pass is skipped too): equal to the IBP graph's bounds."""
    model = softmax_network(seed=2)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 24)).astype(np.float32)
    lower, upper = x - np.float32(0.1), x + np.float32(0.1)
    monkeypatch.setattr(crown, "MAX_PASS_BYTES", 1 << 20)
    tight = to_proto(api.bound_graph(api.load(model), "crown", InputSet("box")))
    ibp = to_proto(api.bound_graph(api.load(model), "ibp", InputSet("box")))
    for found, wanted in zip(_bounds(tight, lower, upper), _bounds(ibp, lower, upper)):
        np.testing.assert_array_equal(found, wanted)


def depth_to_space_network(seed: int = 0) -> onnx.ModelProto:
    """x [batch, 2, 4, 6] -> Conv 8x1x1 -> Relu -> DepthToSpace(2) as ONNX's function body writes it (a Reshape
    to a shape read off the input at run time, [N, 2, 2, C/4, H, W], a Transpose, a Reshape back) -> Relu ->
    Flatten -> Gemm -> y [batch, 3]. Shape inference cannot follow the batch through the run-time Reshape."""
    rng = np.random.default_rng(seed)
    ints = lambda name, values: numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)  # noqa: E731
    inits = [numpy_helper.from_array(rng.normal(size=(8, 2, 1, 1)).astype(np.float32), "c"),
             numpy_helper.from_array(rng.normal(size=(2 * 8 * 12, 3)).astype(np.float32) / 8, "fc"),
             ints("zero", [0]), ints("one", [1]), ints("two", [2]), ints("three", [3]), ints("four", [4]),
             ints("block", [2]), ints("area", [4]), ints("back", [-1, 2, 8, 12])]
    nodes = [helper.make_node("Conv", ["x", "c"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Shape", ["r"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
             helper.make_node("Slice", ["shape", "one", "two"], ["ch"]),
             helper.make_node("Slice", ["shape", "two", "three"], ["h"]),
             helper.make_node("Slice", ["shape", "three", "four"], ["w"]),
             helper.make_node("Div", ["ch", "area"], ["ch_block"]),
             helper.make_node("Concat", ["n", "block", "block", "ch_block", "h", "w"], ["target"], axis=0),
             helper.make_node("Reshape", ["r", "target"], ["split"]),
             helper.make_node("Transpose", ["split"], ["moved"], perm=[0, 3, 4, 1, 5, 2]),
             helper.make_node("Reshape", ["moved", "back"], ["d"]), helper.make_node("Relu", ["d"], ["e"]),
             helper.make_node("Flatten", ["e"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "d2s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_rules_after_a_leaf_that_moves_the_batch_axis_go_through_ibp_too():
    """The run-time Reshape is an IBP leaf whose output's batch axis is not provably first; the Transpose and
    Reshape reading it become leaves as well (they used to refuse the model), down to the tensor whose batch
    is first again, after which CROWN's rules run: converts with crown and crown-ibp, bounds hold."""
    model = depth_to_space_network()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 2, 4, 6)).astype(np.float32)
    lower, upper = x - np.float32(0.05), x + np.float32(0.05)
    session = Session(model)
    points = rng.uniform(lower[:, None], upper[:, None], (2, 100, 2, 4, 6)).astype(np.float32)
    outputs = session.run({"x": points.reshape(-1, 2, 4, 6)})["y"].reshape(2, 100, 3)
    for method in ("crown", "crown-ibp"):
        bound = api.bound_graph(api.load(model), method, InputSet("box"))
        fallback = bound.metadata_props.get("graphcert.fallback", "")
        assert "no batch axis first" in fallback
        out = Session(to_proto(bound)).run({"x_lower": lower, "x_upper": upper})
        low, high = out["y_lower"], out["y_upper"]
        assert np.all(low[:, None] <= outputs + 1e-5) and np.all(outputs <= high[:, None] + 1e-5)


def deep_sigmoid_network(layers: int = 6, width: int = 8, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for k in range(layers):
        inits.append(numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32) / 3, f"w{k}"))
        nodes += [helper.make_node("Gemm", [x, f"w{k}"], [f"z{k}"]), helper.make_node("Sigmoid", [f"z{k}"], [f"a{k}"])]
        x = f"a{k}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_small_constants_are_made_once_per_graph():
    """A backward pass asks for the same shape, axis and scalar constants at every step; each is one
    initializer of the graph, not one per request (a 8-step LSTM's CROWN graph held 25,504 initializers, each
    costing more to build and serialise than a node; 69 now)."""
    model = deep_sigmoid_network()
    proto = to_proto(api.bound_graph(api.load(model), "crown", InputSet("box")))
    added = [init for init in proto.graph.initializer if init.name not in {i.name for i in model.graph.initializer}]
    small = [init for init in added if int(np.prod(init.dims)) <= 16]
    keys = {(init.data_type, tuple(init.dims), onnx.numpy_helper.to_array(init).tobytes()) for init in small}
    assert len(keys) == len(small)   # no two small initializers hold the same value
    assert len(small) < 100


def class_token_network(seed: int = 0) -> onnx.ModelProto:
    """x [batch, 4, 8] -> MatMul -> Relu -> Concat(class token, ., axis 1) -> MatMul -> Relu -> ReduceMean over
    tokens -> Gemm -> y [batch, 3]. The class token [1, 1, 8] is expanded to [batch, 1, 8] by a shape that a
    ScatterElements writes the run-time batch into, as torch's dynamo exporter writes a ViT: neither shape
    inference nor the batch tracer follows the batch through it."""
    rng = np.random.default_rng(seed)
    tensor = lambda name, shape, scale: numpy_helper.from_array(  # noqa: E731
        (rng.normal(size=shape) * scale).astype(np.float32), name)
    ints = lambda name, values: numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)  # noqa: E731
    inits = [tensor("w1", (8, 8), 0.5), tensor("w2", (8, 8), 0.5), tensor("head", (8, 3), 0.5),
             tensor("token", (1, 1, 8), 1.0), ints("zero", [0]), ints("one", [1]), ints("template", [1, 1, 8]),
             ints("where", [0]), ints("tokens", [1])]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
             helper.make_node("ScatterElements", ["template", "where", "n"], ["token_shape"], axis=0),
             helper.make_node("Expand", ["token", "token_shape"], ["tokens_b"]),
             helper.make_node("Concat", ["tokens_b", "h"], ["cat"], axis=1),
             helper.make_node("MatMul", ["cat", "w2"], ["b"]), helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("ReduceMean", ["r", "tokens"], ["m"], keepdims=0),
             helper.make_node("Gemm", ["m", "head"], ["y"])]
    graph = helper.make_graph(nodes, "token", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_a_concat_off_the_batch_axis_keeps_the_batch_first_after_it():
    """The Concat is an IBP leaf (its token's size is known only at run time); its output's leading axis is the
    batch of its other input, so the rules after it run as CROWN (before: every node after it was a leaf too,
    and CROWN gave IBP's width; a dynamo ViT's logit width went from 9.2e5 to 4.6 at eps 1e-3). Bounds hold."""
    model = class_token_network()
    bound = api.bound_graph(api.load(model), "crown", InputSet("box"))
    assert "no batch axis first" not in bound.metadata_props.get("graphcert.fallback", "")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 4, 8)).astype(np.float32)
    lower, upper = x - np.float32(0.2), x + np.float32(0.2)
    out = Session(to_proto(bound)).run({"x_lower": lower, "x_upper": upper})
    points = rng.uniform(lower[:, None], upper[:, None], (2, 200, 4, 8)).astype(np.float32)
    outputs = Session(model).run({"x": points.reshape(-1, 4, 8)})["y"].reshape(2, 200, 3)
    assert np.all(out["y_lower"][:, None] <= outputs + 1e-5) and np.all(outputs <= out["y_upper"][:, None] + 1e-5)
    ibp = Session(to_proto(api.bound_graph(api.load(model), "ibp", InputSet("box")))).run(
        {"x_lower": lower, "x_upper": upper})
    assert np.all(out["y_upper"] - out["y_lower"] <= ibp["y_upper"] - ibp["y_lower"] + 1e-5)
