"""What certifying the float32 model costs: certified accuracy of every shipped model with rounding="float32"
(the default) and "real", side by side on the MNIST test set.

    python benchmarks/float32_cost.py [--limit N]
"""
from __future__ import annotations

import argparse

from graphcert.certify import certify
from graphcert.data import load_dataset
from graphcert.models import shipped_path

RUNS = [("mnist_mlp", "ibp", 0.01, "linf"), ("mnist_mlp", "crown", 0.01, "linf"), ("mnist_cnn", "ibp", 0.01, "linf"),
        *[(m, "lipschitz", r, "l2") for m in ("mnist_mlp_gloro", "mnist_cnn_gloro", "mnist_lipmlp")
          for r in (0.1, 0.3, 0.5)]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    data = load_dataset("mnist-test")
    print(f"{'model':16} {'method':10} {'eps':>5} {'norm':5} {'real %':>8} {'float32 %':>10} {'cost':>7} {'s real':>7} "
          f"{'s f32':>7}")
    for model, method, eps, norm in RUNS:
        real = certify(shipped_path(model), data, eps, method=method, norm=norm, limit=args.limit, rounding="real")
        f32 = certify(shipped_path(model), data, eps, method=method, norm=norm, limit=args.limit)
        print(f"{model:16} {method:10} {eps:5g} {norm:5} {100 * real.certified_accuracy:8.2f} "
              f"{100 * f32.certified_accuracy:10.2f} {100 * (real.certified_accuracy - f32.certified_accuracy):7.2f} "
              f"{real.seconds:7.1f} {f32.seconds:7.1f}", flush=True)


if __name__ == "__main__":
    main()
