"""Facts about ONNX ops that every pass and the torch executor share, each implemented once and tested once
against onnxruntime (tests/test_ops.py).

- The sliding-window geometry of Conv, ConvTranspose's forward view, and the pools (explicit pads,
  SAME_UPPER/SAME_LOWER/VALID, dilations, ceil mode). Three copies of this arithmetic once treated the ceil-mode
  overhang differently; a pass that reads the wrong window is unsound, so there is one.
- Element-wise op families (JAX's `defjvp`-style registration): `def_elementwise("Op", torch=..., monotone=...,
  lipschitz=...)` states an op's facts once, and every pass that bounds a family (IBP's monotone rule, the
  Lipschitz pass's slope rule, the torch executor's kernels; CROWN through its IBP fallback) picks it up through
  `on_elementwise`. Adding such an op is that one call plus its test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def _attribute(node, name: str, default):
    attribute = node.attributes.get(name)
    if attribute is None:
        return default
    value = attribute.value
    if isinstance(value, bytes):
        value = value.decode()
    return list(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class WindowGeometry:
    """Where each output window of a sliding-window op reads its input, on one input spatial size.

    begin/end are the explicit (or auto_pad-resolved) pads of each spatial axis; `out` is the number of windows
    per axis exactly as ONNX (and onnxruntime) computes it, including ceil mode, where a last window may not
    start in the end padding; `overhang` is how far the last ceil-mode window reaches beyond the end padding.
    """
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    ceil_mode: bool = False
    # Count a ceil-mode window that starts in the end padding as well (runtimes have differed on it): for passes
    # that only need an upper bound on the windows, where an extra row never lowers a bound.
    count_padding_starts: bool = False

    @classmethod
    def of(cls, node, spatial, kernel=None) -> "WindowGeometry":
        """The geometry of `node` (Conv, ConvTranspose, MaxPool, AveragePool, LpPool, ...) on an input of spatial
        size `spatial`; `kernel` defaults to the node's kernel_shape (give the weight's for Conv)."""
        spatial = tuple(int(s) for s in spatial)
        rank = len(spatial)
        kernel = tuple(int(k) for k in (kernel if kernel is not None else _attribute(node, "kernel_shape", ())))
        if len(kernel) != rank:
            raise ValueError(f"{node.op_type} {node.name}: kernel {kernel} does not fit spatial size {spatial}")
        strides = tuple(_attribute(node, "strides", None) or (1,) * rank)
        dilations = tuple(_attribute(node, "dilations", None) or (1,) * rank)
        auto_pad = _attribute(node, "auto_pad", "NOTSET") or "NOTSET"
        if auto_pad == "VALID":
            begin, end = (0,) * rank, (0,) * rank
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            totals = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                      for n, k, s, d in zip(spatial, kernel, strides, dilations)]
            small = tuple(t // 2 for t in totals)
            large = tuple(t - t // 2 for t in totals)
            begin, end = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
        else:
            pads = tuple(_attribute(node, "pads", None) or (0,) * (2 * rank))
            begin, end = pads[:rank], pads[rank:]
        return cls(spatial, kernel, strides, dilations, tuple(begin), tuple(end),
                   bool(_attribute(node, "ceil_mode", 0)))

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def extents(self) -> tuple[int, ...]:
        """How far one window reaches: (kernel - 1) * dilation + 1."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))

    @property
    def fits(self) -> bool:
        """Whether every window fits in the padded input. Where one does not, runtimes disagree on the output
        size (onnxruntime truncates a negative span toward zero and slides one window; the spec floors it to
        none), so passes refuse such nodes rather than guess."""
        return all(n + b + e >= x for n, b, e, x in zip(self.spatial, self.begin, self.end, self.extents))

    @property
    def pads(self) -> list[int]:
        return [*self.begin, *self.end]

    def _count(self, axis: int, drop_padding_starts: bool) -> int:
        size, b, e, s = self.spatial[axis], self.begin[axis], self.end[axis], self.strides[axis]
        span = size + b + e - self.extents[axis]  # may be negative: a ceil-mode window may overhang the input
        count = (-(-span // s) if self.ceil_mode else span // s) + 1
        if self.ceil_mode and drop_padding_starts and (count - 1) * s >= size + b:
            count -= 1
        return max(count, 0)

    @property
    def out(self) -> list[int]:
        """Windows per axis, as ONNX defines the output shape (see count_padding_starts)."""
        return [self._count(axis, not self.count_padding_starts) for axis in range(self.rank)]

    @property
    def padded(self) -> list[int]:
        """The input size with its padding, per axis."""
        return [n + b + e for n, b, e in zip(self.spatial, self.begin, self.end)]

    def max_cover(self) -> int:
        """The most windows any single input element lies in (a product over axes of per-axis maxima)."""
        cover = 1
        for axis, size in enumerate(self.spatial):
            positions = self.taps(axis)
            inside = positions[(positions >= 0) & (positions < size)]
            cover *= int(np.bincount(inside, minlength=size).max()) if inside.size else 0
        return cover

    @property
    def overhang(self) -> list[int]:
        """How far the last window reaches past the end padding (ceil mode only; 0 otherwise)."""
        return [max(0, (n - 1) * s + x - (size + b + e)) if n else 0
                for n, s, x, size, b, e in zip(self.out, self.strides, self.extents, self.spatial, self.begin,
                                                self.end)]

    def taps(self, axis: int) -> np.ndarray:
        """[windows, kernel] input positions each window reads along `axis` (outside [0, size): padding)."""
        o = np.arange(self.out[axis])[:, None]
        k = np.arange(self.kernel[axis])[None, :]
        return o * self.strides[axis] - self.begin[axis] + k * self.dilations[axis]

    def attributes(self) -> dict:
        """Explicit attributes that reproduce this geometry (auto_pad resolved) for an op emitted in its place."""
        return {"strides": list(self.strides), "pads": self.pads, "dilations": list(self.dilations)}

    def output_padding(self, spatial_out) -> list[int]:
        """What the transposed op must add at the end to give back exactly the input size."""
        return [size - ((out - 1) * s + x - b - e)
                for size, out, s, x, b, e in zip(self.spatial, spatial_out, self.strides, self.extents, self.begin,
                                                 self.end)]


# ---- element-wise op families ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Elementwise:
    """An element-wise op of one tensor input.

    torch(node) -> f: the torch function for the executor (attributes read from the node once).
    monotone(node) -> bool: non-decreasing on the whole real line for this node's attributes (then the interval
    of f(x) over [l, u] is [f(l), f(u)]).
    lipschitz(node) -> float | None: a bound on |f'| everywhere (None: unbounded), for the L2 Lipschitz pass.
    """
    op_type: str
    torch: Callable
    monotone: Callable = lambda node: True
    lipschitz: Callable = lambda node: None


ELEMENTWISE: dict[str, Elementwise] = {}
_HANDLERS: list[Callable[[Elementwise], None]] = []


def def_elementwise(op_type: str, torch: Callable, monotone: Callable | bool = True,
                    lipschitz: Callable | float | None = None) -> Elementwise:
    """State an element-wise op's facts once; every pass registered with `on_elementwise` learns it."""
    spec = Elementwise(op_type, torch,
                       monotone if callable(monotone) else (lambda node, value=monotone: value),
                       lipschitz if callable(lipschitz) else (lambda node, value=lipschitz: value))
    ELEMENTWISE[op_type] = spec
    for handler in _HANDLERS:
        handler(spec)
    return spec


def on_elementwise(handler: Callable[[Elementwise], None]) -> None:
    """Call `handler` for every element-wise op stated so far and every one stated later (a pass's family rule
    registration: handlers should not replace a pass's own, tighter rule)."""
    _HANDLERS.append(handler)
    for spec in list(ELEMENTWISE.values()):
        handler(spec)


def forget_elementwise(op_type: str, tables: list[dict]) -> None:
    """Remove an op from the family and from the given rule tables (for tests that state an op afresh)."""
    ELEMENTWISE.pop(op_type, None)
    for table in tables:
        table.pop(op_type, None)
        getattr(table, "preconditions", {}).pop(op_type, None)


def _torch():
    import torch  # imported when a graph runs on the executor, not when the CLI parses arguments
    return torch


def _alpha(node, default: float) -> float:
    return float(_attribute(node, "alpha", default))


# Celu(x) = max(0, x) + min(0, alpha·(exp(x/alpha) − 1)): increasing with slope at most 1 when alpha > 0.
def_elementwise("Celu", torch=lambda node: (lambda x, a=_alpha(node, 1.0): _torch().nn.functional.celu(x, a)),
                monotone=lambda node: _alpha(node, 1.0) > 0,
                lipschitz=lambda node: 1.0 if _alpha(node, 1.0) > 0 else None)


def _shrink(node):
    lambd, bias = float(_attribute(node, "lambd", 0.5)), float(_attribute(node, "bias", 0.0))

    def shrink(x):
        torch = _torch()
        return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))
    return shrink


# Shrink(x) = x + bias below -lambd, x - bias above lambd, 0 between: non-decreasing when bias <= lambd (the jumps
# at ±lambd go up), continuous with slope at most 1 only when bias == lambd.
def_elementwise("Shrink", torch=_shrink,
                monotone=lambda node: float(_attribute(node, "bias", 0.0)) <= float(_attribute(node, "lambd", 0.5)),
                lipschitz=lambda node: 1.0 if float(_attribute(node, "bias", 0.0)) ==
                float(_attribute(node, "lambd", 0.5)) else None)


# ---- Resize as a linear map ------------------------------------------------------------------------------

def resize_matrix(node, extent: int, size: int | None, scale: float | None) -> np.ndarray:
    """The weights [out, in] by which a Resize node (its attributes: mode, coordinate map, cubic coefficient,
    exclude_outside, antialias) maps one axis of length `extent` to `size` outputs (or by `scale`), read off
    onnxruntime's own op on the rows of an identity matrix, so that they are the runtime's. RuntimeError where
    onnxruntime does not take the attributes."""
    import onnx
    from onnx import helper, numpy_helper

    from graphcert.runtime import Session
    attributes = {k: _attribute(node, k, None) for k in node.attributes if k != "axes"}
    if size is not None:
        parameter, inputs = numpy_helper.from_array(np.int64([extent, size]), "sizes"), ["x", "", "", "sizes"]
    else:
        parameter, inputs = numpy_helper.from_array(np.float32([1.0, scale]), "scales"), ["x", "", "scales"]
    graph = helper.make_graph([helper.make_node("Resize", inputs, ["y"], **attributes)], "probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [extent, extent])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [parameter])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    try:
        rows = Session(model, threads=1).run({"x": np.eye(extent, dtype=np.float32)})["y"]
    except Exception as exc:
        raise RuntimeError(str(exc).splitlines()[0]) from None
    return np.asarray(rows, dtype=np.float64).T
