"""Certified training on MNIST: accuracy and time of both backends, side by side in one run.

Cases (all on mnist5k, 2 warm-up + 8 ramp-up epochs, batch 256, Adam 1e-3, no held-out split; certified on
the shipped 10,000-image MNIST test set):
- mlp-ibp: the 784-100-100-100-10 MLP trained with IBP at eps = 0.01, certified at eps = 0.01 and 0.1;
- cnn-crown-ibp: the small CNN trained with CROWN-IBP at eps = 0.1 (torch only: onnxruntime-training
  1.19 has no CPU kernel for ConvTransposeGrad, which CROWN needs to go back through convolutions);
- cnn-ibp: the small CNN trained with IBP at eps = 0.1, certified by IBP and CROWN-IBP.
Every case runs in a fresh process; the ort-training cases run in the interpreter given by --ort-python
(a virtual environment with onnxruntime-training, see .ci/run), or are left out.

Usage: python benchmarks/train_bench.py [--ort-python VENV/bin/python] [--cases mlp-ibp,cnn-ibp] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "mlp-ibp": dict(arch="mlp", eps=0.01, method="ibp", certify=[(0.01, "ibp"), (0.1, "ibp")]),
    "cnn-crown-ibp": dict(arch="cnn", eps=0.1, method="crown-ibp", certify=[(0.1, "crown-ibp"), (0.1, "ibp")]),
    "cnn-ibp": dict(arch="cnn", eps=0.1, method="ibp", certify=[(0.1, "ibp"), (0.1, "crown-ibp")]),
}
UNSUPPORTED = {("cnn-crown-ibp", "ort-training")}
REFERENCE = ("reference (interval-training tutorial's own trainer, same 5,000 images and recipe, this machine): "
             "85.6-87.5 % clean, 72-75 % certified at eps 0.01, under 0.1 % at eps 0.1, about 145 s of training")


def run_case(case: str, backend: str, threads: int) -> dict:
    """Train one case in this process and certify it on the MNIST test set."""
    from graphcert.certify import certify
    from graphcert.data import load_dataset
    from graphcert.training import TrainConfig, train
    spec = CASES[case]
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(output=str(Path(folder) / f"{case}.onnx"), eps=spec["eps"], arch=spec["arch"],
                             data="mnist5k", method=spec["method"], epochs=10, warmup=2, rampup=8,
                             batch_size=256, lr=1e-3, backend=backend, holdout=0.0, threads=threads)
        result = train(config)
        test = load_dataset("mnist-test")
        checks = []
        for eps, method in spec["certify"]:
            found = certify(config.output, test, eps, method=method)
            checks.append({"eps": eps, "method": method, "clean": found.clean_accuracy,
                           "certified": found.certified_accuracy})
    seconds = [s.seconds for s in result.history]
    return {"case": case, "backend": backend, "train_seconds": result.seconds,
            "seconds_per_epoch": sum(seconds) / len(seconds), "checks": checks}


def in_subprocess(python: str, case: str, backend: str, threads: int) -> dict:
    proc = subprocess.run([python, __file__, "--worker", case, "--backend", backend, "--threads", str(threads)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "backend": backend, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ort-python", help="python of an environment with onnxruntime-training")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(args.worker, args.backend, args.threads)))
        return
    interpreters = {"torch": sys.executable}
    if args.ort_python:
        interpreters["ort-training"] = args.ort_python
    print(f"command: python benchmarks/train_bench.py {' '.join(sys.argv[1:])}")
    print(REFERENCE)
    print()
    print("| case | backend | s/epoch | train s | certified on MNIST test (10,000) |")
    print("| --- | --- | ---: | ---: | --- |")
    for case in args.cases.split(","):
        for backend, python in interpreters.items():
            if (case, backend) in UNSUPPORTED:
                print(f"| {case} | {backend} | - | - | not supported (no CPU ConvTransposeGrad) |", flush=True)
                continue
            row = in_subprocess(python, case, backend, args.threads)
            if "error" in row:
                print(f"| {case} | {backend} | - | - | failed: {row['error']} |", flush=True)
                continue
            checks = "; ".join(f"eps {c['eps']:g} {c['method']}: clean {c['clean']:.2%}, certified {c['certified']:.2%}"
                               for c in row["checks"])
            print(f"| {case} | {backend} | {row['seconds_per_epoch']:.2f} | {row['train_seconds']:.1f} | {checks} |",
                  flush=True)


if __name__ == "__main__":
    main()
