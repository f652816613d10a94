"""Two or more checkouts of graphcert side by side on the instances of reference-abcrown-cpu.csv, run alternately
per instance (one fresh `cli.py verify` process each, `verify_families.run_one`), so that a shared machine's load
falls on every version alike.

Usage:
  python benchmarks/verify_versions.py FAMILY MATCH PER_FAMILY ROUNDING NAME=CHECKOUT [NAME=CHECKOUT ...]
  e.g. python benchmarks/verify_versions.py eran relu 20 real old=/work/wt-old new=/work/main
(MATCH: a substring of the onnx name, "" for all; each CHECKOUT needs its graphcert/passes link.)
Prints one line per instance (truth, α,β-CROWN's answer and seconds, each version's answer, seconds and the
load average before it), then per version: decided (answer = the reference's truth), total seconds, unsound,
peak resident MB, and α,β-CROWN's decided and total seconds on the same instances (at most the cap each).
"""
from __future__ import annotations

import csv
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import verify_families as vf  # noqa: E402

CAP = 60.0


def main(argv: list[str]) -> int:
    family, match, per, rounding = argv[0], argv[1], int(argv[2]), argv[3]
    versions = [(name, pathlib.Path(path)) for name, path in (v.split("=", 1) for v in argv[4:])]
    truth = vf.truth_table()
    with open(vf.SHARED / "reference-abcrown-cpu.csv", newline="") as handle:
        reference = [r for r in csv.DictReader(handle) if r["family"] == family and match in r["onnx"]]
    rows = vf.spread(reference, per)
    totals = {name: [0, 0.0, 0, 0.0] for name, _ in versions}
    print(f"{family} {match!r}: {len(rows)} instances, rounding {rounding}, cap {CAP:g} s", flush=True)
    for r in rows:
        model, spec = vf.SHARED / family / r["onnx"], vf.SHARED / family / r["vnnlib"]
        expected = r["truth"] or truth.get((family, r["onnx"], r["vnnlib"]), "?")
        line = [r["vnnlib"].split("/")[-1], f"truth {expected}",
                f"abcrown {vf.ABCROWN[r['abcrown_answer']]} {float(r['wall_s']):.1f}"]
        for name, root in versions:
            vf.ROOT = root
            load = os.getloadavg()[0]
            found = vf.run_one(model, spec, CAP, None, "crown", rounding)
            decided = found["answer"] in ("holds", "violated")
            total = totals[name]
            total[0] += decided and found["answer"] == expected
            total[1] += found["seconds"]
            total[2] += decided and expected in ("holds", "violated") and found["answer"] != expected
            total[3] = max(total[3], found["peak"])
            line.append(f"{name} {found['answer']} {found['seconds']:.1f} (load {load:.1f})")
        print(" | ".join(line), flush=True)
    theirs = sum(vf.ABCROWN.get(r["abcrown_answer"]) in ("holds", "violated")
                 and vf.ABCROWN[r["abcrown_answer"]] == r["truth"] for r in rows)
    their_seconds = sum(min(float(r["wall_s"]), CAP) for r in rows)
    print("| family | instances | run | decided | total s | unsound | peak MB | abcrown decided | abcrown total s |")
    for name, (decided, seconds, unsound, peak) in totals.items():
        print(f"| {family} {match} | {len(rows)} | {name} | {decided} | {seconds:.0f} | {unsound} | {peak:.0f} | "
              f"{theirs} | {their_seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
