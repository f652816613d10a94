"""Search strength: how many planted counterexamples (tests/planted.py) and hard shared counterexamples the attack
finds, alone and inside `verify`, within a fixed time.

Usage:
  python benchmarks/planted_bench.py attack [--seconds 2] [--seeds 4] [--shared] [--families N]
  python benchmarks/planted_bench.py verify [--timeout 5] [--seeds 2] [--method crown] [--shared]

`attack` runs the root attack of `verify` (`Search.attack_boxes` on the property's own boxes, with verify's root
settings) for `--seconds` on every planted case (seeds x architectures x placements, one box and one disjunct,
then several) and, with `--shared`, on the shared instances whose counterexamples are hard to find (ACAS Xu
1_9 property 7, the three mnistfc counterexamples graphcert long missed) and, with `--families N`, on N
violated instances (truth.csv) of every other shared family. `verify` runs `verify` itself
(planted cases and their near-miss twins). Every counterexample counted is re-run by onnxruntime on the
original model. To compare attacks, run the same command with PYTHONPATH pointing at another checkout of
graphcert (this file only needs tests/planted.py beside it).
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SHARED = ROOT.parent / "shared" / "benchmarks" / "vnncomp2021"
HARD = [("acasxu", "ACASXU_run2a_1_9_batch_2000.onnx", "prop_7.vnnlib"),
        ("mnistfc", "mnist-net_256x2.onnx", "prop_0_0.05.vnnlib"),
        ("mnistfc", "mnist-net_256x4.onnx", "prop_14_0.05.vnnlib"),
        ("mnistfc", "mnist-net_256x6.onnx", "prop_3_0.05.vnnlib")]


def planted_cases(seeds: int, planted: bool = True):
    from planted import ARCHITECTURES, PLACEMENTS, make_case
    for seed in range(seeds):
        for architecture in ARCHITECTURES:
            for placement in PLACEMENTS:
                several = seed % 2 == 1
                yield make_case(seed, architecture, placement, planted, boxes=3 if several else 1,
                                disjuncts=2 if several else 1, saturated=seed % 4 == 3)


def root_attack(model, spec, seconds: float) -> tuple[bool, float, np.ndarray | None]:
    """(counterexample confirmed by onnxruntime, seconds used, the counterexample) of verify's root attack
    given `seconds`."""
    import torch

    from graphcert.verify.network import Network
    from graphcert.verify.search import Search
    from graphcert.vnnlib import load_property
    torch.set_num_threads(1)
    prop, network = load_property(spec), Network(model)
    began = time.monotonic()
    search = Search(prop, network, began + seconds)
    lower, upper, alive = prop.root_boxes()
    found = search.attack_boxes(lower, upper, alive, budget=1.0, samples=1024, restarts=32, steps=100)
    return found, time.monotonic() - began, search.counterexample[0] if found else None


def run_attack(args) -> None:
    folder = pathlib.Path(tempfile.mkdtemp())
    counts = collections.Counter()
    totals = collections.Counter()
    for case in planted_cases(args.seeds):
        model, spec = case.write(folder)
        found, seconds, point = root_attack(model, spec, args.seconds)
        # The search confirmed it with onnxruntime; the case's own reading of its property agrees.
        assert not found or case.violates(point), f"{case.name}: unconfirmed counterexample"
        key = case.name.split("_")[1]                     # the placement
        totals[key] += 1
        counts[key] += int(found)
        print(f"{case.name:45s} {'found' if found else '-':6s} {seconds:6.2f}s", flush=True)
    print("planted found by placement:", {k: f"{counts[k]}/{totals[k]}" for k in totals},
          f"total {sum(counts.values())}/{sum(totals.values())}")
    if args.shared:
        for family, onnx_name, spec_name in HARD:
            found, seconds, _ = root_attack(SHARED / family / onnx_name, SHARED / family / spec_name, args.seconds)
            print(f"{family} {onnx_name} {spec_name}: {'found' if found else '-'} {seconds:.2f}s", flush=True)
    if args.families:
        import resource
        for family, model, spec in violated_elsewhere(args.families):
            found, seconds, _ = root_attack(model, spec, args.seconds)
            print(f"{family} {model.name} {spec.name}: {'found' if found else '-'} {seconds:.2f}s", flush=True)
        print(f"peak resident {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def violated_elsewhere(per_family: int):
    """(family, onnx, spec) of up to `per_family` violated instances (truth.csv) of each family other than
    acasxu, mnistfc and test, evenly spread."""
    import csv
    by_family = collections.defaultdict(list)
    with open(SHARED / "truth.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["truth"] == "violated" and row["benchmark"] not in ("acasxu", "mnistfc", "test"):
                by_family[row["benchmark"]].append(row)
    for family, rows in sorted(by_family.items()):
        folder = SHARED / family
        for row in rows[::max(1, len(rows) // per_family)][:per_family]:
            yield family, next(folder.rglob(row["onnx"])), next(folder.rglob(row["vnnlib"]))


def run_verify(args) -> None:
    from graphcert.verify import verify
    folder = pathlib.Path(tempfile.mkdtemp())
    table = collections.Counter()
    for planted in (True, False):
        for case in planted_cases(args.seeds, planted):
            model, spec = case.write(folder)
            result = verify(model, spec, timeout=args.timeout, method=args.method)
            if result.status == "violated":
                assert case.violates(result.counterexample[0]), f"{case.name}: unconfirmed counterexample"
            wrong = result.status == ("holds" if planted else "violated")
            table[("planted" if planted else "twin", result.status)] += 1
            print(f"{case.name:45s} {result.status:9s} {result.seconds:6.2f}s{'  UNSOUND' if wrong else ''}",
                  flush=True)
    print(dict(table))
    if args.shared:
        for family, onnx_name, spec_name in HARD:
            result = verify(SHARED / family / onnx_name, SHARED / family / spec_name, timeout=args.timeout,
                            method=args.method)
            print(f"{family} {onnx_name} {spec_name}: {result.status} {result.seconds:.2f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    attack = sub.add_parser("attack")
    attack.add_argument("--seconds", type=float, default=2.0)
    attack.add_argument("--seeds", type=int, default=4)
    attack.add_argument("--shared", action="store_true")
    attack.add_argument("--families", type=int, default=0, metavar="N",
                        help="also N violated instances of every other shared family")
    check = sub.add_parser("verify")
    check.add_argument("--timeout", type=float, default=5.0)
    check.add_argument("--seeds", type=int, default=2)
    check.add_argument("--method", default="crown")
    check.add_argument("--shared", action="store_true")
    args = parser.parse_args()
    run_attack(args) if args.mode == "attack" else run_verify(args)


if __name__ == "__main__":
    main()
