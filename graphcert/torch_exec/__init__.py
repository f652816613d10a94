"""Running ONNX graphs with torch ops, so gradients flow through models and bound graphs alike.

`TorchGraph` turns an `onnx_ir.Model` (a normalised model or a bound graph) into an `nn.Module`. Float
initializers become parameters (or buffers), every node becomes a kernel from one table keyed by op type
(`KERNELS`, op type -> factory that parses the node's attributes once and returns the function to call),
and `forward` walks a precomputed plan. PGD attacks, alpha-CROWN and certified training run on it.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from graphcert.errors import GraphcertError, InputError, UnsupportedOpError
from graphcert.interpret import attr  # noqa: F401
from graphcert.torch_exec.core import KERNELS, Setup, _Unsupported  # noqa: F401
from graphcert.torch_exec import elementwise, layers, pooling, shapes, extra, quant, qlinear, qcontrib, sampled  # noqa: F401,E501  (register kernels)
from graphcert.torch_exec.shapes import constant_array  # noqa: F401
from graphcert.torch_exec.qcontrib import OTHER_DOMAINS

# ---- the module -----------------------------------------------------------------------------------------

class _Plan:
    """The steps computing some outputs: (kernel, input slots, output slots, slots to free, node label)."""

    def __init__(self, steps, needed_inputs):
        self.steps = steps
        self.needed_inputs = needed_inputs


class TorchGraph(nn.Module):
    """An ONNX graph as an nn.Module: `tg(feeds) -> {output name: tensor}`, differentiable throughout.

    ONNX FLOAT tensors (inputs, initializers, casts) become `dtype`, chosen here once: convert with a new
    TorchGraph rather than `.to(dtype)`. Feeds may be tensors (their autograd history is kept), arrays or
    numbers; one of a smaller rank than declared gains leading ones (a scalar epsilon broadcasts).
    """

    def __init__(self, model: ir.Model, trainable: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        graph = model.graph
        setup = Setup(model.opset_imports.get("", 17), dtype)
        nodes = _topological(graph)
        factories = _kernels(nodes, setup)
        self._slots: dict[int, int] = {}  # id(ir.Value) -> slot
        self._names: list[str] = []
        self._torch_names: dict[str, str] = {}   # ONNX initializer name -> attribute name
        self._onnx_types: dict[str, np.dtype] = {}
        self._parameter_names: list[str] = []
        self._constants: list[tuple[int, str]] = []
        initializers = [v for v in graph.initializers.values() if v.const_value is not None]
        for value in initializers:
            self._add_constant(value, value.const_value.numpy(), setup, trainable)
        self._inputs = []
        for value in graph.inputs:
            if value.is_initializer():
                continue
            rank = len(value.shape) if value.shape is not None else None
            onnx_type = value.dtype or ir.DataType.FLOAT
            self._inputs.append((value.name, self._slot(value), rank, _feed_dtype(setup, onnx_type, value.name)))
        self._steps = []
        for node in nodes:
            if node.op_type == "Constant":
                self._add_constant(node.outputs[0], factories[id(node)], setup, trainable=False)
                continue
            ins = [self._input_slot(v, setup) if v is not None else -1 for v in node.inputs]
            while ins and ins[-1] == -1:
                ins.pop()
            outs = tuple(self._slot(v) for v in node.outputs)
            label = f"{node.name or '(unnamed)'} ({node.op_type})"
            self._steps.append((factories[id(node)], tuple(ins), outs, label))
        self._outputs = {v.name: self._slot(v) for v in graph.outputs}
        self._producer = {out: i for i, step in enumerate(self._steps) for out in step[2]}
        self._plans: dict[tuple[str, ...], _Plan] = {}
        del self._slots  # keyed by object ids of the model, which the module does not keep

    # -- construction --

    def _slot(self, value: ir.Value) -> int:
        if id(value) not in self._slots:
            self._slots[id(value)] = len(self._names)
            self._names.append(value.name or f"(value {len(self._names)})")
        return self._slots[id(value)]

    def _input_slot(self, value: ir.Value, setup: Setup) -> int:
        if id(value) not in self._slots:
            if value.const_value is None:
                raise GraphcertError(f"value {value.name!r} has no producer and is not an input or initializer")
            self._add_constant(value, value.const_value.numpy(), setup, trainable=False)
        return self._slots[id(value)]

    def _add_constant(self, value: ir.Value, array: np.ndarray, setup: Setup, trainable: bool) -> None:
        try:
            dtype = setup.torch_dtype(ir.DataType.from_numpy(array.dtype))
            if array.dtype.name.startswith("float8"):  # numpy holds them as ml_dtypes, which torch cannot read
                tensor = torch.tensor(np.asarray(array, dtype=np.float32)).to(dtype)
            else:
                tensor = torch.tensor(np.asarray(array), dtype=dtype)
        except (_Unsupported, TypeError) as exc:
            raise GraphcertError(f"constant {value.name!r} of type {array.dtype} cannot become a torch tensor") from exc
        torch_name = self._fresh_name(value.name)
        if trainable and tensor.is_floating_point() and tensor.dim() >= 1:
            self.register_parameter(torch_name, nn.Parameter(tensor))
            self._parameter_names.append(value.name)
        else:
            self.register_buffer(torch_name, tensor)
        if tensor.is_floating_point() and value.is_initializer():
            self._torch_names[value.name] = torch_name
            self._onnx_types[value.name] = array.dtype
        self._constants.append((self._slot(value), torch_name))

    def _fresh_name(self, onnx_name: str) -> str:
        base = "init_" + re.sub(r"\W", "_", onnx_name or "unnamed")
        name, n = base, 1
        while hasattr(self, name):
            name, n = f"{base}_{n}", n + 1
        return name

    def _plan(self, outputs: tuple[str, ...]) -> _Plan:
        if outputs in self._plans:
            return self._plans[outputs]
        unknown = [name for name in outputs if name not in self._outputs]
        if unknown:
            raise InputError(f"unknown output(s) {unknown}; the graph outputs are {list(self._outputs)}")
        wanted = {self._outputs[name] for name in outputs}
        needed, stack = set(), list(wanted)
        chosen = set()
        while stack:
            slot = stack.pop()
            if slot in needed:
                continue
            needed.add(slot)
            if slot in self._producer:
                chosen.add(self._producer[slot])
                stack.extend(s for s in self._steps[self._producer[slot]][1] if s >= 0)
        order = sorted(chosen)
        last_use = {}
        for position, index in enumerate(order):
            for slot in self._steps[index][1]:
                last_use[slot] = position
        steps = []
        for position, index in enumerate(order):
            kernel_, ins, outs, label = self._steps[index]
            frees = tuple(s for s in set(ins) if s >= 0 and last_use.get(s) == position and s not in wanted)
            steps.append((kernel_, ins, outs, frees, label))
        plan = _Plan(steps, [entry for entry in self._inputs if entry[1] in needed])
        self._plans[outputs] = plan
        return plan

    # -- running --

    def forward(self, feeds: dict, outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        names = tuple(outputs) if outputs is not None else tuple(self._outputs)
        plan = self._plan(names)
        env: list = [None] * len(self._names)
        for slot, torch_name in self._constants:
            env[slot] = getattr(self, torch_name)
        missing = [name for name, *_ in plan.needed_inputs if name not in feeds]
        if missing:
            raise InputError(f"missing input(s) {missing}; the graph needs {[e[0] for e in plan.needed_inputs]}")
        for name, slot, rank, dtype in plan.needed_inputs:
            env[slot] = _prepare_feed(feeds[name], rank, dtype)
        for kernel_, ins, outs, frees, label in plan.steps:
            _run_step(env, kernel_, ins, outs, label)
            for slot in frees:
                env[slot] = None
        return {name: env[self._outputs[name]] for name in names}

    def bind(self, feeds: dict, varying: set[str], outputs: list[str] | None = None) -> "BoundGraph":
        """The graph with `feeds` fixed: the nodes that depend on none of the `varying` inputs are run once
        now (without gradients: the fixed feeds are constants), and the returned callable runs only the
        others, taking the varying inputs. Optimisation steps feed the same boxes every step and change only
        their parameters; the intervals, relaxation lines and whatever else depends on the boxes alone need
        computing once."""
        names = tuple(outputs) if outputs is not None else tuple(self._outputs)
        plan = self._plan(names)
        dynamic = {slot for name, slot, *_ in plan.needed_inputs if name in varying}
        env: list = [None] * len(self._names)
        for slot, torch_name in self._constants:
            env[slot] = getattr(self, torch_name)
        missing = [name for name, *_ in plan.needed_inputs if name not in feeds and name not in varying]
        if missing:
            raise InputError(f"missing input(s) {missing}; the graph needs {[e[0] for e in plan.needed_inputs]}")
        for name, slot, rank, dtype in plan.needed_inputs:
            if name not in varying:
                env[slot] = _prepare_feed(feeds[name], rank, dtype)
        later = []
        with torch.no_grad():
            for kernel_, ins, outs, _, label in plan.steps:
                if any(i in dynamic for i in ins):
                    dynamic.update(outs)
                    later.append((kernel_, ins, outs, label))
                else:
                    _run_step(env, kernel_, ins, outs, label)
        # Keep the fixed values the varying steps or the outputs read; free the rest.
        wanted = {self._outputs[name] for name in names}
        kept = {i for _, ins, _, _ in later for i in ins if i >= 0 and i not in dynamic} | (wanted - dynamic)
        template = [value if slot in kept else None for slot, value in enumerate(env)]
        last_use = {}
        for position, (_, ins, _, _) in enumerate(later):
            for slot in ins:
                if slot in dynamic:
                    last_use[slot] = position
        steps = [(kernel_, ins, outs, tuple(s for s in set(ins) if s in dynamic and last_use.get(s) == position
                                            and s not in wanted), label)
                 for position, (kernel_, ins, outs, label) in enumerate(later)]
        inputs = [entry for entry in plan.needed_inputs if entry[0] in varying]
        return BoundGraph(template, steps, inputs, {name: self._outputs[name] for name in names})

    # -- initializers --

    @property
    def parameter_names(self) -> list[str]:
        return list(self._parameter_names)

    def parameter(self, name: str) -> nn.Parameter:
        if name not in self._parameter_names:
            raise InputError(f"{name!r} is not a trainable initializer; parameters: {self._parameter_names[:10]}")
        return getattr(self, self._torch_names[name])

    def initializer_arrays(self) -> dict[str, np.ndarray]:
        """Current values of the float initializers, in their ONNX element type."""
        return {name: getattr(self, torch_name).detach().cpu().numpy().astype(self._onnx_types[name])
                for name, torch_name in self._torch_names.items()}

    def load_initializers(self, arrays: dict[str, np.ndarray]) -> None:
        unknown = [name for name in arrays if name not in self._torch_names]
        if unknown:
            raise InputError(f"no float initializer named {unknown}")
        with torch.no_grad():
            for name, array in arrays.items():
                target = getattr(self, self._torch_names[name])
                source = torch.as_tensor(np.asarray(array))
                if tuple(source.shape) != tuple(target.shape):
                    raise InputError(f"initializer {name!r} has shape {tuple(target.shape)}, "
                                     f"got an array of shape {tuple(source.shape)}")
                target.copy_(source.to(target.dtype))


class BoundGraph:
    """`TorchGraph.bind`'s result: `bound(varying feeds) -> {output name: tensor}`."""

    def __init__(self, template: list, steps: list, inputs: list, outputs: dict[str, int]):
        self.template, self.steps, self.inputs, self.outputs = template, steps, inputs, outputs

    def __call__(self, feeds: dict) -> dict[str, torch.Tensor]:
        env = list(self.template)
        for name, slot, rank, dtype in self.inputs:
            if name not in feeds:
                raise InputError(f"missing varying input {name!r}")
            env[slot] = _prepare_feed(feeds[name], rank, dtype)
        for kernel_, ins, outs, frees, label in self.steps:
            _run_step(env, kernel_, ins, outs, label)
            for slot in frees:
                env[slot] = None
        return {name: env[slot] for name, slot in self.outputs.items()}


def _run_step(env: list, kernel_, ins, outs, label: str) -> None:
    try:
        result = kernel_(*[env[i] if i >= 0 else None for i in ins])
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise GraphcertError(f"torch executor failed at node {label}: {str(exc).splitlines()[0]}") from exc
    if isinstance(result, torch.Tensor):
        env[outs[0]] = result
    else:
        for slot, tensor in zip(outs, result):
            env[slot] = tensor


def _feed_dtype(setup: Setup, onnx_type: ir.DataType, name: str) -> torch.dtype:
    try:
        return setup.torch_dtype(onnx_type)
    except _Unsupported:
        raise GraphcertError(f"input {name!r} has element type {onnx_type.name}, which the torch executor "
                             f"cannot feed") from None


def _prepare_feed(value, rank: int | None, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of the declared type; a smaller rank (a scalar epsilon) gains leading ones to broadcast."""
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if rank is not None and tensor.dim() < rank:
        tensor = tensor.reshape((1,) * (rank - tensor.dim()) + tuple(tensor.shape))
    return tensor


def _topological(graph: ir.Graph) -> list[ir.Node]:
    """The nodes in an order where every producer comes before its consumers (graph order when it already is)."""
    nodes = list(graph)
    produced_by = {id(out): node for node in nodes for out in node.outputs}
    state: dict[int, int] = {}   # 1 visiting, 2 done
    order: list[ir.Node] = []
    for root in nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                state[id(node)] = 2
                order.append(node)
                continue
            if state.get(id(node)) == 2:
                continue
            if state.get(id(node)) == 1:
                raise GraphcertError(f"the graph has a cycle through node {node.name!r}")
            state[id(node)] = 1
            stack.append((node, True))
            for value in reversed([v for v in node.inputs if v is not None]):
                producer = produced_by.get(id(value))
                if producer is not None and state.get(id(producer)) != 2:
                    stack.append((producer, False))
    return order


def _kernels(nodes: list[ir.Node], setup: Setup) -> dict[int, Callable]:
    """The kernel of every node, or UnsupportedOpError listing every node that has none."""
    found, missing = {}, {}
    for node in nodes:
        label = node.name or "(unnamed)"
        if node.domain not in ("", "ai.onnx") and (node.domain, node.op_type) not in OTHER_DOMAINS \
                or node.op_type not in KERNELS:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            missing.setdefault(op, []).append(label)
            continue
        try:
            found[id(node)] = KERNELS[node.op_type](node, setup)
        except _Unsupported as reason:
            missing.setdefault(node.op_type, []).append(f"{label}: {reason}")
    if missing:
        raise UnsupportedOpError("torch", missing)
    return found
