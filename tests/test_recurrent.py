"""Recurrent and control-flow models are unrolled at import (graphcert.unroll): LSTM/GRU/RNN over every
attribute that matters, Scan, Loop with a trip count and condition computable from constants, If with such a
condition. The unrolled model equals the original in onnxruntime (or onnx's reference evaluator where
onnxruntime has no kernel, e.g. layout 1) at batch 1 and 3; IBP and CROWN bounds of unrolled LSTM/GRU/RNN
classifiers contain sampled and attacked points in both norms; torch's LSTM/GRU exports certify at batch > 1;
what cannot be unrolled is refused in one line naming the node and why."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper

from graphcert import api
from graphcert import model as model_lib
from graphcert.errors import UnsupportedOpError
from graphcert.load_check import runner
from graphcert.runtime import Session
from graphcert.unroll import UNROLLED
from harness import check_bounds_sound, graph_bound_fn

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
SEQ, INPUT, HIDDEN = 4, 5, 6


def _make(nodes, inputs, outputs, initializers=(), opset=17, ir_version=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _init(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array, np.float32), name)


def recurrent(op, batch=3, opset=17, state=False, peep=False, full_lengths=False, zero_state=False, seed=0,
              lengths=None, seq=SEQ, **attrs):
    """A single LSTM/GRU/RNN node with constant weights over `seq` steps; every output is a graph output."""
    rng = np.random.default_rng(seed)
    g, h = GATES[op], HIDDEN
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    layout = attrs.get("layout", 0)
    x_shape = [seq, batch, INPUT] if layout == 0 else [batch, seq, INPUT]
    h_shape = [dirs, batch, h] if layout == 0 else [batch, dirs, h]
    y_shape = [seq, dirs, batch, h] if layout == 0 else [batch, seq, dirs, h]
    inits = [_init("W", rng.normal(size=(dirs, g * h, INPUT)) * 0.5), _init("R", rng.normal(size=(dirs, g * h, h)) * 0.5),
             _init("B", rng.normal(size=(dirs, 2 * g * h)) * 0.5)]
    inputs = [helper.make_tensor_value_info("x", TP.FLOAT, x_shape)]
    names = ["x", "W", "R", "B", ""]
    nodes = []
    if full_lengths or lengths is not None:
        given = np.full(batch, seq, np.int32) if lengths is None else np.resize(np.asarray(lengths, np.int32), batch)
        inits.append(onnx.numpy_helper.from_array(given, "lengths"))
        names[4] = "lengths"
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    if state:
        inputs += [helper.make_tensor_value_info(s, TP.FLOAT, h_shape) for s in states]
        names += states
    elif zero_state:  # what torch's exporter writes: a zero constant expanded to the state's shape
        nodes += [helper.make_node("Shape", ["x"], ["shape"]),
                  helper.make_node("Gather", ["shape", "batch_axis"], ["n"], axis=0),
                  helper.make_node("Concat", ["dirs", "n", "hidden"], ["state_shape"], axis=0),
                  helper.make_node("Expand", ["zero", "state_shape"], ["h0"])]
        inits += [onnx.numpy_helper.from_array(np.asarray([1 - layout], np.int64), "batch_axis"),
                  onnx.numpy_helper.from_array(np.asarray([dirs], np.int64), "dirs"),
                  onnx.numpy_helper.from_array(np.asarray([h], np.int64), "hidden"), _init("zero", [0.0])]
        names += ["h0", "h0"] if op == "LSTM" else ["h0"]
    if peep:
        names += [""] * (7 - len(names)) + ["P"]
        inits.append(_init("P", rng.normal(size=(dirs, 3 * h))))
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    nodes.append(helper.make_node(op, names, outs, hidden_size=h, **attrs))
    outputs = [helper.make_tensor_value_info(o, TP.FLOAT, y_shape if o == "Y" else h_shape) for o in outs]
    return _make(nodes, inputs, outputs, inits, opset)


RECURRENT_CASES = [
    *[(op, kw) for op in GATES for kw in (
        {}, {"direction": "reverse"}, {"direction": "bidirectional", "state": True}, {"layout": 1, "state": True},
        {"layout": 1, "direction": "bidirectional"}, {"clip": 0.5}, {"zero_state": True},
        {"full_lengths": True, "direction": "reverse"}, {"opset": 11, "direction": "bidirectional"})],
    *[(op, {"lengths": [2, 4, 1], **kw}) for op in GATES for kw in (
        {}, {"direction": "reverse"}, {"direction": "bidirectional", "state": True})],
    ("LSTM", {"lengths": [3, 1, 2], "peep": True, "state": True, "direction": "reverse"}),
    ("GRU", {"lengths": [1, 3, 3], "linear_before_reset": 1, "direction": "bidirectional"}),
    ("LSTM", {"peep": True, "state": True}), ("LSTM", {"peep": True, "direction": "bidirectional"}),
    ("LSTM", {"input_forget": 1}), ("LSTM", {"opset": 7, "state": True}),
    ("GRU", {"linear_before_reset": 1}), ("GRU", {"linear_before_reset": 1, "state": True, "clip": 1.0}),
    ("RNN", {"activations": ["Relu", "Softsign"], "direction": "bidirectional"}),
    ("LSTM", {"activations": ["HardSigmoid", "LeakyRelu", "Affine"], "activation_alpha": [0.3, 0.2, 0.7],
              "activation_beta": [0.4, 0.1]}),
    ("GRU", {"activations": ["ScaledTanh", "Elu"], "activation_alpha": [0.9, 1.5], "activation_beta": [0.7]}),
    ("RNN", {"activations": ["ThresholdedRelu"], "activation_alpha": [0.1]}),
    ("RNN", {"activations": ["Softplus"]}),
]


def _feeds(proto, batch, seed=1):
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.normal(size=dims).astype(np.float32)
    return feeds


def _assert_equal_to_original(original, batch):
    loaded = model_lib.load(original)
    unrolled = api.to_proto(loaded)
    assert not {n.op_type for n in unrolled.graph.node} & UNROLLED
    feeds = _feeds(original, batch)
    want, got = runner(original)(feeds), runner(unrolled)(feeds)
    for out in original.graph.output:
        np.testing.assert_allclose(got[out.name], want[out.name], rtol=1e-5, atol=1e-5, err_msg=out.name)
    return loaded


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("op,kw", RECURRENT_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_unrolled_recurrent_layer_equals_runtime(op, kw, batch):
    _assert_equal_to_original(recurrent(op, batch=batch, **kw), batch)


@pytest.mark.parametrize("op", sorted(GATES))
def test_batch_first_layout_with_sequence_lengths(op):
    """onnxruntime has no layout-1 kernels and onnx's reference evaluator ignores sequence_lens, so the
    unrolled layout-1 layer is compared with onnxruntime on the same layer in layout 0 (inputs transposed)."""
    from graphcert.unroll import unroll
    kw = {"lengths": [2, 4, 1], "direction": "bidirectional", "state": True}
    batch_first, sequence_first = recurrent(op, layout=1, **kw), recurrent(op, layout=0, **kw)
    feeds = _feeds(batch_first, 3)
    got = runner(unroll(batch_first))(feeds)
    want = runner(sequence_first)({k: np.swapaxes(v, 0, 1) for k, v in feeds.items()})
    np.testing.assert_allclose(got["Y"], np.transpose(want["Y"], (2, 0, 1, 3)), rtol=1e-5, atol=1e-6)
    for name in ("Y_h", "Y_c")[:2 if op == "LSTM" else 1]:
        np.testing.assert_allclose(got[name], np.swapaxes(want[name], 0, 1), rtol=1e-5, atol=1e-6)


def test_unrolled_layer_runs_at_other_batch_sizes():
    """Exported at batch 1, the unrolled layer carries no batch size: it runs at batch 3."""
    loaded = model_lib.load(recurrent("LSTM", batch=1, layout=1, zero_state=True))
    assert model_lib.batch_note(loaded) is None
    single, triple = _feeds(recurrent("LSTM", batch=1, layout=1), 1), _feeds(recurrent("LSTM", batch=3, layout=1), 3)
    run = runner(api.to_proto(loaded))
    rows = np.concatenate([run({"x": triple["x"][k:k + 1]})["Y_h"] for k in range(3)])
    np.testing.assert_allclose(run(triple)["Y_h"], rows, rtol=1e-6, atol=1e-6)
    assert run(single)["Y_h"].shape[0] == 1


def test_sequence_lengths_beyond_the_sequence_are_refused_in_one_line():
    with pytest.raises(UnsupportedOpError) as info:
        model_lib.load(recurrent("GRU", batch=2, lengths=[SEQ + 1, 2]))
    assert "GRU" in str(info.value) and "sequence_lens" in str(info.value) and "\n" not in str(info.value)


# ---- classifiers: bounds --------------------------------------------------------------------------------

# The bound tests run classifiers over 3 steps, not SEQ: the recurrence still composes (each step's state feeds
# the next through products of bounded gates), and the full-CROWN graph grows with the square of the steps (the
# bidirectional LSTM's is 52,000 nodes at 4 steps, 32,000 at 3: building it and its session is the test's cost).
BOUND_SEQ = 3


def classifier(op, seed=0, **attrs):
    """x [batch, BOUND_SEQ, input] -> the layer (batch first) -> its last hidden state -> Gemm to 3 logits."""
    rng = np.random.default_rng(seed)
    layer = recurrent(op, batch=1, layout=1, seed=seed, seq=BOUND_SEQ, **attrs)
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    graph = layer.graph
    nodes = list(graph.node) + [helper.make_node("Flatten", ["Y_h"], ["flat"], axis=1),
                                helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"], transB=1)]
    inits = list(graph.initializer) + [_init("head_w", rng.normal(size=(3, dirs * HIDDEN))), _init("head_b", [0.1, 0, -0.1])]
    return _make(nodes, [graph.input[0]], [helper.make_tensor_value_info("logits", TP.FLOAT, [1, 3])], inits)


BOUND_CASES = [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("LSTM", {"direction": "bidirectional", "peep": True}),
               ("GRU", {"linear_before_reset": 1, "direction": "reverse"}), ("RNN", {"activations": ["Relu"]})]


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("op,kw", BOUND_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_bounds_contain_sampled_and_attacked_points(op, kw, method):
    proto = classifier(op, **kw)
    loaded = model_lib.load(proto)
    reference = api.to_proto(loaded)
    bound = api.to_proto(api.bound_graph(loaded, method))
    x0 = np.random.default_rng(2).uniform(-1, 1, (1, BOUND_SEQ, INPUT)).astype(np.float32)
    for eps, scale in ((0.05, 1.0), (0.5, 30.0)):  # a small ball, and a large one far from the origin
        report = check_bounds_sound(reference, graph_bound_fn(bound, "x", "logits"), x0 * scale, eps, n_random=16,
                                    corners=16, pgd_steps=5, attack_targets=3)
        report.assert_sound()


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_l2_bounds_contain_points_of_the_ball(op):
    loaded = model_lib.load(classifier(op))
    bound = api.to_proto(api.bound_graph(loaded, "crown", norm="l2"))
    run_bound, run_model = Session(bound).run, runner(api.to_proto(loaded))
    rng = np.random.default_rng(4)
    x0 = rng.uniform(-1, 1, (1, BOUND_SEQ, INPUT)).astype(np.float32)
    radius = 0.3
    found = run_bound({"x": x0, "epsilon": np.float32(radius)})
    steps = rng.normal(size=(300, BOUND_SEQ, INPUT))
    steps *= radius / np.linalg.norm(steps.reshape(300, -1), axis=1)[:, None, None]
    steps[100:] *= rng.random(200)[:, None, None]
    y = run_model({"x": (x0 + steps).astype(np.float32)})["logits"]
    assert np.all(y >= found["logits_lower"] - 1e-5) and np.all(y <= found["logits_upper"] + 1e-5)


# ---- torch exports certify at batch > 1 -----------------------------------------------------------------

def _torch_classifier(kind, path, dynamo, seq=SEQ, read_sequence=False):
    """torch's LSTM/GRU (batch first) and a linear head over its last state, or with `read_sequence` over the last
    step of its output sequence, exported over `seq` steps."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, kind)(INPUT, HIDDEN, batch_first=True)
            self.head = torch.nn.Linear(HIDDEN, 3)

        def forward(self, x):
            out, state = self.rnn(x)
            if read_sequence:
                return self.head(out[:, -1])
            return self.head((state[0] if kind == "LSTM" else state)[0])
    torch.manual_seed(0)
    import contextlib
    import io
    import warnings
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(1, seq, INPUT),), str(path), dynamo=dynamo,
                          **({} if dynamo else {"input_names": ["x"], "output_names": ["y"], "opset_version": 17}))
    return str(path)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_torch_export_certifies_at_batch_above_one(kind, dynamo, tmp_path):
    from graphcert.certify import certify
    from graphcert.data import Dataset
    path = _torch_classifier(kind, tmp_path / f"{kind}.onnx", dynamo)
    loaded = model_lib.load(path)
    assert model_lib.batch_note(loaded) is None, model_lib.batch_note(loaded)
    x = np.random.default_rng(5).uniform(-1, 1, (6, SEQ, INPUT)).astype(np.float32)
    logits = runner(api.to_proto(loaded))({loaded.graph.inputs[0].name: x})[loaded.graph.outputs[0].name]
    data = Dataset("seq", x, logits.argmax(axis=1), None)
    result = certify(path, data, eps=1e-3, method="ibp", batch_size=4, rounding="real")
    assert result.clean == 6 and result.certified >= 3, result
    # The default float32 mode bounds the gates' products too (graphcert.rounding): as many, or nearly
    in_float32 = certify(path, data, eps=1e-3, method="ibp", batch_size=4)
    assert result.certified - 1 <= in_float32.certified <= result.certified, (in_float32, result)


# ---- Loop, If, Scan ---------------------------------------------------------------------------------------

def _tensor(name, dims, elem=TP.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def _const_node(name, array):
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(array), name))


def loop_model(trips=3, stop_after=None, trip_from_input=False, nested_if=False, scan_output=True):
    """x [batch, 4] -> Loop: acc = tanh(acc * w + x) + i (w, x read from the outer scope), scan output acc;
    optionally a condition that stops after `stop_after` iterations, or an If on the iteration number inside."""
    body_nodes = [helper.make_node("Cast", ["i"], ["i_f"], to=TP.FLOAT),
                  helper.make_node("Mul", ["acc_in", "w"], ["scaled"]),
                  helper.make_node("Add", ["scaled", "x"], ["pre"]),
                  helper.make_node("Tanh", ["pre"], ["act"]),
                  helper.make_node("Add", ["act", "i_f"], ["acc_out"])]
    if nested_if:  # odd iterations negate the accumulator
        then_g = helper.make_graph([helper.make_node("Neg", ["acc_out"], ["flipped"])], "then", [],
                                   [_tensor("flipped", [None, 4])])
        else_g = helper.make_graph([helper.make_node("Identity", ["acc_out"], ["kept"])], "else", [],
                                   [_tensor("kept", [None, 4])])
        body_nodes += [_const_node("two", np.int64(2)), helper.make_node("Mod", ["i", "two"], ["parity"]),
                       _const_node("one", np.int64(1)), helper.make_node("Equal", ["parity", "one"], ["odd"]),
                       helper.make_node("If", ["odd"], ["acc_next"], then_branch=then_g, else_branch=else_g)]
    else:
        body_nodes.append(helper.make_node("Identity", ["acc_out"], ["acc_next"]))
    if stop_after is not None:
        body_nodes += [_const_node("limit", np.int64(stop_after - 1)), helper.make_node("Less", ["i", "limit"], ["c_out"])]
    else:
        body_nodes.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
    body_nodes.append(helper.make_node("Identity", ["acc_next"], ["scan"]))
    body = helper.make_graph(body_nodes, "body",
                             [_tensor("i", [], TP.INT64), _tensor("c_in", [], TP.BOOL), _tensor("acc_in", [None, 4])],
                             [_tensor("c_out", [], TP.BOOL), _tensor("acc_next", [None, 4]), _tensor("scan", [None, 4])])
    nodes = [helper.make_node("Loop", ["M", "cond", "x"], ["final", "steps"], body=body),
             helper.make_node("Transpose", ["steps"], ["stacked"], perm=[1, 0, 2])]  # batch first
    inputs = [_tensor("x", [1, 4])]
    inits = [_init("w", [0.5, -1.0, 2.0, 0.25]), onnx.numpy_helper.from_array(np.asarray(True), "cond")]
    if trips is None:  # a while loop: only the condition stops it
        nodes[0].input[0] = ""
        trips = stop_after
    elif trip_from_input:
        nodes.insert(0, helper.make_node("Shape", ["x"], ["x_shape"]))
        nodes.insert(1, helper.make_node("ReduceSum", ["x_shape"], ["M"], keepdims=0))
    else:  # a trip count computed from constants
        inits += [onnx.numpy_helper.from_array(np.asarray(trips - 1, np.int64), "m_base")]
        nodes.insert(0, _const_node("m_one", np.int64(1)))
        nodes.insert(1, helper.make_node("Add", ["m_base", "m_one"], ["M"]))
    steps = trips if stop_after is None else min(trips, stop_after)
    outputs = [_tensor("final", [1, 4]), _tensor("stacked", [1, steps, 4])]
    if not scan_output:
        nodes, outputs = nodes[:-1], outputs[:1]
    return _make(nodes, inputs, outputs, inits, 17)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kw", [{}, {"trips": 1}, {"trips": 5, "stop_after": 2}, {"nested_if": True, "trips": 4},
                                {"trips": None, "stop_after": 3}],
                         ids=str)
def test_unrolled_loop_equals_runtime(kw, batch):
    _assert_equal_to_original(loop_model(**kw), batch)


def test_scan_nested_in_a_loop_with_body_constants_equals_runtime():
    """A Loop whose body holds an initializer and a Scan reading a Loop-body value from its enclosing scope:
    two rounds of unrolling, every outer-scope reference resolved to the right copy."""
    scan_body = helper.make_graph(
        [helper.make_node("Mul", ["x_t", "gain"], ["scaled"]), helper.make_node("Add", ["s_in", "scaled"], ["s_out"])],
        "scan_body", [_tensor("s_in", [None, 4]), _tensor("x_t", [None, 4])], [_tensor("s_out", [None, 4])])
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["i_f"], to=TP.FLOAT), helper.make_node("Add", ["i_f", "offset"], ["gain"]),
         helper.make_node("Unsqueeze", ["acc_in", "zero_axis"], ["seq"]),
         helper.make_node("Concat", ["seq", "seq"], ["pair"], axis=0),
         helper.make_node("Scan", ["acc_in", "pair"], ["acc_out"], body=scan_body, num_scan_inputs=1),
         helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
        [_tensor("i", [], TP.INT64), _tensor("c_in", [], TP.BOOL), _tensor("acc_in", [None, 4])],
        [_tensor("c_out", [], TP.BOOL), _tensor("acc_out", [None, 4])],
        [_init("offset", 0.5), onnx.numpy_helper.from_array(np.asarray([0], np.int64), "zero_axis")])
    loop = helper.make_node("Loop", ["M", "", "x"], ["y"], body=body)
    proto = _make([loop], [_tensor("x", [1, 4])], [_tensor("y", [1, 4])],
                  [onnx.numpy_helper.from_array(np.asarray(3, np.int64), "M")])
    _assert_equal_to_original(proto, 1)


def if_model(flag_from_input=False):
    """y = If(c, then: relu(x * w) + w, else: x - w) with w from the outer scope; c = 2 > 1 (constants)."""
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["t0"]), helper.make_node("Relu", ["t0"], ["t1"]),
                                helper.make_node("Add", ["t1", "w"], ["t_out"])], "then", [], [_tensor("t_out", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["e_out"])], "else", [], [_tensor("e_out", [1, 4])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    inputs = [_tensor("x", [1, 4])]
    if flag_from_input:
        nodes.insert(0, helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0))
        nodes.insert(1, _const_node("zero", np.float32(0)))
        nodes.insert(2, helper.make_node("Greater", ["total", "zero"], ["c"]))
    else:
        nodes = [_const_node("two", np.float32(2)), _const_node("one", np.float32(1)),
                 helper.make_node("Greater", ["two", "one"], ["c"])] + nodes
    return _make(nodes, inputs, [_tensor("y", [1, 4])], [_init("w", [0.5, -1.0, 2.0, 0.25])], 17)


@pytest.mark.parametrize("batch", [1, 3])
def test_unrolled_if_equals_runtime(batch):
    loaded = _assert_equal_to_original(if_model(), batch)
    assert "Relu" in {n.op_type for n in loaded.graph}  # the then branch was chosen


def scan_model(opset, reverse=False, axis=0):
    """A running sum and product over a sequence axis; scan output the running sum (Scan 9+: x [4, 3] scanned
    along `axis`; Scan 8: x [batch, 4, 3] scanned along axis 1)."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Mul", ["p_in", "x_t"], ["p_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])], "body",
        [_tensor("s_in", [3]), _tensor("p_in", [3]), _tensor("x_t", [3])],
        [_tensor("s_out", [3]), _tensor("p_out", [3]), _tensor("y_t", [3])])
    if opset == 8:
        node = helper.make_node("Scan", ["", "s0", "p0", "x"], ["s", "p", "ys"], body=body, num_scan_inputs=1,
                                directions=[int(reverse)])
        return _make([node], [_tensor("s0", [2, 3]), _tensor("p0", [2, 3]), _tensor("x", [2, 4, 3])],
                     [_tensor("s", [2, 3]), _tensor("p", [2, 3]), _tensor("ys", [2, 4, 3])], opset=8)
    x_dims = [4, 3] if axis == 0 else [3, 4]
    node = helper.make_node("Scan", ["s0", "p0", "x"], ["s", "p", "ys"], body=body, num_scan_inputs=1,
                            scan_input_directions=[int(reverse)], scan_input_axes=[axis],
                            scan_output_directions=[int(reverse)])
    return _make([node], [_tensor("s0", [3]), _tensor("p0", [3]), _tensor("x", x_dims)],
                 [_tensor("s", [3]), _tensor("p", [3]), _tensor("ys", [4, 3])], opset=opset)


@pytest.mark.parametrize("opset,kw", [(9, {}), (11, {"reverse": True}), (17, {"axis": 1}),
                                      (17, {"axis": -1, "reverse": True}), (8, {}), (8, {"reverse": True})], ids=str)
def test_unrolled_scan_equals_runtime(opset, kw):
    _assert_equal_to_original(scan_model(opset, **kw), 1)


@pytest.mark.parametrize("proto,words", [
    (lambda: loop_model(trip_from_input=True), ("Loop", "trip count", "depends on the input")),
    (lambda: if_model(flag_from_input=True), ("If", "condition", "depends on the input")),
], ids=["loop", "if"])
def test_what_cannot_be_unrolled_is_refused_in_one_line(proto, words):
    with pytest.raises(UnsupportedOpError) as info:
        model_lib.load(proto())
    message = str(info.value)
    assert all(w in message for w in words) and "cannot unroll" in message and "\n" not in message, message


def test_loop_classifier_bounds_are_sound():
    """IBP and CROWN through an unrolled Loop (the outer-scope x and w read by every iteration). CROWN refuses
    the scan output (stacked along axis 0, the batch axis), so it bounds the model without it."""
    x0 = np.random.default_rng(6).uniform(-1, 1, (1, 4)).astype(np.float32)
    for method, outputs in (("ibp", ("final", "stacked")), ("crown", ("final",))):
        loaded = model_lib.load(loop_model(trips=3, scan_output=len(outputs) > 1))
        reference = api.to_proto(loaded)
        bound = api.to_proto(api.bound_graph(loaded, method))
        for output in outputs:
            report = check_bounds_sound(reference, graph_bound_fn(bound, "x", output), x0, 0.1, n_random=16,
                                        corners=16, pgd_steps=5, attack_targets=3, output=output)
            report.assert_sound()


def test_crown_bounds_torchscript_lstm_through_its_sequence_first_layout(tmp_path):
    """torch's TorchScript export squeezes and transposes Y back to batch first right after the layer: the
    unroller sinks its layout Transpose through the Squeeze so the two cancel and CROWN keeps the batch first
    (over BOUND_SEQ steps, as the other bound tests)."""
    import arch_zoo
    path = _torch_classifier("LSTM", tmp_path / "lstm.onnx", dynamo=False, seq=BOUND_SEQ, read_sequence=True)
    loaded = model_lib.load(path)
    bound = api.to_proto(api.bound_graph(loaded, "crown"))
    x0 = arch_zoo.sample_input((BOUND_SEQ, INPUT), seed=3)
    name, output = loaded.graph.inputs[0].name, loaded.graph.outputs[0].name
    report = check_bounds_sound(api.to_proto(loaded), graph_bound_fn(bound, name, output), x0, 0.05, n_random=8,
                                corners=8, pgd_steps=3, attack_targets=3)
    report.assert_sound()
