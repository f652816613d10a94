"""Figures: certified accuracy against the radius, per method, and cactus plots of verification runs.

matplotlib draws with its Agg backend (no display needed); the format follows the file's extension (.png or
.svg), and files are written atomically.
"""
from __future__ import annotations

import csv
import io
import os

import numpy as np

from .errors import InputError
from .files import atomic_write

FORMATS = {".png": "png", ".svg": "svg"}
DECIDED = ("holds", "violated")
REFERENCE_DECIDED = ("safe", "unsafe", "holds", "violated", "sat", "unsat")


def figure_format(path) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise InputError(f"plot {path}: give a file ending in .png or .svg")
    return FORMATS[ext]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def figure_bytes(fig, fmt: str, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {}
    fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
    _pyplot().close(fig)
    return buffer.getvalue()


def save_figure(fig, path) -> None:
    atomic_write(figure_bytes(fig, figure_format(path)), path)


def curves_figure(result, title: str | None = None):
    """Certified accuracy against the radius, one line per method, with clean accuracy as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    eps = np.asarray(result.eps)
    for method in result.methods:
        accuracy = result.certified[method].mean(axis=0) * 100
        ax.plot(eps, accuracy, marker="o", markersize=4, label=method)
    ax.axhline(result.clean / result.n * 100, color="0.4", linestyle="--", linewidth=1,
               label=f"clean ({result.clean / result.n:.1%})")
    norm = {"linf": "L∞", "l2": "L2"}.get(result.norm, result.norm)
    ax.set_xlabel(f"{norm} radius ε")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=min(0.0, float(eps.min())))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title or f"{os.path.basename(str(result.model))} on {result.n} samples of {result.data}",
                 fontsize="medium")
    return fig


def read_reference(path) -> list[dict]:
    """Rows of a results CSV of another tool: columns onnx, vnnlib, an answer (abcrown_answer, status or
    answer) and a time (wall_s or seconds)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"reference results not found: {path}")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise InputError(f"{path}: no rows")
    columns = rows[0].keys()
    answer = next((c for c in ("abcrown_answer", "answer", "status", "result") if c in columns), None)
    seconds = next((c for c in ("wall_s", "seconds", "time") if c in columns), None)
    if answer is None or seconds is None or not {"onnx", "vnnlib"} <= set(columns):
        raise InputError(f"{path}: needs columns onnx, vnnlib, an answer (abcrown_answer, answer or status) and "
                         f"a time (wall_s or seconds)")
    try:
        return [{"key": _key(r["onnx"], r["vnnlib"]), "decided": r[answer].strip().lower() in REFERENCE_DECIDED,
                 "seconds": float(r[seconds])} for r in rows]
    except ValueError:
        raise InputError(f"{path}: the {seconds} column must hold numbers") from None


def _key(onnx_name: str, vnnlib_name: str) -> tuple[str, str]:
    return os.path.basename(onnx_name.strip()), os.path.basename(vnnlib_name.strip())


def _cactus_line(ax, seconds: list[float], label: str, **style) -> None:
    times = np.sort(np.asarray(seconds, dtype=float))
    if len(times):
        ax.step(times, np.arange(1, len(times) + 1), where="post", label=f"{label} ({len(times)})", **style)
    else:
        ax.plot([], [], label=f"{label} (0)", **style)


def cactus_figure(results, reference=None, reference_name: str = "reference", title: str | None = None):
    """Solved (holds or violated) instances against time; with `reference` rows (read_reference), the other
    tool's curve on the same instances beside ours."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ours = [r.seconds for r in results if r.status in DECIDED]
    _cactus_line(ax, ours, "graphcert", linewidth=2)
    if reference is not None:
        keys = {_key(r.onnx, r.vnnlib) for r in results}
        matched = [row for row in reference if row["key"] in keys]
        if not matched:
            raise InputError("the reference results share no (onnx, vnnlib) instance with this run")
        _cactus_line(ax, [row["seconds"] for row in matched if row["decided"]], reference_name, linestyle="--")
    ax.set_xlabel("time per instance (s)")
    ax.set_ylabel("instances solved")
    positive = [s for s in ours if s > 0]
    if positive and max(positive) / max(min(positive), 1e-9) > 100:
        ax.set_xscale("log")
    ax.set_ylim(0, max(len(results), 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or f"{len(results)} instances", fontsize="medium")
    return fig


def plot_curves(result, path) -> None:
    figure_format(path)
    save_figure(curves_figure(result), path)


def plot_cactus(results, path, reference_path=None) -> None:
    figure_format(path)
    reference = read_reference(reference_path) if reference_path else None
    name = os.path.splitext(os.path.basename(os.fspath(reference_path)))[0] if reference_path else "reference"
    save_figure(cactus_figure(results, reference, name), path)
