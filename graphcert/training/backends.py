"""Training backends: one optimiser step or one evaluation of the training graph on a batch.

Both run the same ONNX training graph (`losses.training_graph`): `torch` through the ONNX -> torch
executor with the weights as nn.Parameters and torch.optim.Adam, `ort-training` through onnxruntime-training
(`graphcert.training.ort`). Adam has beta = (0.9, 0.999), eps = 1e-8, no weight decay, and the gradient is
clipped to a global L2 norm first when `grad_clip` is set, on both.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphcert.errors import InputError
from graphcert.training.losses import (CERTIFIED_MARGINS, CLEAN_LOSS, CLEAN_MARGINS, LOSS, ROBUST_LOSS,
                                       SAMPLE_LOSSES)

BACKENDS = ("torch", "ort-training")
OUTPUTS = [LOSS, CLEAN_LOSS, ROBUST_LOSS, CLEAN_MARGINS, CERTIFIED_MARGINS, SAMPLE_LOSSES]
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class StepResult:
    loss: float
    clean_loss: float
    robust_loss: float
    margins: np.ndarray          # [batch, classes - 1], label logit minus each other logit
    margins_lower: np.ndarray    # their certified lower bounds
    sample_losses: np.ndarray    # [batch], each sample's loss before weighting

    @classmethod
    def from_outputs(cls, values) -> "StepResult":
        loss, clean, robust, margins, lower, per_sample = values
        return cls(float(loss), float(clean), float(robust), np.asarray(margins), np.asarray(lower),
                   np.asarray(per_sample))


class TorchBackend:
    name = "torch"

    def __init__(self, graph: ir.Model, trainable: list[str], lr: float, grad_clip: float | None):
        import torch
        from graphcert.torch_exec import TorchGraph
        self._torch = torch
        self.executor = TorchGraph(graph, trainable=True)
        self.trainable = list(trainable)
        wanted = set(trainable)
        for name in self.executor.parameter_names:
            self.executor.parameter(name).requires_grad_(name in wanted)
        self.parameters_ = [self.executor.parameter(name) for name in self.trainable]
        self.optimizer = torch.optim.Adam(self.parameters_, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
        self.grad_clip = grad_clip

    def train_step(self, feeds: dict) -> StepResult:
        values = self.executor(feeds, OUTPUTS)
        self.optimizer.zero_grad(set_to_none=True)
        values[LOSS].backward()
        if self.grad_clip:
            self._torch.nn.utils.clip_grad_norm_(self.parameters_, self.grad_clip)
        self.optimizer.step()
        return StepResult.from_outputs(v.detach().numpy() for v in (values[name] for name in OUTPUTS))

    def evaluate(self, feeds: dict) -> StepResult:
        with self._torch.no_grad():
            values = self.executor(feeds, OUTPUTS)
        return StepResult.from_outputs(values[name].numpy() for name in OUTPUTS)

    def weights(self) -> dict[str, np.ndarray]:
        arrays = self.executor.initializer_arrays()
        return {name: arrays[name] for name in self.trainable}

    def state(self) -> bytes:
        buffer = io.BytesIO()
        self._torch.save({"weights": {k: self._torch.from_numpy(v) for k, v in self.weights().items()},
                          "optimizer": self.optimizer.state_dict()}, buffer)
        return buffer.getvalue()

    def load_state(self, data: bytes) -> None:
        saved = self._torch.load(io.BytesIO(data), weights_only=True)
        self.executor.load_initializers({k: v.numpy() for k, v in saved["weights"].items()})
        self.optimizer.load_state_dict(saved["optimizer"])


def make_backend(name: str, graph: ir.Model, trainable: list[str], lr: float, grad_clip: float | None,
                 threads: int | None = None):
    """A backend over `graph` training the weights named `trainable`. torch's thread count is process-wide
    and set by the caller; onnxruntime-training takes `threads` per session."""
    if name == "torch":
        return TorchBackend(graph, trainable, lr, grad_clip)
    if name == "ort-training":
        from graphcert.training.ort import OrtBackend
        return OrtBackend(graph, trainable, lr, grad_clip, threads)
    raise InputError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
