"""VNN-LIB properties: the subset real benchmarks use, read into input boxes and unsafe output conjuncts.

A property file declares inputs `X_i` (the flattened model input, C order) and outputs `Y_j` (the
flattened output) and asserts linear constraints combined with `and`/`or`. The assertions describe the
*unsafe* set: the property is violated when some input satisfying the input constraints produces an output
satisfying the output constraints. The formula is brought into disjunctive normal form; each term is an
input box and a conjunct of output rows `C y <= d`. Constraints that mix inputs and outputs, or that do not
bound every input, are rejected with the line number.
"""
from __future__ import annotations

import bisect
import itertools
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import SpecError

_TOKEN = re.compile(r";[^\n]*|\(|\)|[^\s();]+")
_VARIABLE = re.compile(r"([XY])_(\d+)$")
_COMPARISONS = {"<=", ">=", "<", ">", "="}
_IGNORED_COMMANDS = {"check-sat", "get-model", "exit", "set-logic", "set-info", "set-option"}
# A product of disjunctions larger than this is not a property a verifier can work through case by case.
MAX_TERMS = 100_000


@dataclass
class Conjunct:
    """Output rows `matrix · y <= bound`; satisfied by y when every row is."""
    matrix: np.ndarray       # [k, n_y] float64
    bound: np.ndarray        # [k] float64

    def satisfied_by(self, y: np.ndarray) -> bool:
        return bool(np.all(self.matrix @ np.asarray(y, dtype=np.float64).reshape(-1) <= self.bound))


@dataclass
class Property:
    """The unsafe set: the union over `cases` (box index, conjunct index) of box × conjunct."""
    n_inputs: int
    n_outputs: int
    input_boxes: list[tuple[np.ndarray, np.ndarray]]
    unsafe: list[Conjunct]
    cases: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.cases:
            self.cases = list(itertools.product(range(len(self.input_boxes)), range(len(self.unsafe))))

    @property
    def conjunct_rows(self) -> list[np.ndarray]:
        """For each conjunct, the indices of its rows in `stacked_rows()`."""
        starts = np.cumsum([0] + [len(c.bound) for c in self.unsafe])
        return [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]

    def root_boxes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lower, upper) [boxes, n] of the input boxes and alive [boxes, conjuncts]: the cases to refute."""
        lower = np.stack([lo for lo, _ in self.input_boxes])
        upper = np.stack([hi for _, hi in self.input_boxes])
        alive = np.zeros((len(lower), len(self.unsafe)), dtype=bool)
        for box, conjunct in self.cases:
            alive[box, conjunct] = True
        return lower, upper, alive

    def stacked_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(C_all [r, n_y], offset_all [r]) with margins C_all·y + offset_all; a conjunct holds iff its margins <= 0."""
        if not self.unsafe:
            return np.zeros((0, self.n_outputs)), np.zeros(0)
        matrix = np.concatenate([c.matrix for c in self.unsafe], axis=0)
        offset = -np.concatenate([c.bound for c in self.unsafe])
        return matrix, offset

    def rows_with_mixtures(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """`stacked_rows()` plus one row per conjunct of several rows: the average of its rows.

        An average of margins is at most their maximum, so a positive lower bound on it refutes the conjunct
        too, and linear relaxations of the average can be positive where no single row's is (alpha-CROWN
        learns the weights instead, see `graphcert.alpha`). Returns (matrix, offset, the row indices of each
        conjunct including its average, the member rows of each average in the order they were appended).
        """
        matrix, offset = self.stacked_rows()
        conjuncts, mixtures = [list(rows) for rows in self.conjunct_rows], []
        extra_rows, extra_offsets = [], []
        for k, rows in enumerate(self.conjunct_rows):
            if len(rows) < 2:
                continue
            conjuncts[k].append(len(offset) + len(mixtures))
            mixtures.append(rows)
            extra_rows.append(matrix[rows].mean(axis=0))
            extra_offsets.append(offset[rows].mean())
        if mixtures:
            matrix = np.concatenate([matrix, np.stack(extra_rows)])
            offset = np.concatenate([offset, extra_offsets])
        return matrix, offset, [np.array(rows, dtype=np.int64) for rows in conjuncts], mixtures

    def is_counterexample(self, x: np.ndarray, y: np.ndarray) -> bool:
        """True when x lies in a box and y satisfies a conjunct of the same case (exact, in float64)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        for box_index, conjunct_index in self.cases:
            lower, upper = self.input_boxes[box_index]
            if np.all(lower <= x) and np.all(x <= upper) and self.unsafe[conjunct_index].satisfied_by(y):
                return True
        return False


@dataclass
class _Linear:
    """A linear term: coefficients by variable name plus a constant."""
    coefficients: dict[str, float]
    constant: float = 0.0

    def scaled(self, factor: float) -> "_Linear":
        return _Linear({k: v * factor for k, v in self.coefficients.items()}, self.constant * factor)

    def plus(self, other: "_Linear") -> "_Linear":
        merged = dict(self.coefficients)
        for k, v in other.coefficients.items():
            merged[k] = merged.get(k, 0.0) + v
        return _Linear(merged, self.constant + other.constant)


@dataclass
class _Atom:
    """`coefficients · v <= bound` (or `==` when `equality`), and the offset of its text in the file."""
    coefficients: dict[str, float]
    bound: float
    equality: bool
    offset: int


class _Source:
    def __init__(self, text: str, path: str):
        self.text = text
        self.path = path
        self._newlines = None

    def line(self, offset: int) -> int:
        if self._newlines is None:
            self._newlines = [m.start() for m in re.finditer("\n", self.text)]
        return bisect.bisect_right(self._newlines, offset - 1) + 1

    def error(self, offset: int, message: str) -> SpecError:
        return SpecError(f"{self.path}:{self.line(offset)}: {message}")


def load_property(path: str | os.PathLike) -> Property:
    """Read a VNN-LIB file; SpecError (with the line) if it is missing, malformed or unsupported."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SpecError(f"property file not found: {path}; check the path")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read {path} as text ({type(exc).__name__})") from None
    return parse_property(text, path)


def parse_property(text: str, path: str = "<string>") -> Property:
    source = _Source(text, path)
    declared: dict[str, int] = {}
    common: list[_Atom | bool] = []
    disjunctions: list[list[list[_Atom | bool]]] = []
    for form in _read_forms(source):
        offset, items = form
        head = items[0] if items else None
        if head == "declare-const":
            _declare(source, form, declared)
        elif head == "assert":
            if len(items) != 2:
                raise source.error(offset, "assert takes exactly one formula")
            terms = _dnf(source, items[1], offset, declared)
            if len(terms) == 1:
                common.extend(terms[0])
            else:
                disjunctions.append(terms)
        elif head in _IGNORED_COMMANDS:
            continue
        else:
            raise source.error(offset, f"unsupported command {_show(head)}; expected declare-const or assert")
    return _build(source, declared, common, disjunctions)


def _read_forms(source: _Source) -> list[tuple[int, list]]:
    """Top-level S-expressions as (offset, items) with nested lists in the same shape; atoms are strings."""
    forms = []
    stack: list[tuple[int, list]] = []
    for match in _TOKEN.finditer(source.text):
        token = match.group()
        if token == "(":
            stack.append((match.start(), []))
        elif token == ")":
            if not stack:
                raise source.error(match.start(), "unbalanced ')'")
            done = stack.pop()
            (stack[-1][1] if stack else forms).append(done)
        elif token[0] == ";":
            continue
        elif not stack:
            raise source.error(match.start(), f"unexpected {_show(token)} outside parentheses")
        else:
            stack[-1][1].append(token)
    if stack:
        raise source.error(stack[-1][0], "'(' is never closed")
    return forms


def _show(item) -> str:
    return repr(item) if isinstance(item, str) else "a parenthesised expression"


def _declare(source: _Source, form, declared: dict[str, int]) -> None:
    offset, items = form
    if len(items) != 3 or not isinstance(items[1], str) or items[2] != "Real":
        raise source.error(offset, "expected (declare-const X_i Real) or (declare-const Y_j Real)")
    if not _VARIABLE.match(items[1]):
        raise source.error(offset, f"variable {items[1]!r} is not named X_<i> (input) or Y_<j> (output)")
    if items[1] in declared:
        raise source.error(offset, f"variable {items[1]} is declared twice")
    declared[items[1]] = offset


def _dnf(source: _Source, formula, parent_offset: int, declared) -> list[list[_Atom | bool]]:
    """The formula as a list of terms (a disjunction), each a list of atoms (a conjunction)."""
    if isinstance(formula, str):
        raise source.error(parent_offset, f"expected a constraint, found {formula!r}")
    offset, items = formula
    head = items[0] if items else None
    if head == "and":
        terms = [[]]
        for part in items[1:]:
            terms = [a + b for a, b in itertools.product(terms, _dnf(source, part, offset, declared))]
            if len(terms) > MAX_TERMS:
                raise source.error(offset, f"the formula expands to more than {MAX_TERMS} cases")
        return terms
    if head == "or":
        if len(items) < 2:
            raise source.error(offset, "'or' needs at least one operand")
        return [term for part in items[1:] for term in _dnf(source, part, offset, declared)]
    if head in _COMPARISONS:
        return [[_atom(source, formula, declared)]]
    raise source.error(offset, f"unsupported formula {_show(head)}; expected and, or, <=, >=, <, >, =")


def _atom(source: _Source, formula, declared) -> _Atom | bool:
    offset, items = formula
    if len(items) != 3:
        raise source.error(offset, f"'{items[0]}' takes two operands")
    left, right = _linear(source, items[1], offset, declared), _linear(source, items[2], offset, declared)
    # Strict and non-strict comparisons give the same closed set: the unsafe set only grows, proofs stay sound.
    difference = left.plus(right.scaled(-1.0)) if items[0] in ("<=", "<", "=") else right.plus(left.scaled(-1.0))
    coefficients = {k: v for k, v in difference.coefficients.items() if v != 0.0}
    bound = -difference.constant
    if not coefficients:
        return bool(0.0 == bound) if items[0] == "=" else bool(0.0 <= bound)
    kinds = {name[0] for name in coefficients}
    if len(kinds) > 1:
        raise source.error(offset, "a constraint mixes inputs X and outputs Y; only separate input and "
                                   "output constraints are supported")
    return _Atom(coefficients, bound, items[0] == "=", offset)


def _linear(source: _Source, term, offset: int, declared) -> _Linear:
    if isinstance(term, str):
        if term in declared:
            return _Linear({term: 1.0})
        try:
            return _Linear({}, float(term))
        except ValueError:
            pass
        if _VARIABLE.match(term):
            raise source.error(offset, f"variable {term} is used but not declared")
        raise source.error(offset, f"unknown symbol {term!r}")
    inner_offset, items = term
    head, operands = (items[0], items[1:]) if items else (None, [])
    parts = [_linear(source, t, inner_offset, declared) for t in operands]
    if head == "+" and parts:
        total = parts[0]
        for part in parts[1:]:
            total = total.plus(part)
        return total
    if head == "-" and parts:
        if len(parts) == 1:
            return parts[0].scaled(-1.0)
        total = parts[0]
        for part in parts[1:]:
            total = total.plus(part.scaled(-1.0))
        return total
    if head == "*" and parts:
        variable_parts = [p for p in parts if p.coefficients]
        if len(variable_parts) > 1:
            raise source.error(inner_offset, "a product of variables is not linear")
        factor = float(np.prod([p.constant for p in parts if not p.coefficients]))
        return (variable_parts[0] if variable_parts else _Linear({}, 1.0)).scaled(factor)
    if head == "/" and len(parts) == 2 and not parts[1].coefficients and parts[1].constant != 0.0:
        return parts[0].scaled(1.0 / parts[1].constant)
    raise source.error(inner_offset, f"unsupported term {_show(head)}; expected a number, a variable, +, -, * or /")


def _indexed(source: _Source, declared: dict[str, int], kind: str) -> int:
    indices = sorted(int(name[2:]) for name in declared if name[0] == kind)
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise source.error(0, f"{kind} variables must be numbered from 0 without gaps; {kind}_{missing[0]} is missing")
    return len(indices)


def _build(source: _Source, declared, common, disjunctions) -> Property:
    n_inputs, n_outputs = _indexed(source, declared, "X"), _indexed(source, declared, "Y")
    if n_inputs == 0:
        raise source.error(0, "no input variables X_i are declared")
    if n_outputs == 0:
        raise source.error(0, "no output variables Y_j are declared")
    product = 1
    for terms in disjunctions:
        product *= len(terms)
        if product > MAX_TERMS:
            raise source.error(0, f"the disjunctions expand to more than {MAX_TERMS} cases")
    boxes: dict[tuple[bytes, bytes], int] = {}
    conjuncts: dict[tuple, int] = {}
    cases: dict[tuple[int, int], None] = {}
    base = _Box(n_inputs)
    base_rows: list[tuple] = []
    if not _add_atoms(source, common, base, base_rows):
        return _empty_property(n_inputs, n_outputs)
    for choice in itertools.product(*disjunctions):
        box, rows = base.copy(), list(base_rows)
        if not _add_atoms(source, [a for term in choice for a in term], box, rows):
            continue
        if np.any(box.lower > box.upper):
            continue
        box.check_bounded(source, declared)
        box_key = (box.lower.tobytes(), box.upper.tobytes())
        box_index = boxes.setdefault(box_key, len(boxes))
        rows_key = tuple(sorted(set(rows)))
        conjunct_index = conjuncts.setdefault(rows_key, len(conjuncts))
        cases[(box_index, conjunct_index)] = None
    input_boxes = [(np.frombuffer(lo).copy(), np.frombuffer(hi).copy()) for lo, hi in boxes]
    unsafe = [_conjunct(rows, n_outputs) for rows in conjuncts]
    if not cases:
        return _empty_property(n_inputs, n_outputs)
    return Property(n_inputs, n_outputs, input_boxes, unsafe, list(cases))


def _empty_property(n_inputs: int, n_outputs: int) -> Property:
    """No input reaches the unsafe set because the set itself is empty (contradictory assertions)."""
    return Property(n_inputs, n_outputs, [], [], [])


class _Box:
    def __init__(self, n: int):
        self.lower = np.full(n, -np.inf)
        self.upper = np.full(n, np.inf)

    def copy(self) -> "_Box":
        box = _Box(0)
        box.lower, box.upper = self.lower.copy(), self.upper.copy()
        return box

    def add(self, source: _Source, atom: _Atom) -> None:
        if len(atom.coefficients) != 1:
            raise source.error(atom.offset, "an input constraint relates several inputs; only boxes "
                                            "(one input per constraint) are supported")
        (name, coefficient), = atom.coefficients.items()
        index, value = int(name[2:]), atom.bound / coefficient
        if atom.equality or coefficient > 0:
            self.upper[index] = min(self.upper[index], value)
        if atom.equality or coefficient < 0:
            self.lower[index] = max(self.lower[index], value)

    def check_bounded(self, source: _Source, declared) -> None:
        unbounded = np.flatnonzero(~np.isfinite(self.lower) | ~np.isfinite(self.upper))
        if len(unbounded):
            name = f"X_{unbounded[0]}"
            raise source.error(declared[name], f"input {name} has no {'lower' if np.isinf(self.lower[unbounded[0]]) else 'upper'} "
                                               f"bound; every input must lie in a bounded box")


def _add_atoms(source: _Source, atoms, box: _Box, rows: list) -> bool:
    """Add atoms to a box and output rows; False when a constant atom is false (the term is empty)."""
    for atom in atoms:
        if atom is True:
            continue
        if atom is False:
            return False
        if next(iter(atom.coefficients))[0] == "X":
            box.add(source, atom)
            continue
        row = tuple(sorted((int(k[2:]), v) for k, v in atom.coefficients.items()))
        rows.append((row, atom.bound))
        if atom.equality:
            rows.append((tuple((j, -v) for j, v in row), -atom.bound))
    return True


def _conjunct(rows: tuple, n_outputs: int) -> Conjunct:
    matrix = np.zeros((len(rows), n_outputs))
    bound = np.zeros(len(rows))
    for r, (row, value) in enumerate(rows):
        for j, coefficient in row:
            matrix[r, j] = coefficient
        bound[r] = value
    return Conjunct(matrix, bound)
