"""Training checkpoints: one file beside the output, rewritten atomically after every epoch.

A checkpoint holds the settings it was made with, the number of finished epochs, the per-epoch history
and the backend's state (weights and optimiser moments). Shuffling draws from a generator seeded by
(seed, epoch), so the seed and the epoch counter are the whole random state. The file is an .npz without
pickles: the settings as JSON text and the backend state as bytes.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np

from graphcert.errors import InputError
from graphcert.export import atomic_write

FORMAT = "graphcert-training-checkpoint/1"
# Settings that must match to resume: they fix the schedule, the graph or the backend state's format.
MUST_MATCH = ("source", "data", "eps", "method", "warmup", "rampup", "batch_size", "lr", "kappa", "seed",
              "schedule", "grad_clip", "backend", "holdout", "init", "hr_alpha", "hr_r", "loss", "tau", "hkr_alpha",
              "hkr_margin")
# Settings added after checkpoints were first written, and the value older checkpoints trained with.
SINCE_FORMAT_1 = {"hr_alpha": 0.0, "hr_r": 0.0, "loss": "ce", "tau": 3.0, "hkr_alpha": 50.0, "hkr_margin": 1.0}


@dataclass
class Checkpoint:
    settings: dict
    epoch: int
    history: list[dict]
    state: bytes


def checkpoint_path(output: str | os.PathLike) -> str:
    return os.fspath(output) + ".ckpt"


def save_checkpoint(path: str, checkpoint: Checkpoint) -> None:
    meta = {"format": FORMAT, "settings": checkpoint.settings, "epoch": checkpoint.epoch,
            "history": checkpoint.history}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), state=np.frombuffer(checkpoint.state, dtype=np.uint8))
    atomic_write(buffer.getvalue(), path)


def load_checkpoint(path: str) -> Checkpoint:
    if not os.path.exists(path):
        raise InputError(f"no checkpoint to resume from at {path}; train once without --resume first")
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            state = archive["state"].tobytes()
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read checkpoint {path} ({type(exc).__name__}); delete it and train again") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{path} is not a graphcert training checkpoint of this version")
    return Checkpoint(meta["settings"], int(meta["epoch"]), list(meta["history"]), state)


def check_resumable(saved: dict, current: dict, path: str) -> None:
    saved = {**SINCE_FORMAT_1, **saved}
    changed = [f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in MUST_MATCH
               if saved.get(key) != current.get(key)]
    if changed:
        raise InputError(f"cannot resume from {path}: settings differ ({'; '.join(changed)}); "
                         f"use the original settings or train without --resume")
