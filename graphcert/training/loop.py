"""Certified training: the epoch loop, its settings, held-out evaluation, checkpoints and write-back.

The model (an ONNX file, or a standard architecture) is normalised, its bound graph with the robust loss
is built once (`losses.training_graph`), and a backend trains the original weights through it. After
every epoch the checkpoint is rewritten; at the end the weights go back into the original ONNX graph.
The held-out split is a fixed random `holdout` fraction of the data set (the same for every seed), saved
beside the output as OUT.onnx.holdout.npz, so `graphcert certify OUT.onnx --data OUT.onnx.holdout.npz`
certifies exactly the samples whose certified accuracy training reports.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from graphcert import api, methods, model as model_lib
from graphcert.architectures import ARCHITECTURES, build
from graphcert.certify import CertifyResult, certify, check_eps, margin_objective
from graphcert.data import Dataset, fit_to_input, load_dataset
from graphcert.errors import InputError
from graphcert.export import atomic_write, save
from graphcert.files import refuse_overwrite
from graphcert.interface import epsilon_name, perturbed_inputs
from graphcert.model import static_shape
from graphcert.training.backends import BACKENDS, make_backend
from graphcert.training.checkpoint import (Checkpoint, check_resumable, checkpoint_path, load_checkpoint,
                                           save_checkpoint)
from graphcert.training.initialisation import ibp_initialise
from graphcert.training.hr import check_hr, hr_weights
from graphcert.training.losses import KAPPA, SAMPLE_WEIGHTS, Loss, check_loss, training_graph, training_norm
from graphcert.training.schedule import SHAPES, Schedule, default_phases
from graphcert.training.writeback import deployed_weights, trainable_names, write_back

INITS = ("ibp", "default")
SPLIT_SEED = 20210331  # the held-out split does not depend on --seed, so runs with other seeds compare


@dataclass
class TrainConfig:
    output: str
    eps: float
    model: str | None = None          # an ONNX file to fine-tune, or
    arch: str | None = None           # a standard architecture to build (graphcert.architectures)
    data: str = "mnist5k"
    method: str = "ibp"
    epochs: int = 10
    warmup: int | None = None         # None: a fifth of the epochs (see schedule.default_phases)
    rampup: int | None = None         # None: the epochs after warm-up
    batch_size: int = 256
    lr: float = 1e-3
    kappa: float = 0.0                # final weight of the clean loss
    seed: int = 0
    schedule: str = "linear"
    init: str = "default"             # "default" keeps the weights (torch's initialisation for --arch); "ibp" redraws them
    grad_clip: float | None = 10.0
    backend: str = "torch"
    holdout: float = 0.1
    resume: bool = False
    threads: int | None = 1           # compute threads; one is fastest for small graphs on a busy machine
    hr_alpha: float = 0.0             # holistic robust training: fraction of the data that may be poisoned
    hr_r: float = 0.0                 # ... and KL radius for statistical error (both 0: the plain mean loss)
    loss: str = "ce"                  # ce (robust cross-entropy), or for --method orthogonal tau-ce or hkr
    tau: float = Loss.tau
    hkr_alpha: float = Loss.hkr_alpha
    hkr_margin: float = Loss.hkr_margin

    @property
    def holistic(self) -> bool:
        return self.hr_alpha > 0 or self.hr_r > 0

    @property
    def loss_settings(self) -> Loss:
        return Loss(self.loss, self.tau, self.hkr_alpha, self.hkr_margin)


@dataclass
class EpochStats:
    epoch: int
    eps: float                        # the radius at the end of the epoch
    kappa: float
    loss: float
    clean_loss: float
    clean_accuracy: float
    robust_loss: float
    certified_accuracy: float         # on the training batches, at the radius each was trained with
    seconds: float
    holdout_clean_accuracy: float | None = None
    holdout_certified_accuracy: float | None = None   # at the target radius


@dataclass
class TrainResult:
    output: str
    checkpoint: str
    history: list[EpochStats]
    holdout: CertifyResult | None     # onnxruntime certification of the written model on the held-out split
    holdout_size: int
    train_size: int
    seconds: float                    # training time, without the final certification
    reproduce: str | None = None      # the command that certifies the held-out split again
    trainable: list[str] = field(default_factory=list)


def settings_of(config: TrainConfig, warmup: int, rampup: int) -> dict:
    source = f"arch:{config.arch}" if config.arch else os.path.abspath(config.model)
    values = asdict(config)
    values.update(source=source, warmup=warmup, rampup=rampup)
    return values


def validate(config: TrainConfig) -> tuple[int, int]:
    """Resolved (warmup, rampup), or InputError naming the first bad option."""
    check_eps(config.eps)
    if (config.model is None) == (config.arch is None):
        raise InputError(f"give either a MODEL.onnx to fine-tune or --arch {'|'.join(ARCHITECTURES)}, "
                         f"not both or neither")
    if config.arch is not None and config.arch not in ARCHITECTURES:
        raise InputError(f"unknown architecture '{config.arch}'; choose one of: {', '.join(ARCHITECTURES)}")
    if not methods.get(config.method).trainable:
        raise InputError(f"method '{config.method}' cannot be trained through; choose one of: "
                         f"{', '.join(methods.names(role=None, trainable=True))}")
    if config.backend not in BACKENDS:
        raise InputError(f"unknown backend '{config.backend}'; choose one of: {', '.join(BACKENDS)}")
    if config.schedule not in SHAPES:
        raise InputError(f"unknown schedule '{config.schedule}'; choose one of: {', '.join(SHAPES)}")
    if config.init not in INITS:
        raise InputError(f"unknown initialisation '{config.init}'; choose one of: {', '.join(INITS)}")
    if config.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {config.epochs}")
    for name in ("warmup", "rampup"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise InputError(f"--{name} must be >= 0, got {value}")
    warmup, rampup = default_phases(config.epochs, config.warmup, config.rampup)
    if warmup + rampup > config.epochs:
        raise InputError(f"--warmup {warmup} + --rampup {rampup} exceed --epochs {config.epochs}: epsilon would "
                         f"never reach {config.eps:g}; add epochs or shorten the ramp")
    if config.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {config.batch_size}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise InputError(f"--lr must be a positive number, got {config.lr}")
    if not 0.0 <= config.kappa <= 1.0:
        raise InputError(f"--kappa must be in [0, 1], got {config.kappa}")
    if config.grad_clip is not None and not (math.isfinite(config.grad_clip) and config.grad_clip >= 0):
        raise InputError(f"--grad-clip must be >= 0 (0 turns clipping off), got {config.grad_clip}")
    if not 0.0 <= config.holdout < 1.0:
        raise InputError(f"--holdout must be in [0, 1), got {config.holdout}")
    if config.threads is not None and config.threads < 1:
        raise InputError(f"--threads must be >= 1, got {config.threads}")
    check_hr(config.hr_alpha, config.hr_r)
    check_loss(config.loss_settings, config.method, config.holistic)
    folder = os.path.dirname(os.path.abspath(config.output))
    if not os.path.isdir(folder):
        raise InputError(f"output folder does not exist: {folder}; create it first")
    refuse_overwrite([config.output, checkpoint_path(config.output)], [config.model, config.data])
    return warmup, rampup


@dataclass
class _Problem:
    """The model and data set up for training: original proto, normalised model, arrays and names."""
    proto: onnx.ModelProto
    normalised: object
    x_train: np.ndarray
    y_train: np.ndarray
    objective_train: np.ndarray
    holdout: Dataset | None
    x_holdout: np.ndarray | None
    objective_holdout: np.ndarray | None
    x_name: str
    eps_name: str
    eps_rank: int
    domain: tuple[float, float] | None


def _prepare(config: TrainConfig) -> _Problem:
    data = load_dataset(config.data)
    if len(data) < 2:
        raise InputError(f"data set {data.name} has {len(data)} sample(s); training needs at least 2")
    if config.arch:
        proto = build(config.arch, data.x.shape[1:], max(data.n_classes, 2), config.seed)
    else:
        proto = model_lib.read_proto(config.model)
    normalised = model_lib.load(proto)
    inputs = perturbed_inputs(normalised)
    if len(inputs) != 1 or len(normalised.graph.outputs) != 1:
        raise InputError(f"training needs a classifier with one input and one output; this model has "
                         f"{len(inputs)} input(s) and {len(normalised.graph.outputs)} output(s)")
    shape, out_shape = static_shape(inputs[0]), static_shape(normalised.graph.outputs[0])
    if len(shape) < 2 or len(out_shape) != 2 or not isinstance(out_shape[1], int):
        raise InputError(f"training needs a batched classifier (input [batch, ...], output [batch, classes]); "
                         f"this model maps {shape} to {out_shape}")
    n_classes = out_shape[1]
    if data.y.max() >= n_classes:
        raise InputError(f"labels go up to {data.y.max()} but the model has {n_classes} outputs")
    x = fit_to_input(data.x, shape)
    objective = margin_objective(data.y, n_classes)
    n_holdout = 0 if config.holdout == 0 else max(1, int(round(config.holdout * len(data))))
    if n_holdout >= len(data):
        raise InputError(f"--holdout {config.holdout} leaves no training samples out of {len(data)}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(data))
    held, kept = np.sort(order[:n_holdout]), np.sort(order[n_holdout:])
    holdout = Dataset(f"{data.name} held-out", data.x[held], data.y[held], data.domain) if n_holdout else None
    return _Problem(proto, normalised, x[kept], data.y[kept], objective[kept], holdout,
                    x[held] if n_holdout else None, objective[held] if n_holdout else None,
                    inputs[0].name, epsilon_name(normalised, inputs[0]), len(shape), data.domain)


@contextmanager
def _threads(count: int | None):
    """torch's intra-op thread count for the duration of training (small graphs often run faster on one)."""
    if count is None:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(config: TrainConfig, progress: bool = False, on_epoch=None) -> TrainResult:
    """Train, checkpoint every epoch, write the trained model to `config.output`; `on_epoch(stats)` is
    called after each epoch (and may raise to stop: the checkpoint of that epoch is already written)."""
    warmup, rampup = validate(config)
    problem = _prepare(config)
    trainable = trainable_names(problem.proto, problem.normalised)
    settings = settings_of(config, warmup, rampup)
    ckpt_path = checkpoint_path(config.output)
    resumed = load_checkpoint(ckpt_path) if config.resume else None
    if resumed is not None:
        check_resumable(resumed.settings, settings, ckpt_path)
        if resumed.epoch > config.epochs:
            raise InputError(f"the checkpoint has {resumed.epoch} epochs done, more than --epochs {config.epochs}")
    elif config.init == "ibp":
        ibp_initialise(problem.normalised, set(trainable), config.seed)
    graph = training_graph(problem.normalised, config.method, problem.domain, config.loss_settings)
    with _threads(config.threads):
        backend = make_backend(config.backend, graph, trainable, config.lr, config.grad_clip or None,
                               threads=config.threads)
        history = [EpochStats(**entry) for entry in resumed.history] if resumed else []
        if resumed is not None:
            backend.load_state(resumed.state)
        steps = math.ceil(len(problem.y_train) / config.batch_size)
        schedule = Schedule(config.eps, warmup, rampup, config.kappa, config.schedule, steps)
        start = time.perf_counter()
        for epoch in range(resumed.epoch if resumed else 0, config.epochs):
            stats = _epoch(backend, problem, schedule, config, epoch, progress)
            history.append(stats)
            save_checkpoint(ckpt_path, Checkpoint(settings, epoch + 1, [asdict(s) for s in history],
                                                  backend.state()))
            if on_epoch is not None:
                on_epoch(stats)
        seconds = time.perf_counter() - start
        weights = backend.weights()
    trained = write_back(problem.proto, deployed_weights(config.method, problem.normalised, weights))
    # A fine-tuned graphcert model already carries this key; duplicate keys fail the ONNX checker.
    kept = [p for p in trained.metadata_props if p.key != "graphcert.training"]
    del trained.metadata_props[:]
    trained.metadata_props.extend(kept)
    recorded = {k: settings[k] for k in ("data", "eps", "method", "epochs", "warmup", "rampup", "kappa", "schedule",
                                         "init", "seed", "backend", "hr_alpha", "hr_r", "loss")}
    trained.metadata_props.add(key="graphcert.training", value=json.dumps({**recorded, **_loss_settings(config)}))
    save(trained, config.output, source=config.model)
    final, reproduce = None, None
    if problem.holdout is not None:
        method, norm = methods.get(config.method).certified_with(), training_norm(config.method)
        final = certify(model_lib.load(trained), problem.holdout, config.eps, method=method, norm=norm)
        holdout_file = holdout_path(config.output)
        _save_dataset(problem.holdout, holdout_file)
        reproduce = (f"graphcert certify {config.output} --data {holdout_file} --eps {config.eps:g} --method {method}"
                     + (f" --norm {norm}" if norm != "linf" else ""))
    return TrainResult(config.output, ckpt_path, history, final, len(problem.holdout or []),
                       len(problem.y_train), seconds, reproduce, trainable)


def _loss_settings(config: TrainConfig) -> dict:
    """The settings of the chosen loss, for the model's metadata."""
    return {"tau-ce": {"tau": config.tau}, "hkr": {"hkr_alpha": config.hkr_alpha, "hkr_margin": config.hkr_margin}
            }.get(config.loss, {})


def holdout_path(output: str) -> str:
    return os.fspath(output) + ".holdout.npz"


def _save_dataset(data: Dataset, path: str) -> None:
    buffer = io.BytesIO()
    extra = {"domain": np.asarray(data.domain, dtype=np.float64)} if data.domain is not None else {}
    np.savez_compressed(buffer, x=data.x, y=data.y, **extra)
    atomic_write(buffer.getvalue(), path)


def _feeds(problem: _Problem, x: np.ndarray, objective: np.ndarray, eps: float, kappa: float) -> dict:
    return {problem.x_name: x, "objective": objective,
            problem.eps_name: np.full([1] * problem.eps_rank, eps, dtype=np.float32),
            KAPPA: np.array(kappa, dtype=np.float32), SAMPLE_WEIGHTS: np.full(len(x), 1.0 / len(x), dtype=np.float32)}


def _step(backend, feeds: dict, config: TrainConfig):
    """One optimiser step; holistic robust training first evaluates the batch for its worst-case weights."""
    if config.holistic:
        losses = backend.evaluate(feeds).sample_losses
        feeds = {**feeds, SAMPLE_WEIGHTS: hr_weights(losses, config.hr_alpha, config.hr_r).astype(np.float32)}
    return backend.train_step(feeds)


class _Tally:
    """Sample-weighted means of losses and counts of correct and certified samples."""

    def __init__(self):
        self.n = 0
        self.sums = {"loss": 0.0, "clean_loss": 0.0, "robust_loss": 0.0}
        self.clean = self.certified = 0

    def add(self, result) -> None:
        batch = len(result.margins)
        self.n += batch
        for key in self.sums:
            self.sums[key] += getattr(result, key) * batch
        correct = (result.margins > 0).all(axis=1)
        self.clean += int(correct.sum())
        self.certified += int((correct & (result.margins_lower > 0).all(axis=1)).sum())

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.n, 1)

    def rate(self, count: int) -> float:
        return count / max(self.n, 1)


def _epoch(backend, problem: _Problem, schedule: Schedule, config: TrainConfig, epoch: int,
           progress: bool) -> EpochStats:
    from tqdm import tqdm
    start = time.perf_counter()
    order = np.random.default_rng([config.seed, epoch]).permutation(len(problem.y_train))
    tally = _Tally()
    bar = tqdm(total=schedule.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
               disable=not progress, leave=True)
    step = epoch * schedule.steps_per_epoch
    eps = kappa = 0.0
    for lo in range(0, len(order), config.batch_size):
        chosen = order[lo:lo + config.batch_size]
        eps, kappa = schedule.epsilon(step), schedule.kappa_at(step)
        tally.add(_step(backend, _feeds(problem, problem.x_train[chosen], problem.objective_train[chosen], eps, kappa),
                        config))
        step += 1
        bar.update(1)
        bar.set_postfix_str(f"eps {eps:.4g} loss {tally.mean('loss'):.3f} clean {tally.rate(tally.clean):.1%} "
                            f"robust {tally.mean('robust_loss'):.3f} cert {tally.rate(tally.certified):.1%}",
                            refresh=False)
    stats = EpochStats(epoch + 1, eps, kappa, tally.mean("loss"), tally.mean("clean_loss"), tally.rate(tally.clean),
                       tally.mean("robust_loss"), tally.rate(tally.certified), 0.0)
    if problem.holdout is not None:
        held = _evaluate(backend, problem, config)
        stats.holdout_clean_accuracy = held.rate(held.clean)
        stats.holdout_certified_accuracy = held.rate(held.certified)
        bar.set_postfix_str(bar.postfix + f" | held-out clean {stats.holdout_clean_accuracy:.1%} "
                                          f"cert@{config.eps:g} {stats.holdout_certified_accuracy:.1%}")
    stats.seconds = time.perf_counter() - start
    bar.close()
    return stats


def _evaluate(backend, problem: _Problem, config: TrainConfig) -> _Tally:
    tally = _Tally()
    for lo in range(0, len(problem.x_holdout), config.batch_size):
        tally.add(backend.evaluate(_feeds(problem, problem.x_holdout[lo:lo + config.batch_size],
                                          problem.objective_holdout[lo:lo + config.batch_size],
                                          config.eps, config.kappa)))
    return tally
