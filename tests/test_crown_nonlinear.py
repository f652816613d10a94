"""CROWN through the ops it once refused: relaxation lines of Exp, Log, Sqrt, 1/x and the square sound on
every interval, McCormick planes sound on every box, and bound graphs (CROWN, CROWN-IBP) that contain the
true outputs of models with Softmax, LayerNormalization, products of two branches and every Pad mode, never
looser than IBP and exact at radius 0."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import zoo
from graphcert.builder import Builder
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.interval import Interval
from graphcert.model import load
from graphcert.passes import crown_products, relaxations
from graphcert.passes.adjoints import pad_copies
from graphcert.passes.crown import CrownPass
from graphcert.passes.ibp import IntervalPass
from graphcert.runtime import Session
from harness import check_bounds_sound, graph_bound_fn

FLOAT = ir.TensorType(ir.DataType.FLOAT)


def relaxation_model(inputs: list[str], relax) -> onnx.ModelProto:
    """A graph from vectors `inputs` to the named outputs of relax(builder, values) (a dict of values)."""
    values = [ir.Value(name=n, type=FLOAT, shape=ir.Shape(["n"])) for n in inputs]
    graph = ir.Graph(values, [], nodes=[], opset_imports={"": 17}, name="relaxation")
    b = Builder(graph)
    zero = b.op("ConstantOfShape", b.op("Shape", values[0]))   # float zeros, also where the inputs are infinite
    for name, value in relax(b, values).items():
        named = b.op("Add", value if value is not None else zero, zero)
        named.name, named.type, named.shape = name, FLOAT, ir.Shape(["n"])
        graph.outputs.append(named)
    return to_proto(ir.Model(graph, ir_version=10))


def unary_lines(op: str):
    def relax(b, values):
        operands = [values[0], b.const(np.float32(2.0))] if op == "Pow" else [values[0]] * (2 if op == "Mul" else 1)
        lines = relaxations.relax(b, ir.Node("", op, operands), Interval.from_bounds(b, values[0], values[1]))
        return {"lower_slope": lines.lower_slope, "lower_intercept": lines.lower_intercept,
                "upper_slope": lines.upper_slope, "upper_intercept": lines.upper_intercept}
    return relaxation_model(["l", "u"], relax)


def real_intervals(rng) -> tuple[np.ndarray, np.ndarray]:
    """Wide, narrow, one-sided, straddling and point intervals of the reals."""
    centers = np.concatenate([rng.uniform(-6, 6, 300), [0, 0, 0.8, -0.5, 3, -3, 20, -20, -60]])
    widths = np.concatenate([np.exp(rng.uniform(np.log(1e-4), np.log(30), 300)), [0, 1e-7, 0.3, 1, 0, 0, 40, 40, 80]])
    return (centers - widths / 2).astype(np.float32), (centers + widths / 2).astype(np.float32)


def positive_intervals(rng) -> tuple[np.ndarray, np.ndarray]:
    """Intervals of x > 0 from 1e-6 to 1e4 wide and narrow, point intervals, and some reaching down to 0."""
    lower = np.exp(rng.uniform(np.log(1e-6), np.log(1e3), 300))
    width = lower * np.exp(rng.uniform(np.log(1e-7), np.log(1e3), 300))
    lower = np.concatenate([lower, [1.0, 1e-5, 0.0, 0.0, 0.0, 2.0]])
    width = np.concatenate([width, [0.0, 0.0, 1.0, 1e-6, 0.0, 1e-6]])
    return lower.astype(np.float32), (lower + width).astype(np.float32)


def nonzero_intervals(rng) -> tuple[np.ndarray, np.ndarray]:
    """Positive intervals, their mirror images, and intervals holding 0."""
    lower, upper = positive_intervals(rng)
    straddling_l, straddling_u = -rng.uniform(0, 3, 20), rng.uniform(0, 3, 20)
    return (np.concatenate([lower, -upper, straddling_l]).astype(np.float32),
            np.concatenate([upper, -lower, straddling_u]).astype(np.float32))


UNARY = {  # op: (function, intervals, where the model is finite: points to check)
    "Exp": (np.exp, real_intervals, lambda x: x < 88),
    "Log": (np.log, positive_intervals, lambda x: x > 0),
    "Sqrt": (np.sqrt, positive_intervals, lambda x: x >= 0),
    "Reciprocal": (lambda x: 1 / x, nonzero_intervals, lambda x: np.abs(x) > 1e-30),
    "Pow": (np.square, real_intervals, lambda x: np.isfinite(x)),
    "Mul": (np.square, real_intervals, lambda x: np.isfinite(x)),
}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_relaxation_lines_bound_the_function_on_every_interval(op):
    f, make_intervals, defined = UNARY[op]
    lower, upper = make_intervals(np.random.default_rng(0))
    lines = Session(unary_lines(op)).run({"l": lower, "u": upper})
    for value in lines.values():
        assert not np.any(np.isnan(value)), f"{op}: NaN in its lines"
    t = np.linspace(0, 1, 401)[:, None]
    x = lower.astype(np.float64) + t * (upper.astype(np.float64) - lower)
    ok = defined(x)
    x = np.where(ok, x, 1.0)   # points where the model is undefined or infinite are not checked
    y = f(x)
    below = lines["lower_slope"] * x + lines["lower_intercept"]
    above = lines["upper_slope"] * x + lines["upper_intercept"]
    tolerance = 1e-5 * (1 + np.abs(y))
    assert np.all((below <= y + tolerance)[ok]), f"lower line above {op} by {np.max((below - y)[ok]):.3g}"
    assert np.all((above >= y - tolerance)[ok]), f"upper line below {op} by {np.max((y - above)[ok]):.3g}"


def test_relaxation_lines_are_exact_on_point_intervals():
    points = np.float32([0.5, 1.0, 2.0, 7.0])
    for op, (f, _, _) in UNARY.items():
        lines = Session(unary_lines(op)).run({"l": points, "u": points})
        for side in ("lower", "upper"):
            line = lines[f"{side}_slope"] * points + lines[f"{side}_intercept"]
            np.testing.assert_allclose(line, f(points.astype(np.float64)), rtol=1e-5, atol=1e-5, err_msg=f"{op} {side}")


def planes_model() -> onnx.ModelProto:
    def relax(b, values):
        lx, ux, ly, uy = values
        planes = relaxations.mccormick(b, Interval.from_bounds(b, lx, ux), Interval.from_bounds(b, ly, uy))
        return {name: getattr(planes, name) for name in ("lower_x", "lower_y", "lower_intercept",
                                                          "upper_x", "upper_y", "upper_intercept")}
    return relaxation_model(["lx", "ux", "ly", "uy"], relax)


def random_boxes(rng, n: int):
    centers = rng.uniform(-5, 5, (2, n))
    widths = np.exp(rng.uniform(np.log(1e-5), np.log(20), (2, n)))
    widths[:, :20] = 0.0
    widths[0, 20:40] = 0.0
    return (centers - widths / 2).astype(np.float32), (centers + widths / 2).astype(np.float32)


def test_mccormick_planes_bound_the_product_on_every_box():
    rng = np.random.default_rng(1)
    lower, upper = random_boxes(rng, 400)
    planes = Session(planes_model()).run({"lx": lower[0], "ux": upper[0], "ly": lower[1], "uy": upper[1]})
    t = rng.random((2, 200, 1))
    t[:, :4] = [[[0], [0], [1], [1]], [[0], [1], [0], [1]]]   # the corners
    x, y = (lower[i] + t[i] * (upper[i].astype(np.float64) - lower[i]) for i in range(2))
    z = x * y
    below = planes["lower_x"] * x + planes["lower_y"] * y + planes["lower_intercept"]
    above = planes["upper_x"] * x + planes["upper_y"] * y + planes["upper_intercept"]
    tolerance = 1e-5 * (1 + np.abs(z) + np.abs(x) + np.abs(y))
    assert np.all(below <= z + tolerance), f"lower plane above x·y by {np.max(below - z):.3g}"
    assert np.all(above >= z - tolerance), f"upper plane below x·y by {np.max(z - above):.3g}"


# ---- bound graphs ------------------------------------------------------------------------------------------

def products_and_pads_model() -> onnx.ModelProto:
    """Reflect and edge padding between convolutions, then two dense branches combined by a product, a
    division by a bounded tensor, Exp, Log, Sqrt and squares (Pow and x·x)."""
    rng = np.random.default_rng(5)

    def tensor(name, array):
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32 if np.asarray(array).dtype.kind == "f"
                                                  else np.int64), name)
    inits = [tensor("reflect_pads", [0, 0, 1, 2, 0, 0, 2, 1]), tensor("edge_pads", [0, 0, 2, 0, 0, 0, 1, 3]),
             tensor("w1", rng.normal(size=[3, 2, 3, 3]) * 0.4), tensor("w2", rng.normal(size=[2, 3, 3, 3]) * 0.3),
             tensor("d1", rng.normal(size=[2 * 7 * 8, 6]) * 0.05), tensor("d2", rng.normal(size=[2 * 5 * 6, 6]) * 0.3),
             tensor("two", np.float32(2.0)), tensor("half", np.float32(0.5)), tensor("one", np.float32(1.0)),
             tensor("tenth", np.float32(0.1)), tensor("head", rng.normal(size=[24, 3]) * 0.5)]
    nodes = [
        helper.make_node("Pad", ["x", "reflect_pads"], ["reflected"], mode="reflect"),
        helper.make_node("Conv", ["reflected", "w1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Pad", ["r1", "edge_pads"], ["edged"], mode="edge"),
        helper.make_node("Conv", ["edged", "w2"], ["c2"]),
        helper.make_node("Flatten", ["c2"], ["f1"]),
        helper.make_node("MatMul", ["f1", "d1"], ["h1"]),
        helper.make_node("Flatten", ["x"], ["f2"]),
        helper.make_node("MatMul", ["f2", "d2"], ["g2"]),
        helper.make_node("Tanh", ["g2"], ["h2"]),
        helper.make_node("Mul", ["h1", "h2"], ["product"]),
        helper.make_node("Pow", ["h2", "two"], ["h2_squared"]),
        helper.make_node("Add", ["h2_squared", "half"], ["denominator"]),
        helper.make_node("Div", ["product", "denominator"], ["quotient"]),
        helper.make_node("Exp", ["h1"], ["e1"]),
        helper.make_node("Add", ["e1", "one"], ["e1_plus_one"]),
        helper.make_node("Log", ["e1_plus_one"], ["softplus"]),
        helper.make_node("Mul", ["h1", "h1"], ["h1_squared"]),
        helper.make_node("Add", ["h1_squared", "tenth"], ["lifted"]),
        helper.make_node("Sqrt", ["lifted"], ["magnitude"]),
        helper.make_node("Concat", ["quotient", "softplus", "magnitude", "h2"], ["joined"], axis=1),
        helper.make_node("MatMul", ["joined", "head"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "products_and_pads",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 2, 5, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


MODELS = {name: (zoo.ZOO[name], zoo.ZOO[name].domain) for name in ("torch_layernorm", "torch_softmax", "torch_pad")}
MODELS["products_and_pads"] = (products_and_pads_model, (0.0, 1.0))


@functools.lru_cache(maxsize=None)
def group_sort_model() -> onnx.ModelProto:
    """The 1-Lipschitz architecture (`--arch lipmlp`): GroupSort2 as pair MaxPools, which CROWN decomposes."""
    from graphcert.architectures import build
    return build("lipmlp", (1, 4, 4), 3, seed=4)


MODELS["group_sort"] = (group_sort_model, (0.0, 1.0))


def make_bound_graphs(name: str) -> dict[str, onnx.ModelProto]:
    build, domain = MODELS[name]
    normalised = load(build())
    made = {method: to_proto(CrownPass(InputSet("linf", domain), intermediate=intermediate)(normalised).model)
            for method, intermediate in (("crown", "crown"), ("crown-ibp", "ibp"))}
    made["ibp"] = to_proto(IntervalPass(InputSet("linf", domain))(normalised).model)
    return made


bound_graphs = functools.lru_cache(maxsize=None)(make_bound_graphs)


def sample(name: str, batch: int = 1) -> tuple[onnx.ModelProto, np.ndarray, str]:
    build, domain = MODELS[name]
    proto = build()
    shape = [batch] + zoo.input_shape(proto)[1:]   # every model here is batched (a fixed 1 becomes symbolic)
    x = np.random.default_rng(2).uniform(*domain, size=shape).astype(np.float32)
    return proto, x, proto.graph.output[0].name


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_bounds_contain_the_outputs(name, method):
    check_sound(name, bound_graphs(name)[method])


def check_sound(name: str, graph: onnx.ModelProto) -> None:
    proto, x, out = sample(name)
    bounds = graph_bound_fn(graph, zoo.input_name(proto), out, "linf", MODELS[name][1])
    for eps in (0.03, 0.3):
        check_bounds_sound(proto, bounds, x, eps, MODELS[name][1], n_random=16, corners=16, pgd_steps=5).assert_sound()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_linear_bounds_never_looser_than_intervals_and_exact_at_radius_zero(name):
    check_against_intervals(name, bound_graphs(name))


def check_against_intervals(name: str, graphs: dict[str, onnx.ModelProto]) -> None:
    proto, x, out = sample(name, batch=3)
    feeds = {zoo.input_name(proto): x}
    want = Session(to_proto(load(proto))).run(feeds)[out]
    for eps in (0.0, 0.01, 0.1, 0.3):
        found = {method: Session(graph).run({**feeds, "epsilon": np.float32(eps)}) for method, graph in graphs.items()}
        for method in ("crown", "crown-ibp"):
            lower, upper = found[method][f"{out}_lower"], found[method][f"{out}_upper"]
            tolerance = 1e-5 * (1 + np.abs(want))
            assert np.all(lower >= found["ibp"][f"{out}_lower"] - tolerance), f"{method} lower below IBP at {eps}"
            assert np.all(upper <= found["ibp"][f"{out}_upper"] + tolerance), f"{method} upper above IBP at {eps}"
            if eps == 0.0:
                np.testing.assert_allclose(lower, want, rtol=1e-4, atol=1e-4, err_msg=f"{method} lower")
                np.testing.assert_allclose(upper, want, rtol=1e-4, atol=1e-4, err_msg=f"{method} upper")
        if eps == 0.1:
            width = {m: float(np.mean(found[m][f"{out}_upper"] - found[m][f"{out}_lower"])) for m in found}
            assert width["crown"] < width["ibp"], width


def test_softmax_over_long_axes_shifts_and_multiplies(monkeypatch):
    """Past PAIRWISE_LIMIT elements Softmax becomes exp(x - c) · (1 / sum): as sound and exact, and the
    pairwise form (used below the limit) is at least as tight."""
    monkeypatch.setattr(crown_products, "PAIRWISE_LIMIT", 0)
    shifted = make_bound_graphs("torch_softmax")
    check_sound("torch_softmax", shifted["crown"])
    check_against_intervals("torch_softmax", shifted)
    proto, x, out = sample("torch_softmax", batch=3)
    feeds = {zoo.input_name(proto): x, "epsilon": np.float32(0.3)}
    widths = [np.mean(np.subtract(*(Session(graph).run(feeds)[f"{out}_{side}"] for side in ("upper", "lower"))))
              for graph in (shifted["crown"], bound_graphs("torch_softmax")["crown"])]
    assert widths[1] <= widths[0], widths


def test_linear_bounds_stay_numbers_where_intervals_overflow():
    """On the whole domain, IBP's exp overflows and its next linear layer meets inf - inf (IBP then answers the
    whole line, -inf); the linear bounds fall back to their own or to constant lines instead."""
    proto, x, out = sample("products_and_pads")
    graphs = bound_graphs("products_and_pads")
    feeds = {zoo.input_name(proto): x, "epsilon": np.float32(1.0)}
    assert np.all(np.isneginf(Session(graphs["ibp"]).run(feeds)[f"{out}_lower"]))
    for method in ("crown", "crown-ibp"):
        found = Session(graphs[method]).run(feeds)
        assert not np.any(np.isnan(found[f"{out}_lower"])) and not np.any(np.isnan(found[f"{out}_upper"])), method
    bounds = graph_bound_fn(graphs["crown"], zoo.input_name(proto), out, "linf", (0.0, 1.0))
    check_bounds_sound(proto, bounds, x, 1.0, (0.0, 1.0), n_random=16, corners=16, pgd_steps=5).assert_sound()


@pytest.mark.parametrize("name", ["products_and_pads", "torch_softmax"])
def test_batched_bounds_match_per_sample(name):
    proto, x, out = sample(name, batch=3)
    session = Session(bound_graphs(name)["crown"])
    feeds = {"epsilon": np.float32(0.05)}
    batch = session.run({zoo.input_name(proto): x, **feeds})
    for i in range(3):
        single = session.run({zoo.input_name(proto): x[i:i + 1], **feeds})
        for side in ("lower", "upper"):
            np.testing.assert_allclose(single[f"{out}_{side}"], batch[f"{out}_{side}"][i:i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
def test_pad_copy_matrices_are_the_op(mode):
    """The copying Pad's adjoint is built from per-axis copy matrices: applied forward they must give Pad."""
    pads = [0, 0, 1, 3, 0, 0, 2, 1]
    x = np.random.default_rng(3).normal(size=[1, 1, 4, 5]).astype(np.float32)
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)
    graph = helper.make_graph([node], "pad", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.int64(pads), "pads")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)   # wrap: opset 19
    want = Session(model).run({"x": x})["y"]
    rows, columns = (pad_copies(size, pads[axis], pads[axis + 4], mode) for axis, size in ((2, 4), (3, 5)))
    np.testing.assert_array_equal(rows @ x[0, 0] @ columns.T, want[0, 0])


def test_mccormick_planes_are_numbers_on_unbounded_boxes():
    """Infinite box ends (IBP after an overflow) give constant planes at the clamped product range, not NaN."""
    inf = np.float32(np.inf)
    lx, ux = np.float32([-inf, 0.0, 1.0, -2.0]), np.float32([1.0, inf, 2.0, inf])
    ly, uy = np.float32([0.0, 0.0, -inf, -1.0]), np.float32([2.0, 0.0, inf, 1.0])
    planes = Session(planes_model()).run({"lx": lx, "ux": ux, "ly": ly, "uy": uy})
    for name, value in planes.items():
        assert np.all(np.isfinite(value)), name
    x, y = np.float64([-5.0, 7.0, 1.5, 3.0]), np.float64([1.0, 0.0, -9.0, 0.5])
    assert np.all(planes["lower_x"] * x + planes["lower_y"] * y + planes["lower_intercept"] <= x * y)
    assert np.all(planes["upper_x"] * x + planes["upper_y"] * y + planes["upper_intercept"] >= x * y)


def test_pair_max_pools_are_bounded_through_the_gap_of_each_pair(monkeypatch):
    """max(a, b) = b + relu(a - b): linear bounds of a - b keep a pair decided where the intervals of a and b
    overlap, so the decomposed bounds are far tighter than the per-window relaxation (and sound: above)."""
    proto, x, out = sample("group_sort", batch=4)
    feeds = {zoo.input_name(proto): x, "epsilon": np.float32(0.02)}

    def width(graph):
        found = Session(graph).run(feeds)
        return float(np.mean(found[f"{out}_upper"] - found[f"{out}_lower"]))

    decomposed = width(bound_graphs("group_sort")["crown"])
    monkeypatch.setattr(crown_products, "_pair_max", lambda node: False)
    per_window = width(make_bound_graphs("group_sort")["crown"])
    assert decomposed < 0.5 * per_window, (decomposed, per_window)
