"""What certifying the float32 model costs, side by side with real arithmetic in one run:

- certified accuracy of every shipped model with rounding="float32" (the default) and "real" on the MNIST test
  set (L-inf models with ibp/crown, L2 models with lipschitz);
- with --half, the same for float16 copies of the L-inf models (`graphcert.dtypes.narrowed`: weights rounded to
  float16), whose certificates hold for float16 arithmetic (graphcert.arithmetic);
- with --verify N, `verify` on the first N instances of each shared VNN-COMP 2021 family (acasxu, mnistfc)
  whose known answer is `holds` (truth.csv): how many are proved in each arithmetic, at --timeout seconds.

    python benchmarks/float32_cost.py [--limit N] [--half] [--verify N --timeout S] [--skip-certify]
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile

import onnx

from graphcert.certify import certify
from graphcert.data import load_dataset
from graphcert.dtypes import narrowed
from graphcert.models import shipped_path

RUNS = [("mnist_mlp", "ibp", 0.01, "linf"), ("mnist_mlp", "crown", 0.01, "linf"), ("mnist_cnn", "ibp", 0.01, "linf"),
        *[(m, "lipschitz", r, "l2") for m in ("mnist_mlp_gloro", "mnist_cnn_gloro", "mnist_lipmlp")
          for r in (0.1, 0.3, 0.5)]]
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "benchmarks", "vnncomp2021")
FAMILIES = ("acasxu", "mnistfc")


def certify_table(limit, half: bool) -> None:
    data = load_dataset("mnist-test")
    print(f"{'model':16} {'method':10} {'eps':>5} {'norm':5} {'real %':>8} {'float32 %':>10} {'cost':>7} {'s real':>7} "
          f"{'s f32':>7}")
    runs = [(f"{m}-fp16", method, eps, norm) for m, method, eps, norm in RUNS if norm == "linf"] if half else RUNS
    folder = tempfile.mkdtemp()
    for model, method, eps, norm in runs:
        path = shipped_path(model.replace("-fp16", ""))
        if model.endswith("-fp16"):
            path = os.path.join(folder, f"{model}.onnx")
            onnx.save(narrowed(onnx.load(shipped_path(model[:-5]))), path)
        real = certify(path, data, eps, method=method, norm=norm, limit=limit, rounding="real")
        f32 = certify(path, data, eps, method=method, norm=norm, limit=limit)
        print(f"{model:16} {method:10} {eps:5g} {norm:5} {100 * real.certified_accuracy:8.2f} "
              f"{100 * f32.certified_accuracy:10.2f} {100 * (real.certified_accuracy - f32.certified_accuracy):7.2f} "
              f"{real.seconds:7.1f} {f32.seconds:7.1f}", flush=True)


def verify_table(count: int, timeout: float) -> None:
    from graphcert.verify import verify
    with open(os.path.join(SHARED, "truth.csv")) as f:
        truth = [r for r in csv.DictReader(f) if r["truth"] == "holds"]
    print(f"{'family':8} {'instance':45} {'real':>8} {'s':>6} {'float32':>8} {'s':>6}")
    for family in FAMILIES:
        proved = {"real": 0, "float32": 0}
        for row in [r for r in truth if r["benchmark"] == family][:count]:
            onnx_path = os.path.join(SHARED, family, row["onnx"])
            spec = os.path.join(SHARED, family, row["vnnlib"])
            line = f"{family:8} {row['onnx'][:30] + ' ' + row['vnnlib']:45}"
            for rounding in ("real", "float32"):
                result = verify(onnx_path, spec, timeout=timeout, rounding=rounding)
                proved[rounding] += result.status == "holds"
                line += f" {result.status:>8} {result.seconds:6.1f}"
            print(line, flush=True)
        print(f"{family}: holds proved, real {proved['real']}, float32 {proved['float32']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int)
    parser.add_argument("--verify", type=int, default=0, help="instances per family whose answer is holds")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--skip-certify", action="store_true")
    parser.add_argument("--half", action="store_true", help="float16 copies of the L-inf models instead")
    args = parser.parse_args()
    if not args.skip_certify:
        certify_table(args.limit, args.half)
    if args.verify:
        verify_table(args.verify, args.timeout)


if __name__ == "__main__":
    main()
