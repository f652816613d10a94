"""Certified accuracy and seconds of every certify method on the shipped models, L-inf and L2.

For each shipped model and each (norm, eps, method): clean and certified accuracy on the first N images of the
shipped MNIST test set and the seconds certify took (one thread for torch; onnxruntime's default threads).
Usage: python benchmarks/certify_bench.py [--limit 1000] [--models mnist_mlp mnist_cnn]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import graphcert
from graphcert.certify import certify
from graphcert.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
CASES = [("linf", 0.01, ("ibp", "crown-ibp", "crown", "auto")),
         ("linf", 0.03, ("ibp", "crown-ibp", "crown", "auto")),
         ("l2", 0.1, ("lipschitz", "crown", "auto")),
         ("l2", 0.3, ("lipschitz", "crown", "auto")),
         ("l2", 0.5, ("lipschitz", "crown", "auto"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--models", nargs="+", default=["mnist_mlp", "mnist_cnn"])
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    data = load_dataset("mnist-test").head(args.limit)
    print(f"first {len(data)} MNIST test images")
    print(f"{'model':10} {'norm':>4} {'eps':>5} {'method':>10} {'clean':>7} {'certified':>9} {'seconds':>8}")
    for name in args.models:
        model = graphcert.load(REPO / "models" / f"{name}.onnx")
        for norm, eps, methods in CASES:
            for method in methods:
                found = certify(model, data, eps, method=method, norm=norm)
                print(f"{name:10} {norm:>4} {eps:5g} {method:>10} {found.clean_accuracy:7.1%} "
                      f"{found.certified_accuracy:9.1%} {found.seconds:8.2f}", flush=True)


if __name__ == "__main__":
    main()
