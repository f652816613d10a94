"""ONNX's recurrent layers (LSTM, GRU, RNN) written out step by step over their static sequence length.

The equations are the ONNX spec's (gate orders: LSTM i, o, f, c; GRU z, r, h; peepholes i, o, f). The cell
works batch first: each step's input is picked from X by a MatMul with a one-hot column (a linear map every
bound pass handles exactly), each gate has its own weight matrix (constants fold when W, R, B are
initializers), and Y/Y_h/Y_c are assembled batch first and transposed to the layout the node declares.
A missing initial state, or one that is zero (a constant, or a zero constant expanded to the state's shape),
starts the recurrence without the terms it would multiply, so the unrolled graph holds at any batch size.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .unroll import Emitter, Refused, _attr

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# Lower-case activation name -> (its ONNX op or None when written out, [default alpha], [default beta]): the
# attribute lists activation_alpha/activation_beta are consumed in order by the activations that take them.
ACTIVATIONS = {
    "relu": ("Relu", [], []), "tanh": ("Tanh", [], []), "sigmoid": ("Sigmoid", [], []),
    "softsign": ("Softsign", [], []), "softplus": ("Softplus", [], []),
    "leakyrelu": ("LeakyRelu", [0.01], []), "thresholdedrelu": ("ThresholdedRelu", [1.0], []),
    "elu": ("Elu", [1.0], []), "hardsigmoid": ("HardSigmoid", [0.2], [0.5]),
    "affine": (None, [1.0], [0.0]), "scaledtanh": (None, [1.0], [1.0]),
}


def unroll_recurrent(emit: Emitter, node: ir.Node) -> list[ir.Value | None]:
    """Values replacing the node's outputs (Y, Y_h[, Y_c]); None for outputs nobody reads."""
    cell = _Cell(emit, node)
    return cell.outputs()


def _input(node: ir.Node, k: int) -> ir.Value | None:
    return node.inputs[k] if len(node.inputs) > k else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Cell:
    def __init__(self, emit: Emitter, node: ir.Node):
        self.emit, self.node, self.op = emit, node, node.op_type
        self.gates = GATES[self.op]
        x, w = node.inputs[0], node.inputs[1]
        self.layout = _attr(node, "layout", 0)
        direction = _text(_attr(node, "direction", "forward"))
        if direction not in ("forward", "reverse", "bidirectional"):
            raise Refused(f"unknown direction {direction!r}")
        self.reversed = [direction == "reverse"] if direction != "bidirectional" else [False, True]
        if x.shape is None or len(x.shape) != 3 or not isinstance(x.shape[1 if self.layout else 0], int):
            raise Refused("the sequence length of its input X is not static")
        self.length = x.shape[1 if self.layout else 0]
        if self.length == 0:
            raise Refused("its sequence is empty")
        self.hidden = _attr(node, "hidden_size")
        if self.hidden is None:
            if w.shape is None or not isinstance(w.shape[1], int):
                raise Refused("hidden_size is not given and W's shape is not static")
            self.hidden = w.shape[1] // self.gates
        self.dtype = x.dtype.numpy() if x.dtype is not None else np.float32
        self.clip = _attr(node, "clip")
        self.activations = self._activations(len(self.reversed))
        self.lengths = None  # per batch element, when some is shorter than the sequence
        if _input(node, 4) is not None:
            given = np.asarray(emit.constant_value(_input(node, 4), "sequence_lens")).reshape(-1).astype(np.int64)
            batch = x.shape[0 if self.layout else 1]
            if np.any(given < 0) or np.any(given > self.length) or not given.any() or \
                    (isinstance(batch, int) and batch != given.size):
                raise Refused(f"sequence_lens {given.tolist()} do not fit a sequence of {self.length} and batch {batch}")
            if np.any(given != self.length):
                self.lengths = given

    # ---- attributes ----

    def _activations(self, directions: int) -> list[list[tuple]]:
        per = len(DEFAULT_ACTIVATIONS[self.op])
        names = [_text(a) for a in (_attr(self.node, "activations") or [])] or \
            DEFAULT_ACTIVATIONS[self.op] * directions
        if len(names) == per and directions == 2:
            names = names * 2
        if len(names) != per * directions:
            raise Refused(f"{len(names)} activations given, {per * directions} expected")
        alphas = list(_attr(self.node, "activation_alpha") or [])
        betas = list(_attr(self.node, "activation_beta") or [])
        specs = []
        for name in names:
            key = name.lower()
            if key not in ACTIVATIONS:
                raise Refused(f"activation {name!r} is not an ONNX recurrent activation")
            op, alpha, beta = ACTIVATIONS[key]
            alpha = [alphas.pop(0) if alphas else a for a in alpha]
            beta = [betas.pop(0) if betas else b for b in beta]
            specs.append((key, op, alpha, beta))
        return [specs[d * per:(d + 1) * per] for d in range(directions)]

    # ---- small builders ----

    def scalar(self, v: float) -> ir.Value:
        return self.emit.const(np.asarray(v, self.dtype))

    def act(self, spec: tuple, x: ir.Value) -> ir.Value:
        key, op, alpha, beta = spec
        e = self.emit
        if self.clip is not None:
            c = float(self.clip)
            x = e.op("Clip", x, self.scalar(-c), self.scalar(c)) if e.opset >= 11 else \
                e.op("Clip", x, min=-c, max=c)
        if key == "affine":
            return e.op("Add", e.op("Mul", x, self.scalar(alpha[0])), self.scalar(beta[0]))
        if key == "scaledtanh":
            return e.op("Mul", e.op("Tanh", e.op("Mul", x, self.scalar(beta[0]))), self.scalar(alpha[0]))
        attrs = {"alpha": float(alpha[0])} if alpha else {}
        if beta:
            attrs["beta"] = float(beta[0])
        return e.op(op, x, **attrs)

    def add(self, *terms: ir.Value | None) -> ir.Value:
        present = [t for t in terms if t is not None]
        total = present[0]
        for t in present[1:]:
            total = self.emit.op("Add", total, t)
        return total

    def mul(self, a: ir.Value | None, b: ir.Value | None) -> ir.Value | None:
        return None if a is None or b is None else self.emit.op("Mul", a, b)

    def rows(self, matrix: ir.Value, start: int, count: int) -> ir.Value:
        return self.emit.op("Gather", matrix, self.emit.ints(np.arange(start, start + count)), axis=0)

    def state(self, value: ir.Value | None, d: int) -> ir.Value | None:
        """Direction d's initial state [batch, hidden], or None when it is absent or zero."""
        if value is None or _is_zero(self.emit, value):
            return None
        return self.emit.pick(value, d, 1 if self.layout else 0)

    # ---- the unrolled computation ----

    def outputs(self) -> list[ir.Value | None]:
        e, node, h = self.emit, self.node, self.hidden
        x = node.inputs[0]
        # [batch, input, sequence]: step t is the MatMul with the one-hot column e_t
        across = e.op("Transpose", x, perm=[0, 2, 1] if self.layout else [1, 2, 0])
        steps = []
        for t in range(self.length):
            column = np.zeros((self.length, 1), self.dtype)
            column[t, 0] = 1
            steps.append(e.squeeze(e.op("MatMul", across, e.const(column)), [2]))
        hs, finals_h, finals_c = [], [], []
        for d, backwards in enumerate(self.reversed):
            w, r = e.pick(node.inputs[1], d, 0), e.pick(node.inputs[2], d, 0)
            b = _input(node, 3)
            bias = e.pick(b, d, 0) if b is not None else None
            gw = [e.op("Transpose", self.rows(w, k * h, h), perm=[1, 0]) for k in range(self.gates)]
            gr = [e.op("Transpose", self.rows(r, k * h, h), perm=[1, 0]) for k in range(self.gates)]
            wb = [self.rows(bias, k * h, h) if bias is not None else None for k in range(self.gates)]
            rb = [self.rows(bias, (self.gates + k) * h, h) if bias is not None else None for k in range(self.gates)]
            both = [self.add(wb[k], rb[k]) if bias is not None else None for k in range(self.gates)]  # folded once
            hidden, cell = self.state(_input(node, 5), d), self.state(_input(node, 6), d)
            peep = _input(node, 7) if self.op == "LSTM" else None
            peep = e.pick(peep, d, 0) if peep is not None else None
            p = [self.rows(peep, k * h, h) for k in range(3)] if peep is not None else [None] * 3
            per_step_h = [None] * self.length
            if self.lengths is None:
                for t in (reversed(range(self.length)) if backwards else range(self.length)):
                    hidden, cell = _Step(self, d, steps[t], gw, gr, wb, rb, p, both).run(hidden, cell)
                    per_step_h[t] = hidden
            else:
                hidden, cell, per_step_h = self._masked(d, backwards, across, steps, (gw, gr, wb, rb, p, both), hidden, cell)
            hs.append(per_step_h)
            finals_h.append(hidden)
            finals_c.append(cell)
        used = [len(node.outputs) > k and (node.outputs[k].uses() or node.outputs[k] in e.graph.outputs)
                for k in range(3)]
        y = self._sequence(hs) if used[0] else None
        y_h = self._final(finals_h) if used[1] else None
        y_c = self._final(finals_c) if used[2] and self.op == "LSTM" else None
        return [y, y_h, y_c][:len(node.outputs)]

    def _masked(self, d: int, backwards: bool, across: ir.Value, steps: list[ir.Value], weights: tuple,
                hidden: ir.Value | None, cell: ir.Value | None):
        """The recurrence when batch element b stops after lengths[b] steps: step k reads position k (forward)
        or lengths[b] - 1 - k (reverse) of each element, a finished element keeps its state, and Y is zero at
        the positions an element does not reach. Masks and per-element picks are constants (exact linear maps)."""
        e, lengths, n = self.emit, self.lengths, self.length
        outputs = []  # (positions per element, -1 where finished; the step's masked hidden state)
        for k in range(n):
            live = k < lengths
            if not live.any():
                break
            positions = np.where(live, lengths - 1 - k, -1) if backwards else np.where(live, k, -1)
            if backwards:  # a different position per element: a batched MatMul with one-hot columns
                columns = np.zeros((lengths.size, n, 1), self.dtype)
                columns[np.flatnonzero(live), positions[live], 0] = 1
                x = e.squeeze(e.op("MatMul", across, e.const(columns)), [2])
            else:
                x = steps[k]
            new_h, new_c = _Step(self, d, x, *weights).run(hidden, cell)
            mask = e.const(live.astype(self.dtype)[:, None])
            hidden, cell = self._blend(live, mask, new_h, hidden), self._blend(live, mask, new_c, cell)
            outputs.append((positions, new_h if live.all() else e.op("Mul", new_h, mask)))
        sequence = []
        for position in range(n):
            terms = []
            for positions, value in outputs:
                hit = positions == position
                if hit.all():
                    terms.append(value)
                elif hit.any():
                    terms.append(e.op("Mul", value, e.const(hit.astype(self.dtype)[:, None])))
            sequence.append(self.add(*terms) if terms else
                            e.op("Mul", outputs[0][1], self.scalar(0.0)))  # no element reaches it: zeros
        return hidden, cell, sequence

    def _blend(self, live: np.ndarray, mask: ir.Value, new: ir.Value | None, old: ir.Value | None):
        """new where the element is still running, old where it has finished."""
        if new is None or live.all():
            return new
        kept = None if old is None else self.emit.op("Mul", old, self.emit.const((~live).astype(self.dtype)[:, None]))
        return self.add(self.emit.op("Mul", new, mask), kept)

    def _sequence(self, per_direction: list[list[ir.Value]]) -> ir.Value:
        e = self.emit
        directions = [e.stack(steps, 1) for steps in per_direction]          # [batch, seq, hidden]
        y = e.stack(directions, 2)                                            # [batch, seq, dirs, hidden]
        return y if self.layout else self._relaid(y, [1, 2, 0, 3])           # [seq, dirs, batch, hidden]

    def _final(self, per_direction: list[ir.Value]) -> ir.Value:
        e = self.emit
        y = e.stack(per_direction, 1)                                         # [batch, dirs, hidden]
        return y if self.layout else self._relaid(y, [1, 0, 2])              # [dirs, batch, hidden]

    def _relaid(self, y: ir.Value, perm: list[int]) -> ir.Value:
        out = self.emit.op("Transpose", y, perm=perm)
        self.emit.layouts.append(out.producer())
        return out


class _Step:
    """One time step of one direction: the gate pre-activations and the new hidden (and cell) state."""

    def __init__(self, cell: _Cell, d: int, x: ir.Value, gw, gr, wb, rb, peep, both):
        self.c, self.d, self.x, self.gw, self.gr, self.wb, self.rb, self.peep = cell, d, x, gw, gr, wb, rb, peep
        self.both = both  # Wb + Rb per gate
        self.e = cell.emit

    def input_part(self, k: int) -> ir.Value:
        return self.e.op("MatMul", self.x, self.gw[k])

    def recurrent_part(self, k: int, hidden: ir.Value | None) -> ir.Value | None:
        return None if hidden is None else self.e.op("MatMul", hidden, self.gr[k])

    def run(self, hidden, cell):
        return getattr(self, self.c.op.lower())(hidden, cell)

    def rnn(self, hidden, cell):
        f, = self.c.activations[self.d]
        pre = self.c.add(self.input_part(0), self.recurrent_part(0, hidden), self.both[0])
        return self.c.act(f, pre), None

    def gru(self, hidden, cell):
        c, e = self.c, self.e
        f, g = c.activations[self.d]
        z = c.act(f, c.add(self.input_part(0), self.recurrent_part(0, hidden), self.both[0]))
        r = c.act(f, c.add(self.input_part(1), self.recurrent_part(1, hidden), self.both[1]))
        if _attr(c.node, "linear_before_reset", 0):
            inner = c.add(self.recurrent_part(2, hidden), self.rb[2]) if hidden is not None or self.rb[2] is not None \
                else None
            candidate = c.add(self.input_part(2), self.wb[2], c.mul(r, inner))
        else:
            candidate = c.add(self.input_part(2), self.recurrent_part(2, c.mul(r, hidden)), self.both[2])
        candidate = c.act(g, candidate)
        keep = e.op("Sub", c.scalar(1.0), z)
        return c.add(e.op("Mul", keep, candidate), c.mul(z, hidden)), None

    def lstm(self, hidden, cell):
        c, e = self.c, self.e
        f, g, h = c.activations[self.d]
        p_i, p_o, p_f = self.peep
        # gate order i, o, f, c
        pre = [c.add(self.input_part(k), self.recurrent_part(k, hidden), self.both[k]) for k in range(4)]
        i = c.act(f, c.add(pre[0], c.mul(p_i, cell)))
        if _attr(c.node, "input_forget", 0):  # the forget gate coupled to the input gate
            forget = e.op("Sub", c.scalar(1.0), i)
        else:
            forget = c.act(f, c.add(pre[2], c.mul(p_f, cell)))
        candidate = c.act(g, pre[3])
        cell = c.add(c.mul(forget, cell), e.op("Mul", i, candidate))
        o = c.act(f, c.add(pre[1], c.mul(p_o, cell)))
        return e.op("Mul", o, c.act(h, cell) if c.clip is None else _unclipped(c, h, cell)), cell


def _unclipped(cell: _Cell, spec: tuple, x: ir.Value) -> ir.Value:
    """h(C) without the clip: the cell clip bounds the gates' pre-activations, not the cell state."""
    clip, cell.clip = cell.clip, None
    try:
        return cell.act(spec, x)
    finally:
        cell.clip = clip


def _is_zero(emit: Emitter, value: ir.Value) -> bool:
    """A zero tensor: a zero constant, or a zero constant expanded (Expand, ConstantOfShape) to some shape."""
    def zero_constant(v: ir.Value | None) -> bool:
        if v is None:
            return False
        try:
            return not np.any(emit.constant_value(v, "the initial state"))
        except Refused:
            return False
    producer = value.producer()
    if zero_constant(value):
        return True
    if producer is not None and producer.op_type == "Expand":
        return zero_constant(producer.inputs[0])
    if producer is not None and producer.op_type == "ConstantOfShape":
        fill = producer.attributes.get("value")
        return fill is None or not np.any(fill.value.numpy())
    return False
