"""Every shared VNN-COMP 2021 family through `graphcert verify`, one process per instance, as a user runs it.

Usage:
  python benchmarks/verify_families.py families [--families F ...] [--per-family 5] [--fraction 0.1] [--cap 15]
  python benchmarks/verify_families.py abcrown [--per-family 8] [--cap 60]
  (both take --method, --rounding, --memory, --threads, and --match SUBSTRING to keep instances whose onnx name has it)

`families` runs a sample of each family's instances (spread evenly over its instances file) at a fraction of
the competition timeout (capped); `abcrown` runs a sample of the instances of
reference-abcrown-cpu.csv at its 60 s cap and prints both tools' decided counts and total seconds on exactly
those instances. Each instance is `python cli.py verify MODEL SPEC --timeout T --out RESULT` in a fresh
process (process start, model loading and graph building inside the timeout), whose wall time and peak
resident memory (wait4) are measured. Checks: no crash (exit code 2 or a signal), every run within T + 1 s,
no unsound answer against truth.csv, every `sat` counterexample confirmed by onnxruntime on the original
model (re-read from the result file, so the check is independent of the verifier's own).
"""
from __future__ import annotations

import argparse
import collections
import compileall
import csv
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "benchmarks" / "vnncomp2021"
FAMILIES = ("test", "acasxu", "mnistfc", "eran", "oval21", "cifar10_resnet", "marabou-cifar10", "verivital")
ANSWERS = {"unsat": "holds", "sat": "violated", "unknown": "unknown", "timeout": "timeout"}
ABCROWN = {"safe": "holds", "unsafe": "violated", "timeout": "timeout", "unknown": "unknown"}


def spread(rows: list, count: int | None) -> list:
    if count is None or count >= len(rows):
        return rows
    return [rows[round(i * (len(rows) - 1) / max(1, count - 1))] for i in range(count)] if count > 1 else rows[:1]


def truth_table() -> dict:
    with open(SHARED / "truth.csv", newline="") as handle:
        return {(r["benchmark"], r["onnx"], r["vnnlib"]): r["truth"] for r in csv.DictReader(handle)}


def confirmed(model: pathlib.Path, spec: pathlib.Path, result_text: str) -> bool:
    """The counterexample of a `sat` result file, run on the original model by onnxruntime, meets the spec."""
    import re

    import onnx

    from graphcert.runtime import Session
    from graphcert.vnnlib import load_property
    values = dict(re.findall(r"\((X_\d+)\s+([-+0-9.eEinfa]+)\)", result_text))
    x = np.array([float(values[f"X_{i}"]) for i in range(len(values))], dtype=np.float32)
    proto = onnx.load(model)
    constants = {init.name for init in proto.graph.initializer}
    [x_info] = [i for i in proto.graph.input if i.name not in constants]
    dims = [d.dim_value or 1 for d in x_info.type.tensor_type.shape.dim]
    session = Session(proto)
    y = session.run({x_info.name: x.reshape(dims)})[session.output_names[0]].reshape(-1)
    return load_property(spec).is_counterexample(x, y)


def run_one(model: pathlib.Path, spec: pathlib.Path, timeout: float, memory: str | None, method: str,
            rounding: str | None = None, threads: int | None = None) -> dict:
    """One `cli.py verify` process: answer, wall seconds, peak resident MB, exit code, stderr's last line."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.txt"
        command = [sys.executable, str(ROOT / "cli.py"), "verify", str(model), str(spec), "--timeout", f"{timeout:g}",
                   "--out", str(out), "--method", method] + (["--memory", memory] if memory else []) \
            + (["--rounding", rounding] if rounding else []) + (["--threads", str(threads)] if threads else [])
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        began = time.monotonic()
        with open(pathlib.Path(tmp) / "stderr.txt", "w+b") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
            # Reap it ourselves (not through Popen) to read this process's own peak memory.
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.monotonic() - began
            process.returncode = os.waitstatus_to_exitcode(status)
            stderr.seek(0)
            errors = stderr.read().decode(errors="replace").strip().splitlines()
        text = out.read_text() if out.exists() else ""
    code = process.returncode
    answer = ANSWERS.get(text.split("\n", 1)[0].strip(), "error") if text else "error"
    # A run its supervisor ended reports the worker's peak itself (the worker is not reaped before the answer).
    import re
    stated = re.search(r"peak resident memory ([0-9.]+) (GB|MB|kB)", "\n".join(errors))
    peak = usage.ru_maxrss / 1024
    if stated:
        peak = max(peak, float(stated.group(1)) * {"GB": 1024, "MB": 1, "kB": 1 / 1024}[stated.group(2)])
    return {"answer": answer, "seconds": seconds, "code": code, "text": text, "peak": peak,
            "stderr": errors[-1:] or [""]}


def run_rows(family: str, rows: list, timeout_of, args, truth) -> list[dict]:
    found = []
    for onnx_name, spec_name, competition_timeout, *_ in rows:
        model, spec = SHARED / family / onnx_name, SHARED / family / spec_name
        timeout = timeout_of(float(competition_timeout))
        record = run_one(model, spec, timeout, args.memory, args.method, args.rounding, args.threads)
        record.update(family=family, onnx=os.path.basename(onnx_name), vnnlib=os.path.basename(spec_name),
                      timeout=timeout, truth=truth.get((family, os.path.basename(onnx_name),
                                                        os.path.basename(spec_name)), "absent"))
        record["confirmed"] = confirmed(model, spec, record["text"]) if record["answer"] == "violated" else None
        found.append(record)
        print(f"  {record['onnx']} {record['vnnlib']}: {record['answer']} (truth {record['truth']}) "
              f"{record['seconds']:.1f}/{timeout:g} s {record['peak']:.0f} MB exit {record['code']}"
              + (f" cex {'confirmed' if record['confirmed'] else 'NOT CONFIRMED'}" if record["confirmed"] is not None
                 else "") + (f" | {record['stderr'][0][:140]}" if record["answer"] != "holds" else ""), flush=True)
    return found


def checks(records: list[dict]) -> dict:
    crashes = [r for r in records if r["code"] not in (0, 10, 20, 30) or r["answer"] == "error"]
    late = [r for r in records if r["seconds"] > r["timeout"] + 1.0]
    unsound = [r for r in records if (r["answer"], r["truth"]) in (("holds", "violated"), ("violated", "holds"))]
    unconfirmed = [r for r in records if r["confirmed"] is False]
    decidable = [r for r in records if r["truth"] in ("holds", "violated")]
    decided = [r for r in decidable if r["answer"] == r["truth"]]
    return {"n": len(records), "crashes": len(crashes), "late": len(late), "unsound": len(unsound),
            "unconfirmed": len(unconfirmed), "decidable": len(decidable), "decided": len(decided),
            "answers": collections.Counter(r["answer"] for r in records),
            "median": float(np.median([r["seconds"] for r in records])) if records else 0.0,
            "worst_over": max((r["seconds"] - r["timeout"] for r in records), default=0.0)}


def families(args) -> None:
    truth = truth_table()
    print(f"families: {args.per_family} per family, timeout = min({args.cap:g} s, {args.fraction:g} x competition), "
          f"method {args.method}, memory {args.memory or 'default (half of available)'}")
    table = []
    for family in args.families:
        with open(SHARED / family / f"{family}_instances.csv", newline="") as handle:
            rows = spread([r for r in csv.reader(handle) if r and args.match in r[0]], args.per_family)
        print(f"{family}:", flush=True)
        records = run_rows(family, rows, lambda t: min(args.cap, args.fraction * t), args, truth)
        summary = checks(records)
        summary["peak"] = max(r["peak"] for r in records)
        table.append((family, summary))
    print("\n| family | run | decided / decidable | answers | median s | worst s over T | peak RSS MB | "
          "crashes | late (> T+1) | unsound | cex unconfirmed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for family, s in table:
        answers = ", ".join(f"{k} {v}" for k, v in sorted(s["answers"].items()))
        print(f"| {family} | {s['n']} | {s['decided']} / {s['decidable']} | {answers} | {s['median']:.1f} | "
              f"{s['worst_over']:+.2f} | {s['peak']:.0f} | {s['crashes']} | {s['late']} | {s['unsound']} | "
              f"{s['unconfirmed']} |")


def abcrown(args) -> None:
    truth = truth_table()
    with open(SHARED / "reference-abcrown-cpu.csv", newline="") as handle:
        reference = list(csv.DictReader(handle))
    print(f"side by side with alpha,beta-CROWN (reference-abcrown-cpu.csv, same CPU, its runs): {args.per_family} "
          f"per family, cap {args.cap:g} s, method {args.method}")
    lines = []
    for family in sorted({r["family"] for r in reference} & set(args.families)):
        rows = spread([r for r in reference if r["family"] == family and args.match in r["onnx"]], args.per_family)
        if not rows:
            continue
        print(f"{family}:", flush=True)
        ours = run_rows(family, [[r["onnx"], r["vnnlib"], str(args.cap)] for r in rows], lambda t: t, args, truth)
        theirs_decided = sum(ABCROWN.get(r["abcrown_answer"], "unknown") in ("holds", "violated")
                             and ABCROWN[r["abcrown_answer"]] == r["truth"] for r in rows)
        theirs_seconds = sum(min(float(r["wall_s"]), args.cap) for r in rows)
        s = checks(ours)
        # Both tools' times capped alike (a run past the cap is a timeout at the cap); lateness is the late column.
        capped, raw = sum(min(r["seconds"], args.cap) for r in ours), sum(r["seconds"] for r in ours)
        lines.append(f"| {family} | {len(rows)} | {s['decided']} | {capped:.0f} ({raw:.0f} uncapped) | "
                     f"{theirs_decided} | {theirs_seconds:.0f} | {s['unsound']} | {s['late']} | "
                     f"{max(r['peak'] for r in ours):.0f} |")
    print(f"\n| family | instances | graphcert decided | graphcert total s (each at most {args.cap:g}) | abcrown decided | "
          f"abcrown total s (each at most {args.cap:g}) | "
          "graphcert unsound | graphcert late | graphcert peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("families", "abcrown"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--per-family", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.1, help="of the competition timeout (families)")
    parser.add_argument("--cap", type=float, default=15.0, help="seconds at most per instance")
    parser.add_argument("--memory", help="--memory for every run (default: verify's own default)")
    parser.add_argument("--method", default="crown")
    parser.add_argument("--rounding", choices=("float32", "real"), help="--rounding for every run (default: verify's)")
    parser.add_argument("--threads", type=int, help="--threads for every run (default: verify's, the free cores)")
    parser.add_argument("--match", default="", help="only instances whose onnx file name contains this")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"benchmarks not found at {SHARED}", file=sys.stderr)
        return 2
    # Byte-compiled once, as an installed package is at install time: with PYTHONDONTWRITEBYTECODE set (as on
    # this machine) each process would compile graphcert's modules again (0.3 s of every run).
    for package in ("graphcert", "passes"):
        compileall.compile_dir(ROOT / package, quiet=1)
    (families if args.mode == "families" else abcrown)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
