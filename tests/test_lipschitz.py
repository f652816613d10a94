"""Lipschitz-margin certification: every rule's constant bounds the true operator norm (float64 Jacobians of the
torch executor), whole networks never change faster than their constant, certified samples resist an L2 attack,
and the certify / CLI plumbing of the L2 norm."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphcert
from cli import main
from graphcert import api
from graphcert.certify import certify, margin_objective
from graphcert.data import Dataset, load_dataset
from graphcert.errors import InputError, UnsupportedOpError
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.runtime import Session
from graphcert.torch_exec import TorchGraph
from graphcert.passes import lipschitz
from graphcert.passes.lipschitz import lipschitz_constants, output_lipschitz

from zoo import ZOO, input_name, sample_input

MLP = str(Path(__file__).resolve().parents[1] / "models" / "mnist_mlp.onnx")
UNSUPPORTED_ZOO = {"torch_layernorm", "torch_conv_transpose"}


def one_op_model(op: str, shape: list[int], initializers: dict | None = None, inputs: list[str] | None = None,
                 opset: int = 17, **attrs) -> onnx.ModelProto:
    """x [1, *shape] -> op(x, *inputs) -> y, with the named initializers."""
    initializers = initializers or {}
    node = helper.make_node(op, ["x", *(inputs or list(initializers))], ["y"], name=f"the_{op.lower()}", **attrs)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def constant_of(model) -> float:
    constants, _ = lipschitz_constants(model)
    return constants[model.graph.outputs[0]]


def jacobian_norm(model, x: np.ndarray, output: str | None = None, row: np.ndarray | None = None) -> float:
    """The largest singular value of d output / d x at x (of row·output with a row), in float64."""
    network = TorchGraph(model, trainable=False, dtype=torch.float64)
    name, output = model.graph.inputs[0].name, output or model.graph.outputs[0].name

    def f(flat):
        y = network({name: flat.reshape(x.shape)}, outputs=[output])[output].reshape(-1)
        return y if row is None else (torch.as_tensor(row, dtype=torch.float64) @ y).reshape(1)
    jac = torch.autograd.functional.jacobian(f, torch.as_tensor(x, dtype=torch.float64).reshape(-1))
    return float(np.linalg.norm(jac.numpy(), 2))


def check_linear_rule(proto, slack: float = 1.0 + 1e-5) -> tuple[float, float]:
    """(rule constant, true norm) of a linear one-op model; asserts the constant is sound and within `slack`."""
    model = graphcert.load(proto)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).uniform(-1, 1, size=dims)
    found, true = constant_of(model), jacobian_norm(model, x)
    assert true <= found <= slack * true
    return found, true


rng = np.random.default_rng(7)


# ---- rules on single ops -----------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b,alpha", [(0, 1.0), (1, -0.7)])
def test_gemm_is_its_exact_largest_singular_value(trans_b, alpha):
    w = rng.standard_normal((6, 5) if not trans_b else (5, 6)).astype(np.float32)
    check_linear_rule(one_op_model("Gemm", [6], {"w": w, "b": np.ones(5, np.float32)}, transB=trans_b, alpha=alpha))


@pytest.mark.parametrize("weight_first", [False, True])
def test_matmul_with_a_constant_on_either_side(weight_first):
    w = rng.standard_normal((4, 4)).astype(np.float32)
    proto = one_op_model("MatMul", [3, 4], {"w": w})
    if weight_first:
        proto.graph.node[0].input[:] = ["w", "x"]
        proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 4
        proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    check_linear_rule(proto)


def test_spectral_norm_beyond_the_exact_size_is_still_an_upper_bound(monkeypatch):
    w = rng.standard_normal((30, 20))
    exact = np.linalg.norm(w, 2)
    monkeypatch.setattr(lipschitz, "EXACT_SIDE", 5)
    assert exact <= lipschitz.spectral_norm(w) <= 3 * exact


CONVS = {
    "plain": dict(shape=[2, 6, 6], weight=(3, 2, 3, 3), pads=[1, 1, 1, 1]),
    "strided": dict(shape=[2, 7, 7], weight=(4, 2, 3, 3), strides=[2, 2]),
    "dilated": dict(shape=[1, 8, 8], weight=(3, 1, 3, 3), pads=[2, 2, 2, 2], dilations=[2, 2]),
    "grouped": dict(shape=[4, 6, 6], weight=(6, 2, 3, 3), pads=[1, 1, 1, 1], strides=[2, 2], group=2),
    "asymmetric": dict(shape=[2, 5, 6], weight=(2, 2, 2, 3), pads=[0, 1, 1, 0], strides=[1, 2]),
    "same_upper": dict(shape=[2, 7, 7], weight=(3, 2, 4, 4), strides=[2, 2], auto_pad="SAME_UPPER"),
    "one_d": dict(shape=[3, 9], weight=(2, 3, 3), pads=[1, 1], strides=[2]),
}


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("path", ["exact", "fft"])
def test_conv_constant_bounds_the_operator_norm(name, path, monkeypatch):
    spec = dict(CONVS[name])
    shape, weight = spec.pop("shape"), rng.standard_normal(spec.pop("weight")).astype(np.float32)
    if path == "fft":
        monkeypatch.setattr(lipschitz, "EXACT_SIDE", 0)
    proto = one_op_model("Conv", shape, {"w": weight, "b": np.ones(weight.shape[0], np.float32)},
                         kernel_shape=list(weight.shape[2:]), **spec)
    # Exact up to rounding on the real input size; the circular bound ignores borders and strides.
    found, true = check_linear_rule(proto, slack=1.0 + 1e-5 if path == "exact" else 3.0)


def test_conv_matrix_is_the_conv():
    weight = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    proto = one_op_model("Conv", [2, 6, 5], {"w": weight}, kernel_shape=[3, 3], pads=[1, 0, 2, 1], strides=[2, 1],
                         group=2)
    model = graphcert.load(proto)
    node = next(iter(model.graph))
    geometry = lipschitz.ConvGeometry(node, [6, 5], [3, 3])
    x = rng.standard_normal((1, 2, 6, 5))
    expected = TorchGraph(model, trainable=False, dtype=torch.float64)({"x": x})["y"].numpy().reshape(-1)
    assert np.allclose(lipschitz.conv_matrix(weight, geometry, 2) @ x.reshape(-1), expected, atol=1e-9)


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0),
    dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1),
    dict(kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1),
])
def test_average_pool_constant_bounds_the_operator_norm(attrs):
    found, true = check_linear_rule(one_op_model("AveragePool", [2, 7, 7], **attrs), slack=1.5)
    if attrs.get("ceil_mode", 0) == 0:
        assert found <= true * (1 + 1e-5)  # the per-axis Kronecker form is exact


def test_global_average_pool_and_batch_norm():
    check_linear_rule(one_op_model("GlobalAveragePool", [3, 4, 5]))
    c = 4
    params = {"scale": rng.uniform(-2, 2, c).astype(np.float32), "bias": rng.standard_normal(c).astype(np.float32),
              "mean": rng.standard_normal(c).astype(np.float32), "var": rng.uniform(0.1, 2, c).astype(np.float32)}
    check_linear_rule(one_op_model("BatchNormalization", [c, 3, 3], params, epsilon=1e-3))


@pytest.mark.parametrize("attrs,cover", [
    (dict(kernel_shape=[2, 2], strides=[2, 2]), 1),
    (dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), 9),
    (dict(kernel_shape=[3, 3], strides=[2, 2]), 4),
])
def test_max_pool_constant_is_the_root_of_the_window_cover(attrs, cover):
    model = graphcert.load(one_op_model("MaxPool", [2, 7, 7], **attrs))
    found = constant_of(model)
    assert found == pytest.approx(np.sqrt(cover))
    local = max(jacobian_norm(model, rng.standard_normal((1, 2, 7, 7))) for _ in range(5))
    assert local <= found


@pytest.mark.parametrize("op,attrs,constant", [("Relu", {}, 1.0), ("Sigmoid", {}, 0.25), ("Tanh", {}, 1.0),
                                               ("LeakyRelu", {"alpha": 0.2}, 1.0), ("LeakyRelu", {"alpha": -3.0}, 3.0),
                                               ("Elu", {"alpha": 2.0}, 2.0), ("Softplus", {}, 1.0),
                                               ("Softmax", {}, 1.0)])
def test_activations_never_steeper_than_their_constant(op, attrs, constant):
    model = graphcert.load(one_op_model(op, [6], **attrs))
    assert constant_of(model) == pytest.approx(constant, rel=1e-5)
    for seed in range(5):
        x = np.random.default_rng(seed).normal(0, 3, (1, 6))
        assert jacobian_norm(model, x) <= constant_of(model)


def test_moving_selecting_and_broadcasting_ops_compose_soundly():
    """Slice, Gather with repeats, Split, Concat, Pad (edge), Tile, Expand, broadcasting Mul/Add/Sub of branches."""
    init = {"starts": np.array([1], np.int64), "ends": np.array([5], np.int64), "axes": np.array([2], np.int64),
            "picks": np.array([0, 0, 0, 2], np.int64), "pads": np.array([0, 0, 2, 0, 0, 1], np.int64),
            "reps": np.array([1, 2, 1], np.int64), "shape": np.array([1, 3, 2, 7], np.int64),
            "split": np.array([2, 1], np.int64), "scale": rng.uniform(-2, 2, (2, 1)).astype(np.float32),
            "w": rng.standard_normal((5, 5)).astype(np.float32)}
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["sliced"]),            # [1, 3, 4]
             helper.make_node("Gather", ["x", "picks"], ["gathered"], axis=2),                   # [1, 3, 4]
             helper.make_node("Add", ["sliced", "gathered"], ["sum"]),
             helper.make_node("Pad", ["sum", "pads"], ["padded"], mode="edge"),                 # [1, 3, 7]
             helper.make_node("Split", ["padded", "split"], ["top", "bottom"], axis=1),          # [1,2,7], [1,1,7]
             helper.make_node("Mul", ["top", "scale"], ["scaled"]),
             helper.make_node("Tile", ["bottom", "reps"], ["tiled"]),                            # [1, 2, 7]
             helper.make_node("Sub", ["scaled", "tiled"], ["diff"]),
             helper.make_node("Concat", ["diff", "bottom"], ["joined"], axis=1),                 # [1, 3, 7]
             helper.make_node("Unsqueeze", ["joined", "axes"], ["wide"]),                        # [1, 3, 1, 7]
             helper.make_node("Expand", ["wide", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "moves", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in init.items() if k != "w"])
    model = graphcert.load(onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    found, true = constant_of(model), jacobian_norm(model, rng.standard_normal((1, 3, 5)))
    assert true <= found <= 4 * true


def test_unsupported_ops_are_refused_with_their_names():
    with pytest.raises(UnsupportedOpError, match="LayerNormalization"):
        api.bound_graph(ZOO["torch_layernorm"](), "lipschitz", norm="l2")
    product = one_op_model("Mul", [4], inputs=["x"])   # x * x has no global Lipschitz constant
    with pytest.raises(UnsupportedOpError, match="Mul"):
        api.bound_graph(product, "lipschitz", norm="l2")


def test_inspect_lists_only_the_ops_without_a_rule(tmp_path):
    from graphcert.inspect import describe
    path = tmp_path / "layernorm.onnx"
    onnx.save(ZOO["torch_layernorm"](), path)
    assert describe(path)["methods"]["lipschitz"] == ["LayerNormalization"]
    assert describe(MLP)["methods"]["lipschitz"] == []


# ---- whole networks ----------------------------------------------------------------------------------

SUPPORTED_ZOO = sorted(set(ZOO) - UNSUPPORTED_ZOO)


@pytest.mark.parametrize("name", SUPPORTED_ZOO)
def test_zoo_networks_change_no_faster_than_their_constant(name):
    proto = ZOO[name]()
    model = graphcert.load(proto)
    constants, _ = lipschitz_constants(model)
    y = model.graph.outputs[0]
    k_sub, weight = output_lipschitz(model, y, constants)
    network = TorchGraph(model, trainable=False, dtype=torch.float64)
    x_name = input_name(proto)
    out_dims = network({x_name: sample_input(ZOO[name], proto)})[y.name].shape
    for seed in range(3):
        x = sample_input(ZOO[name], proto, seed=seed).astype(np.float64)
        assert jacobian_norm(model, x, y.name) <= constants[y] * (1 + 1e-9)
        row = np.random.default_rng(seed).standard_normal(int(np.prod(out_dims)))
        margin_constant = k_sub * np.linalg.norm(weight @ row) if weight is not None \
            else constants[y] * np.linalg.norm(row)
        assert jacobian_norm(model, x, y.name, row) <= margin_constant * (1 + 1e-9)


@pytest.mark.parametrize("name", SUPPORTED_ZOO)
def test_zoo_output_bounds_contain_every_point_of_the_ball(name):
    proto = ZOO[name]()
    model = graphcert.load(proto)
    zoo_model = ZOO[name]
    session = Session(to_proto(api.bound_graph(model, "lipschitz", InputSet("linf", zoo_model.domain), norm="l2")))
    y = model.graph.outputs[0].name
    x = sample_input(zoo_model, proto, batch=4 if zoo_model.batched else 1)
    eps = 0.5
    bounds = session.run({input_name(proto): x, "epsilon": np.float32(eps)})
    network = TorchGraph(model, trainable=False)
    for seed in range(4):
        step = np.random.default_rng(seed).standard_normal(x.shape)
        axes = tuple(range(1, x.ndim)) if zoo_model.batched else None
        step *= eps / np.sqrt((step ** 2).sum(axis=axes, keepdims=True))   # on the sphere: |dx|_2 = eps
        moved = network({input_name(proto): (x + step).astype(np.float32)})[y].detach().numpy()
        assert (bounds[f"{y}_lower"] <= moved).all() and (moved <= bounds[f"{y}_upper"]).all()


def l2_attack(model, x: np.ndarray, objective: np.ndarray, eps: float, steps: int = 30) -> np.ndarray:
    """The smallest margin row PGD finds inside each sample's L2 ball (projected gradient steps)."""
    network = TorchGraph(model, trainable=False)
    name, out = model.graph.inputs[0].name, model.graph.outputs[0].name
    x0 = torch.as_tensor(x)
    rows = torch.as_tensor(objective)
    delta = torch.zeros_like(x0, requires_grad=True)
    worst = None
    for _ in range(steps):
        margins = torch.einsum("bmn,bn->bm", rows, network({name: x0 + delta})[out]).min(dim=1).values
        worst = margins.detach() if worst is None else torch.minimum(worst, margins.detach())
        (grad,) = torch.autograd.grad(margins.sum(), delta)
        with torch.no_grad():
            norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (x.ndim - 1))
            delta -= eps / 4 * grad / norms
            lengths = delta.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.ndim - 1))
            delta *= torch.clamp(eps / lengths.clamp_min(1e-12), max=1.0)
    return worst.numpy()


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_certified_mlp_samples_resist_an_l2_attack(eps):
    data = load_dataset("mnist-test").head(200)
    model = graphcert.load(MLP)
    session = Session(to_proto(api.bound_graph(model, "lipschitz", spec="runtime", norm="l2")))
    objective = margin_objective(data.y, 10)
    out = session.run({"image": data.x, "epsilon": np.float32(eps), "objective": objective})
    certified = (out["margins_lower"] > 0).all(axis=1) & (out["logits"].argmax(1) == data.y)
    assert certified.sum() >= 20
    found = l2_attack(model, data.x[certified], objective[certified], eps)
    assert (found > 0).all()


@pytest.mark.parametrize("name", ["torch_cnn", "torch_residual", "torch_conv_bn", "torch_pooling", "torch_pad"])
def test_certified_zoo_samples_resist_an_l2_attack(name):
    proto = ZOO[name]()
    model = graphcert.load(proto)
    x = sample_input(ZOO[name], proto, batch=64, seed=3)
    logits = Session(to_proto(model)).run({input_name(proto): x})[model.graph.outputs[0].name]
    labels = logits.argmax(axis=1)
    objective = margin_objective(labels, logits.shape[1])
    session = Session(to_proto(api.bound_graph(model, "lipschitz", spec="runtime", norm="l2")))
    # A radius at which some samples are certified and some are not.
    margins = (objective @ logits[..., None])[..., 0].min(axis=1)
    eps = float(np.median(margins)) / max(lipschitz_constants(model)[0][model.graph.outputs[0]], 1e-6)
    lower = session.run({input_name(proto): x, "epsilon": np.float32(eps), "objective": objective})["margins_lower"]
    certified = (lower > 0).all(axis=1)
    assert certified.any()
    assert (l2_attack(model, x[certified], objective[certified], eps) > 0).all()


def test_constant_spec_matches_the_runtime_objective():
    data = load_dataset("mnist-test").head(3)
    model = graphcert.load(MLP)
    objective = margin_objective(data.y, 10)
    runtime = Session(to_proto(api.bound_graph(model, "lipschitz", spec="runtime", norm="l2")))
    by_runtime = runtime.run({"image": data.x, "epsilon": np.float32(0.1), "objective": objective})["margins_lower"]
    for i in range(3):
        fixed = Session(to_proto(api.bound_graph(model, "lipschitz", spec=objective[i], norm="l2")))
        lower = fixed.run({"image": data.x[i:i + 1], "epsilon": np.float32(0.1)})["margins_lower"]
        assert np.allclose(lower[0], by_runtime[i], rtol=1e-4, atol=1e-4)


# ---- certify and the CLI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist-test").head(100)


def test_lipschitz_ignores_the_domain_and_auto_is_at_least_every_stage(mnist):
    clipped = certify(MLP, mnist, 0.2, method="lipschitz", norm="l2", rounding="real")
    unclipped = certify(MLP, mnist, 0.2, method="lipschitz", norm="l2", clip=False, rounding="real")
    assert clipped.certified == unclipped.certified
    crown = certify(MLP, mnist, 0.2, method="crown", norm="l2", rounding="real")
    auto = certify(MLP, mnist, 0.2, method="auto", norm="l2", rounding="real")
    assert auto.norm == "l2" and auto.certified >= max(crown.certified, clipped.certified)


def test_tied_logits_are_never_certified():
    w = rng.standard_normal((4, 3)).astype(np.float32)
    w[:, 1] = w[:, 0]                                                   # logits 0 and 1 always equal
    proto = one_op_model("Gemm", [4], {"w": w, "b": np.zeros(3, np.float32)})
    data = Dataset("ties", rng.uniform(0, 1, (20, 4)).astype(np.float32), np.zeros(20, np.int64), (0.0, 1.0))
    logits = w.T @ data.x.T
    assert (logits.argmax(axis=0) == 0).any()   # ties count as correct for clean accuracy (argmax picks 0)
    result = certify(graphcert.load(proto), data, 0.0, method="lipschitz", norm="l2")
    assert result.clean > 0 and result.certified == 0


def test_bad_norm_combinations_are_input_errors(mnist):
    for method, norm in (("ibp", "l2"), ("lipschitz", "linf")):
        with pytest.raises(InputError, match="use"):
            certify(MLP, mnist, 0.1, method=method, norm=norm)
    with pytest.raises(InputError, match="norm"):
        certify(MLP, mnist, 0.1, method="crown", norm="l1")
    with pytest.raises(InputError, match="trained"):
        api.bound_graph(MLP, "lipschitz", norm="l2", trainable=True)


def test_cli_certifies_l2_with_lipschitz_as_json(capsys):
    assert main(["certify", "mnist_mlp", "--norm", "l2", "--method", "lipschitz", "--eps", "0.1", "--limit", "50",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["norm"] == "l2" and result["method"] == "lipschitz" and result["n"] == 50
    assert 0 < result["certified"] <= result["clean"]


@pytest.mark.parametrize("args", [["--norm", "l2", "--method", "ibp"], ["--method", "lipschitz"],
                                  ["--norm", "l1", "--method", "crown"]])
def test_cli_bad_combinations_exit_2_with_one_line(capsys, args):
    assert main(["certify", "mnist_mlp", "--limit", "5", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphcert: error:") and "\n" not in err


def test_alpha_crown_on_l2_balls_is_never_looser_than_crown(mnist):
    from graphcert.certify import certifier, margin_objective
    data = mnist.head(12)
    x = data.x.reshape(len(data), 1, 28, 28)
    objective = margin_objective(data.y, 10)
    _, crown = certifier(graphcert.load(MLP), "crown", data.domain, norm="l2")(x, 0.3, objective)
    _, alpha = certifier(graphcert.load(MLP), "alpha-crown", data.domain, norm="l2")(x, 0.3, objective)
    assert (alpha >= crown - 1e-5).all() and (alpha > crown + 1e-4).any()


def test_cli_converts_an_l2_lipschitz_bound_graph(tmp_path):
    out = tmp_path / "lipschitz.onnx"
    assert main(["convert", "mnist_mlp", "-o", str(out), "--method", "lipschitz", "--norm", "l2"]) == 0
    proto = onnx.load(str(out))
    assert [o.name for o in proto.graph.output] == ["logits", "logits_lower", "logits_upper"]
    assert main(["convert", "mnist_mlp", "-o", str(tmp_path / "no.onnx"), "--method", "lipschitz"]) == 2
    assert not (tmp_path / "no.onnx").exists()
