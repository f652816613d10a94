"""Properties proved without branching by IBP, CROWN-IBP, CROWN and alpha-CROWN on VNN-COMP 2021 families.

For every instance of mnistfc and acasxu: the margin lower bounds of each method over each input box of the
property (all boxes in one batch, the property's rows fed as the run-time `objective`), proved when every
(box, unsafe conjunct) case has a row with a positive lower bound; each conjunct of several rows also gets the
average of its rows (its weights learned by alpha-CROWN), which refutes it when positive. Bound graphs are built once per network
(seconds per property are run times); onnxruntime and torch use `--threads` threads. Also the bound graph's
time relative to the original forward pass at batch 1, and a check that nothing proved is violated in truth.
Usage: python benchmarks/bounds_bench.py [--families mnistfc acasxu] [--limit N] [--iterations 20] [--lr 0.1]
       [--threads 1] [--give-up] [--no-mixtures]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import graphcert
from graphcert.alpha import AlphaCrown, ProofWatch
from graphcert.export import to_proto
from graphcert.interface import InputSet, perturbed_inputs
from graphcert.model import static_shape
from graphcert.runtime import Session
from graphcert.vnnlib import load_property

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp2021"
GRAPH_METHODS = ["ibp", "crown-ibp", "crown"]
METHODS = GRAPH_METHODS + ["alpha-crown"]
# Issue 4: a widely used linear-relaxation library on this machine (one thread, alpha-CROWN 20 iterations).
REFERENCE = {"mnistfc": {"ibp": "0 (6 ms)", "crown": "25 (32 ms)", "alpha-crown": "26 (1.0 s)"},
             "acasxu": {"ibp": "0 (7 ms)", "crown": "15 (31 ms)", "alpha-crown": "50 (1.1 s)"}}


class Network:
    """One network's bound graphs (run-time objective), alpha-CROWN bounder and forward session."""

    def __init__(self, path: Path, threads: int):
        model = graphcert.load(path)
        source = perturbed_inputs(model)[0]
        self.name = source.name
        self.shape = [d for d in static_shape(source)[1:]]
        boxes = InputSet("box")
        self.sessions = {method: Session(to_proto(graphcert.bound_graph(model, method, boxes, spec="runtime",
                                                                        keep_original=False)), threads=threads)
                         for method in GRAPH_METHODS}
        self.alpha = AlphaCrown(model, "box", spec="runtime")   # torch: its thread count is set globally
        self.forward = Session(to_proto(model), threads=threads)


def margin_lower_bounds(network: Network, method: str, feeds: dict, alpha_feeds: dict, mixing: dict,
                        offset: np.ndarray, iterations: int, lr: float, score, give_up: bool) -> np.ndarray:
    """Lower bounds of the margins, offsets included."""
    if method == "alpha-crown":
        return network.alpha.bounds(alpha_feeds, iterations, lr, stop=ProofWatch(score, iterations, give_up),
                                    **mixing)[0]
    return network.sessions[method].run(feeds, ["margins_lower"])["margins_lower"] + offset


def median_time(run, repeats: int = 20) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_family(family: str, limit: int | None, iterations: int, lr: float, threads: int, give_up: bool,
               use_mixtures: bool) -> dict:
    folder = SHARED / family
    with open(folder / f"{family}_instances.csv") as handle:
        instances = [row for row in csv.reader(handle) if row][:limit]
    truth = {}
    with open(SHARED / "truth.csv") as handle:
        for row in csv.DictReader(handle):
            if row["benchmark"] == family:
                truth[(row["onnx"], row["vnnlib"])] = row["truth"]
    proved, seconds, unsound = defaultdict(int), defaultdict(list), []
    ratios = defaultdict(list)
    networks: dict[str, Network] = {}
    for onnx_name, vnnlib_name, _ in instances:
        if onnx_name not in networks:
            network = networks[onnx_name] = Network(folder / onnx_name, threads)
            x = np.zeros([1] + network.shape, dtype=np.float32)
            forward = median_time(lambda: network.forward.run({network.name: x}))
            for method in GRAPH_METHODS:
                objective = np.zeros((1, 1, 10 if family == "mnistfc" else 5), dtype=np.float32)
                feeds = {f"{network.name}_lower": x, f"{network.name}_upper": x + 0.01, "objective": objective}
                session = network.sessions[method]
                ratios[method].append(median_time(lambda: session.run(feeds)) / forward)
        network = networks[onnx_name]
        found = load_property(folder / vnnlib_name)
        # Rows of every conjunct, then the average of each conjunct's rows (learned weights in alpha-CROWN).
        matrix, offset, rows, mixtures = found.rows_with_mixtures() if use_mixtures else \
            (*found.stacked_rows(), found.conjunct_rows, [])
        lower = np.stack([box[0] for box in found.input_boxes]).reshape([-1] + network.shape)
        upper = np.stack([box[1] for box in found.input_boxes]).reshape([-1] + network.shape)
        objective = np.broadcast_to(matrix.astype(np.float32), (len(lower),) + matrix.shape)
        feeds = network.alpha.feeds(lower, upper, objective=objective)
        base = len(offset) - len(mixtures)
        alpha_feeds = network.alpha.feeds(lower, upper, objective=objective[:, :base])
        mixing = {"offset": offset[:base], "mixtures": mixtures}

        def score(margins) -> float:
            """Positive exactly when proved: the worst case's best refuting margin (offsets included)."""
            return min(float(margins[box, rows[conjunct]].max()) for box, conjunct in found.cases)
        for method in METHODS:
            start = time.perf_counter()
            bounds = margin_lower_bounds(network, method, feeds, alpha_feeds, mixing, offset, iterations, lr,
                                         score, give_up)
            result = score(bounds) > 0
            seconds[method].append(time.perf_counter() - start)
            proved[method] += result
            if result and truth.get((onnx_name, vnnlib_name)) == "violated":
                unsound.append((method, onnx_name, vnnlib_name))
    return {"instances": len(instances), "proved": proved, "seconds": seconds, "ratios": ratios,
            "unsound": unsound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["mnistfc", "acasxu"])
    parser.add_argument("--limit", type=int, default=None, help="first N instances per family")
    parser.add_argument("--iterations", type=int, default=20, help="alpha-CROWN Adam steps")
    parser.add_argument("--lr", type=float, default=0.1, help="alpha-CROWN learning rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--give-up", action="store_true",
                        help="end alpha-CROWN early when the margin cannot reach zero at its recent rate")
    parser.add_argument("--no-mixtures", action="store_true",
                        help="bound each conjunct's rows only, without their (learned) averages")
    args = parser.parse_args()
    if not SHARED.exists():
        raise SystemExit(f"shared benchmarks not found at {SHARED}")
    import torch
    torch.set_num_threads(args.threads)
    for family in args.families:
        found = run_family(family, args.limit, args.iterations, args.lr, args.threads, args.give_up,
                           not args.no_mixtures)
        print(f"\n{family}: {found['instances']} instances, alpha-CROWN {args.iterations} iterations lr {args.lr}"
              f"{' (giving up early)' if args.give_up else ''}, {args.threads} thread(s), "
              f"{'rows only' if args.no_mixtures else 'rows and their averages'}")
        print(f"{'method':12s} {'proved':>7s} {'median s':>9s} {'mean s':>8s} {'graph/forward':>14s}  reference")
        for method in METHODS:
            times = found["seconds"][method]
            ratio = f"{statistics.median(found['ratios'][method]):.0f}x" if method in found["ratios"] else "-"
            print(f"{method:12s} {found['proved'][method]:7d} {statistics.median(times):9.4f} "
                  f"{statistics.mean(times):8.4f} {ratio:>14s}  {REFERENCE[family].get(method, '-')}")
        print(f"proved although violated in truth.csv: {found['unsound'] or 'none'}")


if __name__ == "__main__":
    main()
