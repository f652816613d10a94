"""IBP bound-graph cost relative to the original model, both run by onnxruntime side by side.

For each network: median time of the original forward pass, and relative to it the bound graph of an L-inf ball
of radius 0.01 ("ball": the default bound graph, bounds only; "ball+outputs": also f(x)), of the same ball clipped
to [0, 1] ("clipped": what `certify` builds for images) and of a given box (lower and upper fed directly, as VNN-LIB
properties give them), at batch 1 and batch 256, one thread, interleaved runs.
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


def measure(path: Path, batch: int, repeats: int, threads: int) -> dict[str, float]:
    """Median milliseconds of the original, and each bound graph's median time relative to it."""
    model = graphcert.load(path)
    x_value = perturbed_inputs(model)[0]
    shape = [batch] + [d for d in static_shape(x_value)[1:]]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    ball, clipped = InputSet("linf"), InputSet("linf", (0.0, 1.0))
    graphs = {
        "orig": model,
        "ball": graphcert.bound_graph(model, "ibp", ball, keep_original=False),
        "ball+outputs": graphcert.bound_graph(model, "ibp", ball),
        "clipped": graphcert.bound_graph(model, "ibp", clipped, keep_original=False),
        "box": graphcert.bound_graph(model, "ibp", InputSet("box"), keep_original=False),
    }
    sessions = {name: Session(to_proto(graph), threads=threads) for name, graph in graphs.items()}
    eps = np.full([1] * len(shape), 0.01, dtype=np.float32)  # one radius for all samples, as certify feeds it
    ball_feeds = {x_value.name: x, epsilon_name(model, x_value): eps}
    box_feeds = {f"{x_value.name}_lower": np.clip(x - 0.01, 0, 1), f"{x_value.name}_upper": np.clip(x + 0.01, 0, 1)}
    samples = {name: [] for name in sessions}
    for _ in range(5):  # interleave so drifts of the machine hit all alike
        for name, session in sessions.items():
            samples[name] += timed(session, box_feeds if name == "box" else ball_feeds, repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"orig ms": med["orig"] * 1e3, **{k: med[k] / med["orig"] for k in sessions if k != "orig"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    columns = ["orig ms", "ball", "ball+outputs", "clipped", "box"]
    print(f"{'network':28} {'batch':>5} " + " ".join(f"{c:>13}" for c in columns))
    for path in networks():
        for batch in (1, 256):
            found = measure(path, batch, args.repeats, args.threads)
            print(f"{path.name:28} {batch:5d} " + " ".join(f"{found[c]:13.3f}" if c == "orig ms" else
                                                           f"{found[c]:13.2f}" for c in columns))


if __name__ == "__main__":
    main()
