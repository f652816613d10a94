"""Retrain the shipped MNIST models with certified training and write them to models/.

mnist_mlp: the 784-100-100-100-10 MLP, IBP-trained at eps = 0.01; mnist_cnn: the small CNN, IBP-trained at
eps = 0.1 (it certifies with both ibp and crown-ibp); mnist_mlp_gloro: the same MLP, Lipschitz-margin (GloRo)
trained at L2 radius 0.3 (certify it with --method lipschitz --norm l2); mnist_cnn_gloro: the small CNN, GloRo-trained
at L2 radius 0.3 for 30 epochs (2 warm-up + 28 ramp-up); mnist_lipmlp: the 1-Lipschitz 784-256-256-256-10
GroupSort2 network, Björck-orthonormal (--method orthogonal) with the HKR loss (alpha 50, margin 1) for L2
radius 0.3 (certify it with --method lipschitz --norm l2). All on all of mnist5k with the benchmark recipe (unless
said otherwise 2 warm-up + 8 ramp-up epochs; batch 256, Adam 1e-3), input `image` [batch, 1, 28, 28], output
`logits`.
Prints what `graphcert certify` reports for each on the shipped MNIST test set.

Usage: python scripts/train_shipped_models.py [--seed 0] [--backend torch] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from graphcert.certify import certify
from graphcert.data import load_dataset
from graphcert.export import atomic_write
from graphcert.training import TrainConfig, train

MODELS = Path(__file__).resolve().parents[1] / "models"
RECIPES = {"mnist_mlp": dict(arch="mlp", eps=0.01), "mnist_cnn": dict(arch="cnn", eps=0.1),
           "mnist_mlp_gloro": dict(arch="mlp", eps=0.3, method="gloro"),
           "mnist_cnn_gloro": dict(arch="cnn", eps=0.3, method="gloro", epochs=30, rampup=28),
           "mnist_lipmlp": dict(arch="lipmlp", eps=0.3, method="orthogonal", loss="hkr")}
# method trained with -> (norm, methods that certify it)
CERTIFIED_WITH = {"ibp": ("linf", ("ibp", "crown-ibp")), "gloro": ("l2", ("lipschitz",)),
                  "orthogonal": ("l2", ("lipschitz",))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="train only these models")
    args = parser.parse_args()
    test = load_dataset("mnist-test")
    for name, recipe in RECIPES.items():
        if args.only and name not in args.only:
            continue
        recipe = {"method": "ibp", "epochs": 10, "warmup": 2, "rampup": 8, **recipe}
        with tempfile.TemporaryDirectory() as folder:
            config = TrainConfig(output=str(Path(folder) / f"{name}.onnx"), data="mnist5k", batch_size=256,
                                 lr=1e-3, seed=args.seed, holdout=0.0, backend=args.backend, **recipe)
            result = train(config)
            atomic_write(Path(config.output).read_bytes(), MODELS / f"{name}.onnx")
        print(f"wrote models/{name}.onnx ({result.seconds:.1f} s of training)")
        norm, methods = CERTIFIED_WITH[recipe["method"]]
        for method in methods:
            found = certify(str(MODELS / f"{name}.onnx"), test, recipe["eps"], method=method, norm=norm)
            print(f"  mnist-test {norm} eps={recipe['eps']:g} {method}: clean {found.clean_accuracy:.2%}, "
                  f"certified {found.certified_accuracy:.2%}")


if __name__ == "__main__":
    main()
