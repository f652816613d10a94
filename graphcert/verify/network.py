"""The model under verification, twice: normalised (bounds, attacks) and as given (confirming counterexamples)."""
from __future__ import annotations

import functools
import os

import numpy as np
import onnx

from .. import api
from ..errors import InputError
from ..export import IR_VERSION
from ..interface import perturbed_inputs
from ..model import read_proto
from ..runtime import Session
from ..vnnlib import Property


class Network:
    """The model twice: normalised (for bounds and attacks) and the original file (to confirm candidates)."""

    def __init__(self, model_path: str | os.PathLike):
        proto = read_proto(model_path)
        self.model = api.load(proto)
        # What bound graphs are built from: the model, or in float32 verification the model with its rounding
        # as bounded leaves (graphcert.rounding_leaves, set by `Search`).
        self.bound_model = self.model
        inputs = perturbed_inputs(self.model)
        if len(inputs) != 1 or len(self.model.graph.outputs) != 1:
            raise InputError(f"{model_path}: verification needs exactly one input and one output, found "
                             f"{len(inputs)} and {len(self.model.graph.outputs)}")
        x, y = inputs[0], self.model.graph.outputs[0]
        self.input_name = x.name
        dims = list(x.shape) if x.shape is not None else []
        self.batched = len(dims) >= 2 and not isinstance(dims[0], int)
        self.sample_shape = dims[1:] if self.batched else dims
        if not all(isinstance(d, int) for d in self.sample_shape):
            raise InputError(f"{model_path}: input {x.name} has free dimensions {dims}; fix its shape first")
        self.output_name = y.name
        self.n_inputs = int(np.prod(self.sample_shape))
        self.n_outputs = int(np.prod([d for d in (y.shape or [])[1 if self.batched else 0:]]))
        # The original computation, with the IR version capped to one onnxruntime loads (the graph is unchanged).
        runnable = onnx.ModelProto()
        runnable.CopyFrom(proto)
        runnable.ir_version = min(runnable.ir_version, IR_VERSION)
        self.original = Session(runnable, threads=1)
        original_input = next(i for i in proto.graph.input if i.name == x.name)
        original_dims = [d.dim_value for d in original_input.type.tensor_type.shape.dim]
        self.original_shape = original_dims if all(original_dims) else ([1] if self.batched else []) + self.sample_shape

    @functools.cached_property
    def differentiable(self):
        """The normalised model as a torch function of flat inputs (built on first use: torch loads then)."""
        from ..attack import FlatNetwork
        return FlatNetwork(self.model, self.output_name)

    def model_shaped(self, flat: np.ndarray) -> np.ndarray:
        """[B, n] -> the model's batched input shape (only for batched models)."""
        return flat.reshape(len(flat), *self.sample_shape)

    def confirm(self, prop: Property, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(x, y) when the original model maps x into the unsafe set under onnxruntime, else None."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        y = self.original.run({self.input_name: x.reshape(self.original_shape)})[self.original.output_names[0]]
        y = y.reshape(-1)
        return (x, y) if prop.is_counterexample(x, y) else None
