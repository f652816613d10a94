"""Retrain the shipped MNIST models with certified training and write them to models/.

mnist_mlp: the 784-100-100-100-10 MLP, IBP-trained at eps = 0.01; mnist_cnn: the small CNN, IBP-trained at
eps = 0.1 (it certifies with both ibp and crown-ibp). Both on all of mnist5k with the benchmark recipe
(2 warm-up + 8 ramp-up epochs, batch 256, Adam 1e-3), input `image` [batch, 1, 28, 28], output `logits`.
Prints what `graphcert certify` reports for each on the shipped MNIST test set.

Usage: python scripts/train_shipped_models.py [--seed 0] [--backend torch]
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
RECIPES = {"mnist_mlp": dict(arch="mlp", eps=0.01), "mnist_cnn": dict(arch="cnn", eps=0.1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args()
    test = load_dataset("mnist-test")
    for name, recipe in RECIPES.items():
        with tempfile.TemporaryDirectory() as folder:
            config = TrainConfig(output=str(Path(folder) / f"{name}.onnx"), data="mnist5k", method="ibp", epochs=10,
                                 warmup=2, rampup=8, batch_size=256, lr=1e-3, seed=args.seed, holdout=0.0,
                                 backend=args.backend, **recipe)
            result = train(config)
            atomic_write(Path(config.output).read_bytes(), MODELS / f"{name}.onnx")
        print(f"wrote models/{name}.onnx ({result.seconds:.1f} s of training)")
        for method in ("ibp", "crown-ibp"):
            found = certify(str(MODELS / f"{name}.onnx"), test, recipe["eps"], method=method)
            print(f"  mnist-test eps={recipe['eps']:g} {method}: clean {found.clean_accuracy:.2%}, "
                  f"certified {found.certified_accuracy:.2%}")


if __name__ == "__main__":
    main()
