"""The onnxruntime-training backend and its artifacts (training, eval and optimizer graphs, checkpoint).

onnxruntime-training is an optional extra: it ships the same `onnxruntime` module as the onnxruntime
package, so it lives in an environment of its own (with numpy < 2), and is detected when first needed.
Its 1.19 release loads models of IR version <= 10 only, so every generated graph is written with IR 10.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphcert.errors import InputError
from graphcert.export import IR_VERSION, to_proto
from graphcert.training.backends import ADAM_BETAS, ADAM_EPS, OUTPUTS, StepResult
from graphcert.training.losses import LOSS

INSTALL_HINT = ("the ort-training backend needs onnxruntime-training, which replaces onnxruntime: in a separate "
                "virtual environment run `pip install torch==2.13.0 'numpy<2'` and then "
                "`pip install --no-deps -e .` plus the packages of the 'ort-training' extra (see README)")
TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT = (
    "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
MANIFEST = "graphcert_training.json"


def require_ort_training():
    """The onnxruntime.training modules, or a one-line InputError telling how to install them."""
    try:
        import onnxruntime
        from onnxruntime.training import api, artifacts, onnxblock
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    onnxruntime.set_default_logger_severity(3)
    return api, artifacts, onnxblock


@contextmanager
def _native_log_discarded():
    """Silence the C++ log on file descriptor 2: the gradient builder logs every graph transformer at
    INFO level whatever the logger severity says."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _broadcast_where_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Where's gradient in onnxruntime-training 1.19 does not sum over broadcast axes (a [batch, n] input
    selected into a [rows, batch, n] output gets a [rows, batch, n] gradient), so expand both value inputs
    to the output shape first: Expand's gradient sums correctly. The shape comes from a first Where, which
    only feeds Shape and so needs no gradient."""
    nodes = []
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        condition, x, y = node.input
        tag = f"graphcert_where_{index}"
        nodes.append(onnx.helper.make_node("Where", [condition, x, y], [f"{tag}_probe"], name=f"{tag}_probe"))
        nodes.append(onnx.helper.make_node("Shape", [f"{tag}_probe"], [f"{tag}_shape"], name=f"{tag}_shape"))
        for name, value in (("x", x), ("y", y)):
            nodes.append(onnx.helper.make_node("Expand", [value, f"{tag}_shape"], [f"{tag}_{name}"],
                                               name=f"{tag}_expand_{name}"))
        nodes.append(onnx.helper.make_node("Where", [condition, f"{tag}_x", f"{tag}_y"], list(node.output),
                                           name=node.name))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def write_artifacts(graph: ir.Model, trainable: list[str], directory: str | os.PathLike,
                    grad_clip: float | None) -> None:
    """Training/eval/optimizer graphs and the initial checkpoint of a training graph, into `directory`."""
    _, artifacts, onnxblock = require_ort_training()
    proto = _broadcast_where_inputs(to_proto(graph))
    frozen = [init.name for init in proto.graph.initializer if init.name not in set(trainable)]
    clip = onnxblock.optim.ClipGradNorm(grad_clip) if grad_clip else None
    optimizer = onnxblock.optim.AdamW(betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0, clip_grad=clip)
    extra = [name for name in OUTPUTS if name != LOSS]
    with _native_log_discarded():
        artifacts.generate_artifacts(proto, requires_grad=list(trainable), frozen_params=frozen, loss=None,
                                     loss_input_names=[LOSS], additional_output_names=extra, optimizer=optimizer,
                                     artifact_directory=os.fspath(directory))
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL):
        path = Path(directory) / name
        model = onnx.load(path)
        if model.ir_version > IR_VERSION:
            model.ir_version = IR_VERSION
            onnx.save(model, path)


def export_training(model_path: str | os.PathLike, directory: str | os.PathLike, method: str, eps: float,
                    domain: tuple[float, float] | None, grad_clip: float | None = 10.0) -> list[str]:
    """Artifacts for training `model_path` with onnxruntime-training on other devices, plus a manifest
    (graphcert_training.json) of their inputs, outputs, trainable weights and the target radius."""
    from graphcert import model as model_lib
    from graphcert.certify import check_eps
    from graphcert.training.losses import training_graph
    from graphcert.training.writeback import trainable_names
    check_eps(eps)
    require_ort_training()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a folder; choose another output folder")
    if not directory.absolute().parent.is_dir():
        raise InputError(f"the parent of {directory} does not exist; create it first")
    proto = model_lib.read_proto(model_path)
    normalised = model_lib.load(proto)
    trainable = trainable_names(proto, normalised)
    graph = training_graph(normalised, method, domain)
    directory.mkdir(exist_ok=True)
    write_artifacts(graph, trainable, directory, grad_clip)
    manifest = {"model": os.fspath(model_path), "method": method, "eps": eps,
                "domain": list(domain) if domain is not None else None, "grad_clip": grad_clip,
                "inputs": [v.name for v in graph.graph.inputs], "outputs": list(OUTPUTS), "trainable": trainable,
                "files": [TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT],
                "loss": "sum_i sample_weights_i * (kappa * CE(margins_i) + (1 - kappa) * CE(margins_lower_i)); "
                        "sample_weights 1/N for the mean; objective rows e_label - e_j"}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return sorted(os.listdir(directory))


class OrtBackend:
    name = "ort-training"

    def __init__(self, graph: ir.Model, trainable: list[str], lr: float, grad_clip: float | None,
                 threads: int | None = None):
        self._api = require_ort_training()[0]
        self.threads = threads
        self._folder = tempfile.TemporaryDirectory(prefix="graphcert-ort-")
        self.path = Path(self._folder.name)
        self.trainable = list(trainable)
        self.lr = lr
        write_artifacts(graph, trainable, self.path, grad_clip)
        self._start(self._api.CheckpointState.load_checkpoint(str(self.path / CHECKPOINT)))

    def _start(self, checkpoint) -> None:
        self.checkpoint = checkpoint
        import onnxruntime
        options = onnxruntime.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        try:
            self.module = self._api.Module(str(self.path / TRAINING_MODEL), checkpoint, str(self.path / EVAL_MODEL),
                                           session_options=options)
        except RuntimeError as exc:
            missing = re.search(r"Could not find an implementation for (\w+)", str(exc))
            if missing is None:
                raise
            # e.g. ConvTransposeGrad, which crown-ibp needs to send bounds back through Conv layers.
            raise InputError(f"onnxruntime-training has no CPU kernel for {missing.group(1)}, which this "
                             f"training graph needs; use --backend torch") from None
        self.optimizer = self._api.Optimizer(str(self.path / OPTIMIZER_MODEL), self.module)
        self.optimizer.set_learning_rate(self.lr)
        self.input_names = list(self.module.input_names())

    def _arguments(self, feeds: dict) -> list[np.ndarray]:
        return [np.asarray(feeds[name]) for name in self.input_names]

    def train_step(self, feeds: dict) -> StepResult:
        self.module.train()
        values = self.module(*self._arguments(feeds))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return StepResult.from_outputs(values)

    def evaluate(self, feeds: dict) -> StepResult:
        self.module.eval()
        return StepResult.from_outputs(self.module(*self._arguments(feeds)))

    def weights(self) -> dict[str, np.ndarray]:
        return {name: np.array(self.checkpoint.parameters[name].data) for name in self.trainable}

    def state(self) -> bytes:
        path = self.path / "saved_checkpoint"
        self._api.CheckpointState.save_checkpoint(self.checkpoint, str(path), include_optimizer_state=True)
        return path.read_bytes()

    def load_state(self, data: bytes) -> None:
        path = self.path / "resumed_checkpoint"
        path.write_bytes(data)
        self._start(self._api.CheckpointState.load_checkpoint(str(path)))
