"""VNN-COMP 2021 families through `graphcert verify --instances`, compared with the competition's truth.

Usage: python benchmarks/verify_bench.py [--families mnistfc acasxu] [--method crown] [--timeout-scale 1]
                                         [--limit N] [--out-dir DIR]
--limit N runs N instances per family spread evenly over its instances file. Prints, per family, the answers
against truth.csv, how many decidable instances (truth holds or violated) were decided, median seconds,
and any unsound answer (holds where the truth is violated), which must never happen.
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import pathlib
import statistics
import sys
import tempfile

from graphcert.verify import run_instances

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp2021"


def sampled_rows(instances: pathlib.Path, limit: int | None) -> list[list[str]]:
    with open(instances, newline="") as handle:
        rows = [r for r in csv.reader(handle) if r]
    if limit is None or limit >= len(rows):
        return rows
    return [rows[round(i * (len(rows) - 1) / max(1, limit - 1))] for i in range(limit)] if limit > 1 else rows[:1]


def truth_table() -> dict[tuple[str, str, str], str]:
    with open(SHARED / "truth.csv", newline="") as handle:
        return {(r["benchmark"], r["onnx"], r["vnnlib"]): r["truth"] for r in csv.DictReader(handle)}


def run_family(family: str, args, truth) -> dict:
    folder = SHARED / family
    rows = sampled_rows(folder / f"{family}_instances.csv", args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        selection = pathlib.Path(tmp) / "instances.csv"
        selection.write_text("".join(f"{folder / o},{folder / v},{t}\n" for o, v, t, *_ in rows))
        out_csv = os.path.join(args.out_dir, f"{family}_results.csv") if args.out_dir else None
        results = run_instances(selection, out_csv, method=args.method, progress=sys.stderr.isatty(),
                                timeout_scale=args.timeout_scale)
    table = collections.Counter()
    unsound = []
    for r in results:
        expected = truth.get((family, os.path.basename(r.onnx), os.path.basename(r.vnnlib)), "absent")
        answer = r.status if r.status in ("holds", "violated", "unknown", "timeout") else "error"
        table[(answer, expected)] += 1
        if (answer, expected) in (("holds", "violated"), ("violated", "holds")):
            unsound.append(f"{os.path.basename(r.onnx)} {os.path.basename(r.vnnlib)}: {answer}, truth {expected}")
    decidable = sum(v for (a, e), v in table.items() if e in ("holds", "violated"))
    decided = sum(v for (a, e), v in table.items() if a == e and e in ("holds", "violated"))
    return {"results": results, "table": table, "unsound": unsound, "decidable": decidable, "decided": decided,
            "median": statistics.median(r.seconds for r in results) if results else 0.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["mnistfc", "acasxu"])
    parser.add_argument("--method", default="crown")
    parser.add_argument("--timeout-scale", type=float, default=1.0)
    parser.add_argument("--limit", type=int, help="instances per family, spread evenly")
    parser.add_argument("--out-dir", help="write <family>_results.csv here")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"benchmarks not found at {SHARED}", file=sys.stderr)
        return 2
    truth = truth_table()
    print(f"method={args.method} timeout-scale={args.timeout_scale} limit={args.limit}")
    for family in args.families:
        summary = run_family(family, args, truth)
        answers = collections.Counter()
        for (answer, _), count in summary["table"].items():
            answers[answer] += count
        print(f"\n{family}: {len(summary['results'])} instances, median {summary['median']:.2f} s, decided "
              f"{summary['decided']}/{summary['decidable']} decidable")
        print("  answers: " + ", ".join(f"{a} {answers[a]}" for a in ("holds", "violated", "unknown", "timeout", "error")))
        print("  answer vs truth: " + ", ".join(f"{a}/{e} {n}" for (a, e), n in sorted(summary["table"].items())))
        print(f"  unsound answers: {len(summary['unsound'])}" + "".join(f"\n    {u}" for u in summary["unsound"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
