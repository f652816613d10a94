"""The VNN-LIB parser: syntax variants, DNF semantics, errors with line numbers, speed on large files."""
import pathlib

import numpy as np
import pytest

from graphcert.errors import SpecError
from graphcert.vnnlib import load_property, parse_property

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp2021"


def declare(n_x, n_y):
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_x)) + \
           "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_y))


def unit_box(n_x):
    return "".join(f"(assert (>= X_{i} 0))\n(assert (<= X_{i} 1))\n" for i in range(n_x))


@pytest.mark.parametrize("constraint", [
    "(<= Y_0 Y_1)", "(>= Y_1 Y_0)", "(<= (- Y_0 Y_1) 0)", "(>= 0 (+ Y_0 (* -1 Y_1)))",
    "(>= (+ (* -1 Y_0) Y_1) 0)", "(<= (* 2 Y_0) (* 2.0 Y_1))", "(<= (+ Y_0 1) (+ Y_1 1))",
    "(or (and (<= Y_0 Y_1)))", "(and (<= Y_0 Y_1))", "(< Y_0 Y_1)", "(>= (- Y_0) (- Y_1))",
])
def test_spellings_of_one_output_constraint_agree(constraint):
    prop = parse_property(declare(1, 2) + unit_box(1) + f"(assert {constraint})")
    [conjunct] = prop.unsafe
    row = conjunct.matrix[0] / np.abs(conjunct.matrix[0]).max()
    assert np.allclose(row, [1, -1]) and np.isclose(conjunct.bound[0], 0)
    assert conjunct.satisfied_by([0.0, 1.0]) and not conjunct.satisfied_by([1.0, 0.0])


def test_input_bounds_with_constants_on_either_side_and_scaling():
    text = declare(3, 1) + """
    (assert (<= X_0 0.5)) (assert (>= X_0 -0.5))
    (assert (>= 2 X_1)) (assert (<= 1 X_1))
    (assert (<= (* -2 X_2) 1)) (assert (<= (* 4 X_2) 2))
    (assert (>= Y_0 3.5))"""
    prop = parse_property(text)
    [(lower, upper)] = prop.input_boxes
    assert np.allclose(lower, [-0.5, 1, -0.5]) and np.allclose(upper, [0.5, 2, 0.5])
    C, offset = prop.stacked_rows()
    assert np.allclose(C, [[-1]]) and np.allclose(offset, [3.5])


def test_disjunction_of_conjunctions_gives_one_conjunct_per_term():
    text = declare(1, 3) + unit_box(1) + """
    (assert (or (and (>= Y_0 Y_2) (>= Y_1 Y_2)) (and (<= Y_0 -1))))"""
    prop = parse_property(text)
    assert len(prop.unsafe) == 2 and prop.cases == [(0, 0), (0, 1)]
    C, offset = prop.stacked_rows()
    assert C.shape == (3, 3) and [list(r) for r in prop.conjunct_rows] == [[0, 1], [2]]
    y = np.array([2.0, 3.0, 1.0])
    margins = C @ y + offset
    assert np.all(margins[prop.conjunct_rows[0]] <= 0)


def test_input_disjunction_as_in_acasxu_property_6():
    text = declare(2, 2) + """
    (assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1))
                (and (>= X_0 5) (<= X_0 6) (>= X_1 0) (<= X_1 1))))
    (assert (or (and (<= Y_0 Y_1)) (and (<= Y_1 Y_0))))"""
    prop = parse_property(text)
    assert len(prop.input_boxes) == 2 and len(prop.unsafe) == 2 and len(prop.cases) == 4
    assert prop.is_counterexample([5.5, 0.5], [0, 1]) and not prop.is_counterexample([3, 0.5], [0, 1])


def test_mixed_conjunct_of_input_and_output_constraints_pairs_them():
    text = declare(1, 1) + """(assert (or (and (>= X_0 -1) (<= X_0 1) (>= Y_0 100))
                                           (and (>= X_0 1) (<= X_0 2) (<= Y_0 0))))"""
    prop = parse_property(text)
    assert prop.cases == [(0, 0), (1, 1)]
    assert prop.is_counterexample([0.0], [100.0]) and not prop.is_counterexample([0.0], [0.0])


def test_equality_on_inputs_and_outputs():
    prop = parse_property(declare(1, 1) + "(assert (= X_0 0.25)) (assert (= Y_0 2))")
    [(lower, upper)] = prop.input_boxes
    assert lower[0] == upper[0] == 0.25
    assert prop.unsafe[0].satisfied_by([2.0]) and not prop.unsafe[0].satisfied_by([2.5])


def test_contradictory_input_box_leaves_no_case():
    prop = parse_property(declare(1, 1) + "(assert (>= X_0 1)) (assert (<= X_0 0)) (assert (<= Y_0 0))")
    assert prop.cases == []


@pytest.mark.parametrize("text, line, words", [
    (declare(1, 1) + unit_box(1) + "(assert (<= X_0 Y_0))", 5, "mixes inputs"),
    (declare(1, 1) + "(assert (<= X_0 1))\n(assert (<= Y_0 0))", 1, "no lower bound"),
    (declare(2, 1) + unit_box(2) + "(assert (<= (+ X_0 X_1) 1))", 8, "several inputs"),
    (declare(1, 1) + unit_box(1) + "(assert (<= (* Y_0 Y_0) 1))", 5, "not linear"),
    (declare(1, 1) + unit_box(1) + "(assert (foo Y_0 1))", 5, "unsupported formula"),
    (declare(1, 1) + unit_box(1) + "(assert (<= Y_3 1))", 5, "not declared"),
    (declare(1, 1) + unit_box(1) + "(assert (<= Y_0 1)", 5, "never closed"),
    (declare(1, 1) + unit_box(1) + "(assert (<= Y_0 1)))", 5, "unbalanced"),
    ("(declare-const X_0 Int)", 1, "Real"),
    ("(declare-const Z_0 Real)", 1, "X_<i>"),
    (declare(1, 1) + unit_box(1) + "(push 1)", 5, "unsupported command"),
    ("(declare-const X_1 Real)\n(declare-const Y_0 Real)", 1, "X_0 is missing"),
])
def test_errors_name_the_line_and_the_problem(text, line, words):
    with pytest.raises(SpecError) as info:
        parse_property(text, "p.vnnlib")
    assert f"p.vnnlib:{line}:" in str(info.value) and words in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_property(tmp_path / "absent.vnnlib")


def test_comments_and_ignored_commands(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text("; a comment (with parentheses\n" + declare(1, 1) + unit_box(1) +
                    "(assert (<= Y_0 0)) ; trailing\n(check-sat)\n")
    assert load_property(path).unsafe[0].satisfied_by([0.0])


def test_a_300_kb_file_parses_into_its_box(tmp_path):
    """A CIFAR-sized property (3,072 inputs, comments between assertions, a 9-way disjunction); how fast it
    parses is a benchmark's question, not a test's (a timed assertion fails on a loaded machine)."""
    n_x = 3072
    rng = np.random.default_rng(0)
    lines = [declare(n_x, 10)]
    values = rng.random(n_x)
    for i, value in enumerate(values):
        lines.append(f"; pixel {i}\n(assert (<= X_{i} {value + 0.0313725490196:.17f}))\n"
                     f"(assert (>= X_{i} {value - 0.0313725490196:.17f}))\n")
    lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_3))" for j in range(10) if j != 3) + "))")
    path = tmp_path / "big.vnnlib"
    path.write_text("".join(lines))
    assert path.stat().st_size > 300_000
    prop = load_property(path)
    assert prop.n_inputs == n_x and len(prop.unsafe) == 9
    [(lower, upper)] = prop.input_boxes
    assert np.allclose(lower, values - 0.0313725490196) and np.allclose(upper, values + 0.0313725490196)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared VNN-COMP benchmarks are not present")
def test_every_shared_property_parses():
    for path in sorted(SHARED.glob("*/*.vnnlib")):
        prop = load_property(path)
        assert prop.cases and all(np.all(lo <= hi) for lo, hi in prop.input_boxes)
    prop6 = load_property(SHARED / "acasxu" / "prop_6.vnnlib")
    assert len(prop6.input_boxes) == 2 and len(prop6.unsafe) == 4 and len(prop6.cases) == 8
    mnist = load_property(SHARED / "mnistfc" / "prop_0_0.03.vnnlib")
    assert mnist.n_inputs == 784 and len(mnist.unsafe) == 9
