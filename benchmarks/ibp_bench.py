"""IBP bound-graph cost relative to the original model, both run by onnxruntime side by side.

For each network: median time of the original forward pass and of the bound graph (bounds only, and with
the original outputs kept), at batch 1 and batch 256, one thread, interleaved runs.
Usage: python benchmarks/ibp_bench.py [--repeats 50] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import graphcert
from graphcert.export import to_proto
from graphcert.interface import InputSet, epsilon_name, perturbed_inputs
from graphcert.model import static_shape
from graphcert.runtime import Session

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "benchmarks" / "vnncomp2021"


def networks() -> list[Path]:
    found = sorted((SHARED / "mnistfc").glob("*.onnx")) if SHARED.exists() else []
    return found + sorted((REPO / "models").glob("*.onnx"))


def timed(session: Session, feeds: dict, repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(feeds)
        runs.append(time.perf_counter() - start)
    return runs


def measure(path: Path, batch: int, repeats: int, threads: int) -> tuple[float, float, float]:
    model = graphcert.load(path)
    x_value = perturbed_inputs(model)[0]
    shape = [batch] + [d for d in static_shape(x_value)[1:]]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    original = Session(to_proto(model), threads=threads)
    sets = InputSet("linf", (0.0, 1.0))
    bounds_only = Session(to_proto(graphcert.bound_graph(model, "ibp", sets, keep_original=False)), threads=threads)
    with_outputs = Session(to_proto(graphcert.bound_graph(model, "ibp", sets)), threads=threads)
    feeds = {x_value.name: x, epsilon_name(model, x_value): np.float32(0.01)}
    samples = {"orig": [], "bounds": [], "full": []}
    for _ in range(5):  # interleave so drifts of the machine hit all three alike
        samples["orig"] += timed(original, feeds, repeats)
        samples["bounds"] += timed(bounds_only, feeds, repeats)
        samples["full"] += timed(with_outputs, feeds, repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return med["orig"], med["bounds"] / med["orig"], med["full"] / med["orig"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"{'network':28} {'batch':>5} {'orig ms':>9} {'bounds/orig':>12} {'bounds+outputs/orig':>20}")
    for path in networks():
        for batch in (1, 256):
            orig, ratio, ratio_full = measure(path, batch, args.repeats, args.threads)
            print(f"{path.name:28} {batch:5d} {orig * 1e3:9.3f} {ratio:12.2f} {ratio_full:20.2f}")


if __name__ == "__main__":
    main()
