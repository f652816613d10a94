"""Certified accuracy over a list of radii and methods in one pass over the data, and per-sample radii.

Each method's bound graph is built once, with epsilon as an input (one radius per sample), and each sample
binary-searches the sorted radii: certified at a radius implies certified at every smaller one (its ball holds
theirs), and a sample not certified at one radius is counted as not certified at the larger ones (at worst
conservative, never unsound), so a sample takes about log2(radii + 1) runs. `lipschitz` margins are affine in the
radius, so its per-sample radius comes in closed form (see graphcert.radius) and gives every radius at once.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .alpha import CERTIFY_ALPHA, AlphaSettings
from .certify import certified_mask, certifier, check_eps, check_method_norm, margin_objective, prepare
from .data import Dataset
from .errors import InputError
from .files import atomic_write
from .radius import DEFAULT_TOLERANCE, CLOSED_FORM, radius_search

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def parse_eps(text: str) -> list[float]:
    """'0.005,0.01,0.02' or 'start:stop:step' (stop included) -> sorted distinct radii."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not (step > 0 and stop >= start and math.isfinite(stop)):
                raise InputError(f"--eps {text}: start:stop:step needs step > 0 and stop >= start")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            if count > 1000:
                raise InputError(f"--eps {text} gives {count} radii; at most 1000")
            values = [start + i * step for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(f"--eps {text}: give a number, a list like 0.005,0.01 or start:stop:step") from None
    if not values:
        raise InputError("--eps: give at least one radius")
    return sorted({round(check_eps(v), 12) for v in values})


def parse_methods(text: str) -> list[str]:
    methods = list(dict.fromkeys(m.strip() for m in str(text).split(",") if m.strip()))
    if not methods:
        raise InputError("--method: give at least one method")
    return methods


@dataclass
class SweepRow:
    method: str
    eps: float
    norm: str
    n: int
    clean: int
    certified: int
    clean_accuracy: float
    certified_accuracy: float
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SweepResult:
    """Every (method, radius) pair, and per sample: label, prediction, certified flags and radii."""
    model: str
    data: str
    norm: str
    eps: list[float]
    methods: list[str]
    labels: np.ndarray
    predictions: np.ndarray
    certified: dict[str, np.ndarray]                 # method -> bool [n, len(eps)]
    seconds: dict[str, np.ndarray]                   # method -> seconds per radius
    build_seconds: dict[str, float]                  # method -> seconds to build its bound graph
    radii: dict[str, np.ndarray] = field(default_factory=dict)   # method -> certified radius per sample
    radius_seconds: dict[str, float] = field(default_factory=dict)
    tolerance: float | None = None
    domain: tuple | None = None

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def clean(self) -> int:
        return int((self.predictions == self.labels).sum())

    def rows(self) -> list[SweepRow]:
        out = []
        for method in self.methods:
            for i, eps in enumerate(self.eps):
                certified = int(self.certified[method][:, i].sum())
                out.append(SweepRow(method, eps, self.norm, self.n, self.clean, certified, self.clean / self.n,
                                    certified / self.n, float(self.seconds[method][i])))
        return out

    def radius_stats(self) -> dict[str, dict]:
        """Per method: quantiles of the certified radius over all samples (0 where nothing is certified)."""
        stats = {}
        for method, radii in self.radii.items():
            values = np.quantile(radii, QUANTILES)
            stats[method] = {"median": float(np.median(radii)), "mean": float(radii.mean()),
                             "min": float(radii.min()), "max": float(radii.max()),
                             "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, values)},
                             "certified_somewhere": int((radii > 0).sum()),
                             "tolerance": 0.0 if method in CLOSED_FORM else self.tolerance,
                             "seconds": self.radius_seconds[method]}
        return stats

    def as_dict(self) -> dict:
        out = {"model": self.model, "data": self.data, "norm": self.norm, "n": self.n, "clean": self.clean,
               "clean_accuracy": self.clean / self.n, "eps": self.eps, "methods": self.methods,
               "rows": [r.as_dict() for r in self.rows()],
               "build_seconds": self.build_seconds}
        if self.radii:
            out["radius"] = self.radius_stats()
        return out

    def per_sample_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        flags = [(m, i, f"certified_{m}_{eps:g}") for m in self.methods for i, eps in enumerate(self.eps)]
        radius_columns = [(m, f"radius_{m}") for m in self.methods if m in self.radii]
        writer.writerow(["index", "label", "prediction"] + [c for *_, c in flags] + [c for _, c in radius_columns])
        for k in range(self.n):
            writer.writerow([k, int(self.labels[k]), int(self.predictions[k])]
                            + [int(self.certified[m][k, i]) for m, i, _ in flags]
                            + [f"{self.radii[m][k]:.9g}" for m, _ in radius_columns])
        return buffer.getvalue()

    def write_per_sample(self, path) -> None:
        atomic_write(self.per_sample_csv().encode(), path)


def sweep(model, data: Dataset, eps: list[float], methods: list[str], limit: int | None = None,
          batch_size: int = 256, clip: bool = True, progress: bool = False, alpha: AlphaSettings | None = None,
          norm: str = "linf", radius: bool = False, tolerance: float = DEFAULT_TOLERANCE,
          model_name: str | None = None, rounding: str = "float32") -> SweepResult:
    """Certify every (method, radius) pair over the data set; with `radius`, each sample's largest certified
    radius per method as well (to within `tolerance`, exact up to float32 for closed forms)."""
    eps = sorted({check_eps(e) for e in eps})
    if not eps:
        raise InputError("give at least one radius")
    if radius and not (tolerance > 0 and math.isfinite(tolerance)):
        raise InputError(f"radius tolerance must be a finite number > 0, got {tolerance}")
    for method in methods:
        check_method_norm(method, norm)
    prepared = prepare(model, data, limit, batch_size, clip)
    n = len(prepared.data)
    labels = prepared.data.y.astype(np.int64)
    predictions = np.full(n, -1, dtype=np.int64)
    result = SweepResult(model_name or str(model), prepared.data.name, norm, eps, list(methods), labels, predictions,
                         {}, {}, {}, tolerance=tolerance if radius else None, domain=prepared.domain)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n * len(methods), desc="certify", unit="sample", leave=False)
    try:
        for method in methods:
            if bar is not None:
                bar.set_description(f"certify {method}")
            started = time.perf_counter()
            bounder = certifier(prepared.model, method, prepared.domain, alpha or CERTIFY_ALPHA, norm, rounding)
            result.build_seconds[method] = time.perf_counter() - started
            _sweep_method(result, method, bounder, prepared, batch_size, radius, tolerance, norm, bar)
    finally:
        if bar is not None:
            bar.close()
    return result


def _search_radii(bounder, x, objective, y, eps: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Certified flags [batch, len(eps)] and predictions, by binary search over the sorted radii per sample:
    certified at a radius means certified at every smaller one (its ball holds theirs), and a sample not
    certified at a radius is counted as not certified at the larger ones (at worst conservative). Each sample
    takes about log2(len(eps) + 1) runs of the bound graph instead of len(eps)."""
    n, count = len(y), len(eps)
    radii = np.asarray(eps, dtype=np.float64)
    known = np.full(n, -1)            # largest index certified so far
    failed = np.full(n, count)        # smallest index known not certified
    predictions = None
    while True:
        index = np.flatnonzero(failed - known > 1)
        if not len(index):
            break
        mid = (known[index] + failed[index]) // 2
        shared = (mid == mid[0]).all()   # one radius for the whole run: IBP propagates it once per batch
        feed = radii[mid[0]] if shared else radii[mid].reshape((-1,) + (1,) * (x.ndim - 1))
        logits, lower = bounder(x[index], feed, objective[index])
        if predictions is None:          # the first run holds every sample
            predictions = logits.argmax(axis=1)
            wrong = index[predictions != y]
            failed[wrong] = 0            # misclassified: certified nowhere
        ok = certified_mask(logits, lower, y[index])
        known[index[ok]] = mid[ok]
        failed[index[~ok]] = np.minimum(failed[index[~ok]], mid[~ok])
    flags = np.arange(count)[None, :] <= known[:, None]
    return flags, predictions


def _sweep_method(result: SweepResult, method, bounder, prepared, batch_size, radius, tolerance, norm, bar):
    n, eps = result.n, result.eps
    certified = np.zeros((n, len(eps)), dtype=bool)
    seconds = np.zeros(len(eps))
    radii = np.zeros(n) if radius or method in CLOSED_FORM else None
    radius_seconds = 0.0
    for lo in range(0, n, batch_size):
        x, y = prepared.x[lo:lo + batch_size], result.labels[lo:lo + batch_size]
        objective = margin_objective(y, prepared.n_classes)
        if method in CLOSED_FORM:
            started = time.perf_counter()
            logits, found = radius_search(bounder, method, x, objective, y, norm, prepared.domain, tolerance)
            result.predictions[lo:lo + len(y)] = logits.argmax(axis=1)
            radii[lo:lo + len(y)] = found
            # a radius certified by the graph certifies every smaller ball
            certified[lo:lo + len(y)] = found[:, None] >= np.asarray(eps)[None, :]
            certified[lo:lo + len(y)] &= (logits.argmax(axis=1) == y)[:, None]
            seconds += (time.perf_counter() - started) / len(eps)
        else:
            started = time.perf_counter()
            flags, predicted = _search_radii(bounder, x, objective, y, eps)
            result.predictions[lo:lo + len(y)] = predicted
            certified[lo:lo + len(y)] = flags
            seconds += (time.perf_counter() - started) / len(eps)
            if radius:
                started = time.perf_counter()
                _, found = radius_search(bounder, method, x, objective, y, norm, prepared.domain, tolerance,
                                         known=(np.asarray(eps), certified[lo:lo + len(y)]))
                radii[lo:lo + len(y)] = found
                radius_seconds += time.perf_counter() - started
        if bar is not None:
            bar.update(len(y))
    if method in CLOSED_FORM:
        radius_seconds = float(seconds.sum())
    result.certified[method] = certified
    result.seconds[method] = seconds
    if radius and radii is not None:
        result.radii[method] = radii
        result.radius_seconds[method] = radius_seconds
