"""CROWN through the ops it once refused: relaxation lines of Exp, Log, Sqrt, 1/x and the square sound on
every interval, McCormick planes sound on every box, and bound graphs (CROWN, CROWN-IBP) that contain the
true outputs of models with Softmax, LayerNormalization, products of two branches and every Pad mode, never
looser than IBP and exact at radius 0."""
from __future__ import annotations

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
from graphcert.passes import relaxations
from graphcert.runtime import Session

FLOAT = ir.TensorType(ir.DataType.FLOAT)


def relaxation_model(inputs: list[str], relax) -> onnx.ModelProto:
    """A graph from vectors `inputs` to the named outputs of relax(builder, values) (a dict of values)."""
    values = [ir.Value(name=n, type=FLOAT, shape=ir.Shape(["n"])) for n in inputs]
    graph = ir.Graph(values, [], nodes=[], opset_imports={"": 17}, name="relaxation")
    b = Builder(graph)
    zero = b.op("Mul", values[0], b.const(0.0))
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
